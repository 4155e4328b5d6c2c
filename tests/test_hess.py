"""HeSS probe, water-filling budgets and the block-sparse runner (tiny models; SmolLM2 marked)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from probes.hess import HeSS, copy_positions, next_token_error, query_fisher, query_sites
from probes.sparsity import allocation_weights, block_budgets, nominal_density, visible_blocks, water_fill
from workbench.attention_backend import STATE
from workbench.forward import run
from workbench.data import load_dataset
from workbench.errors import InputError
from workbench.model import load_model
from workbench.sparse_run import sparse_forward

SMALL = dict(n_calibration=3, seq_len=32, copy_seq_len=17, n_boot=200)


# ----------------------------------------------------------------------------- HeSS
@pytest.fixture(scope="module")
def tiny_hess(tiny_llama):
    return HeSS(**SMALL).fit(model=tiny_llama)


def test_hess_normalises_to_one_per_layer(tiny_hess):
    for metric in HeSS.metrics:
        values = tiny_hess.mean_[metric]
        assert values.shape == (2, 4)
        np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-9)
        assert (values > 0).all()
    for per_sample in tiny_hess.per_sample_.values():
        torch.testing.assert_close(per_sample.sum(-1), torch.ones(3, 2, dtype=torch.float64))
    frame = tiny_hess.to_frame()
    assert set(frame["metric"]) == set(HeSS.metrics) and len(frame) == 3 * 8
    assert (frame["ci_low"] <= frame["ci_high"]).all()


def test_lambda_mixing(tiny_llama, tiny_hess):
    np.testing.assert_allclose(tiny_hess.mean_["hess"],
                               0.5 * tiny_hess.mean_["hess_e1"] + 0.5 * tiny_hess.mean_["hess_e2"])
    data = dict(calibration=load_dataset("calibration", tiny_llama, n=3, seq_len=32),
                copy=load_dataset("induction", tiny_llama, n=3, seq_len=17))
    mixed = HeSS(**dict(SMALL, lam=0.2)).fit(model=tiny_llama, **data)
    np.testing.assert_allclose(mixed.mean_["hess"], 0.2 * mixed.mean_["hess_e1"] + 0.8 * mixed.mean_["hess_e2"])
    only_e1 = HeSS(**dict(SMALL, lam=1.0)).fit(model=tiny_llama, **data)
    np.testing.assert_allclose(only_e1.mean_["hess"], only_e1.mean_["hess_e1"])
    assert not np.allclose(only_e1.mean_["hess_e1"], only_e1.mean_["hess_e2"])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_fisher_matches_parameter_gradients(name):
    """Per-sample traces from the batched leaf trick equal ‖∂e/∂W_Q^h‖² from a plain backward."""
    model = load_model(name)
    text = load_dataset("calibration", model, n=2, seq_len=24)
    batch = model.batch_from_ids([text.tokens[0], text.tokens[1, :15]])  # ragged: padding must not leak
    fisher = query_fisher(model, batch, next_token_error, batch_size=2)
    d = model.d_head
    sites = query_sites(model)
    for row in range(2):
        sample = batch.select([row])
        weights = [weight for _, weight, _ in sites]
        logits = run(model, sample, grad=True)  # the one forward, plain backward to the weights
        grads = torch.autograd.grad(next_token_error(logits, sample).sum(), weights)
        for layer, grad in enumerate(grads):
            grad = grad if name == "tiny-llama" else grad.T  # Conv1D stores [in, out]
            expected = torch.stack([grad[h * d:(h + 1) * d].pow(2).sum() for h in range(model.n_heads)])
            torch.testing.assert_close(fisher[row, layer].float(), expected, rtol=1e-4, atol=1e-12)


def _module_hooks(model) -> dict[str, tuple]:
    """Every forward (pre-)hook on every module: transformers installs its own output-capturing
    hooks once per model, so tests compare before/after rather than expecting none."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_fit_restores_model_state_even_on_error(tiny_llama):
    hf = tiny_llama.bridge.original_model
    HeSS(**SMALL).fit(model=tiny_llama)  # warm-up: lets transformers install its own hooks first
    hooks_before = _module_hooks(hf)
    frozen = hf.model.layers[0].self_attn.k_proj.weight
    frozen.requires_grad_(False)
    try:
        flags = {name: p.requires_grad for name, p in hf.named_parameters()}

        def broken(logits, batch):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            HeSS(**dict(SMALL, e1=broken)).fit(model=tiny_llama)
        HeSS(**SMALL).fit(model=tiny_llama)
        assert {name: p.requires_grad for name, p in hf.named_parameters()} == flags
        assert all(p.grad is None for p in hf.parameters())
        assert _module_hooks(hf) == hooks_before
        assert not hf.training
    finally:
        frozen.requires_grad_(True)


def test_amplified_query_head_ranks_first_gqa(tiny_llama, tiny_hess, tmp_path):
    """Boost one query head (its own q_proj rows and o_proj columns, not the shared K/V) of
    layer 1: HeSS_e2 must move it from last to first, not its KV-group sibling."""
    layer, d = 1, tiny_llama.d_head
    head = int(np.argmin(tiny_hess.mean_["hess_e2"][layer]))
    folder = tmp_path / "amplified"
    shutil.copytree(tiny_llama.folder, folder)
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        attn = hf.model.layers[layer].self_attn
        attn.q_proj.weight[head * d:(head + 1) * d] *= 3.0
        attn.o_proj.weight[:, head * d:(head + 1) * d] *= 30.0
    hf.save_pretrained(str(folder))
    boosted = HeSS(**SMALL).fit(model=load_model(str(folder)))
    assert int(np.argmax(boosted.mean_["hess_e2"][layer])) == head
    assert boosted.mean_["hess_e2"][layer, head] > 0.5


def _plant_copy_head(src: Path, dst: Path, copy_head: int, decoy_head: int, period: int) -> None:
    """Hand-built layer-0 GPT-2 heads: ``copy_head`` attends from i to i−period+1 (by learned
    positions) and writes that token's embedding (tied unembedding: it predicts it);
    ``decoy_head`` attends to i−1 and writes a position code of the same size into a subspace
    the unembedding ignores. Token / position / spare codes live in orthogonal zero-mean
    subspaces so LayerNorm only rescales."""
    from transformers import GPT2LMHeadModel

    shutil.copytree(src, dst)
    hf = GPT2LMHeadModel.from_pretrained(str(dst))
    gen = torch.Generator().manual_seed(0)
    D, H = hf.config.n_embd, hf.config.n_head
    d, half = D // H, D // H // 2
    centred = torch.randn(D, D, generator=gen)
    basis = torch.linalg.qr(centred - centred.mean(0, keepdim=True)).Q
    tok, pos, spare = basis[:, :d], basis[:, d:2 * d], basis[:, 2 * d:3 * d]
    units = torch.randn(hf.config.vocab_size, d, generator=gen)
    omega = 2 * math.pi * torch.arange(1, half + 1, dtype=torch.float64) / (2 * period + 1)
    angles = torch.arange(hf.config.n_positions, dtype=torch.float64)[:, None] * omega
    code = (torch.cat([angles.cos(), angles.sin()], 1) / math.sqrt(half)).float()  # unit norm

    def shift(delta: int) -> torch.Tensor:  # A with A·code[p] = code[p − delta]
        c, s, i = torch.cos(omega * delta).float(), torch.sin(omega * delta).float(), torch.arange(half)
        a = torch.zeros(d, d)
        a[i, i], a[i, i + half], a[i + half, i], a[i + half, i + half] = c, s, -s, c
        return a

    with torch.no_grad():
        hf.transformer.wte.weight.copy_((units / units.norm(dim=1, keepdim=True)) @ tok.T)
        hf.transformer.wpe.weight.copy_(code @ pos.T)
        attn = hf.transformer.h[0].attn
        for head, delta, read, write in ((copy_head, period - 1, tok, tok), (decoy_head, 1, pos, spare)):
            for part, weight in enumerate((0.6 * pos @ shift(delta).T, pos, read)):  # q, k, v
                cols = slice(part * D + head * d, part * D + (head + 1) * d)
                attn.c_attn.weight[:, cols] = weight
                attn.c_attn.bias[cols] = 0.0
            attn.c_proj.weight[head * d:(head + 1) * d] = 0.6 * write.T
    hf.save_pretrained(str(dst))


def test_planted_copy_head_leads_copy_error_hess(tiny_gpt2, tmp_path):
    copy_head, decoy_head, period = 2, 1, 8
    _plant_copy_head(tiny_gpt2.folder, tmp_path / "planted", copy_head, decoy_head, period)
    model = load_model(str(tmp_path / "planted"))
    copy = load_dataset("induction", model, n=4, seq_len=2 * period + 1)
    outputs = {}
    hook = model.bridge.original_model.transformer.h[0].attn.c_proj.register_forward_hook(
        lambda module, inputs, output: outputs.update(z=inputs[0]))
    try:
        with torch.no_grad():
            logits = model.bridge.original_model(input_ids=copy.tokens).logits
    finally:
        hook.remove()
    where = copy_positions(copy)
    accuracy = (logits[:, :-1].argmax(-1) == copy.tokens[:, 1:])[where].float().mean()
    assert accuracy > 0.9  # the planted head really copies
    z_norm = outputs["z"].unflatten(-1, (model.n_heads, model.d_head)).norm(dim=-1).mean((0, 1))
    assert z_norm[decoy_head] >= z_norm[copy_head]  # output size alone does not single it out
    probe = HeSS(n_calibration=4, seq_len=32, copy_seq_len=2 * period + 1, n_boot=100).fit(model=model)
    assert int(np.argmax(probe.mean_["hess_e2"][0])) == copy_head
    assert probe.mean_["hess_e2"][0, copy_head] > 0.5
    baseline = HeSS(n_calibration=4, seq_len=32, copy_seq_len=2 * period + 1, n_boot=100).fit(model=tiny_gpt2)
    assert baseline.mean_["hess_e2"][0, copy_head] < 0.4


def test_run_batch_serves_as_e2_or_e1_data(tiny_llama):
    repeated = load_dataset("induction", tiny_llama, n=2, seq_len=17)
    probe = HeSS(n_calibration=2, seq_len=32, n_boot=50).fit(model=tiny_llama, batch=repeated)
    assert probe.n_samples_["hess_e2"] == 2 and np.isfinite(probe.mean_["hess"]).all()
    text = load_dataset("calibration", tiny_llama, n=2, seq_len=20)
    probe = HeSS(n_calibration=2, copy_seq_len=17, n_boot=50).fit(model=tiny_llama, batch=text)
    assert probe.n_samples_["hess_e1"] == 2 and np.isfinite(probe.mean_["hess_e1"]).all()
    with pytest.raises(InputError, match="copy= was given too"):
        HeSS(n_calibration=2, n_boot=50).fit(model=tiny_llama, batch=repeated, copy=repeated)
    with pytest.raises(InputError, match="calibration= was given too"):
        HeSS(n_calibration=2, n_boot=50).fit(model=tiny_llama, batch=text, calibration=text)


def test_layer_head_subset_is_reported_from_the_full_normalisation(tiny_llama, tiny_hess):
    probe = HeSS(**SMALL, layers=[1], heads=[0, 3]).fit(model=tiny_llama)
    assert probe.layers_ == [1] and probe.heads_ == [0, 3]
    for metric in HeSS.metrics:
        np.testing.assert_allclose(probe.mean_[metric], tiny_hess.mean_[metric][1:2, [0, 3]])
    assert probe.per_sample_["hess_e1"].shape == (3, 1, 2)
    assert set(probe.to_frame()["head"]) == {0, 3}


def test_registry_has_hess():
    from probes.registry import PROBES

    assert PROBES["hess"] is HeSS and HeSS.needs_capture is False and HeSS.needs_model and not HeSS.needs_batch


def test_clear_errors(tiny_llama, tiny_bert):
    with pytest.raises(InputError, match="n_calibration"):
        HeSS(n_calibration=0).fit(model=tiny_llama)
    with pytest.raises(InputError, match="lam"):
        HeSS(lam=1.5).fit(model=tiny_llama)
    with pytest.raises(InputError, match="unknown HeSS error"):
        HeSS(e2="nope").fit(model=tiny_llama)
    with pytest.raises(InputError, match="needs the model"):
        HeSS(**SMALL).fit()
    with pytest.raises(InputError, match="encoder"):
        HeSS(**SMALL).fit(model=tiny_bert)
    text = load_dataset("calibration", tiny_llama, n=2, seq_len=20)
    with pytest.raises(InputError, match="repeated random sequences"):
        HeSS(**SMALL).fit(model=tiny_llama, copy=text)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(InputError, match="sparsity"):
            block_budgets(np.ones((2, 4)), bad, 64, block_size=8)


# ----------------------------------------------------------------------------- water filling
def test_water_fill_examples():
    assert water_fill(10, [1, 1, 8], [5, 5, 5]).tolist() in ([3, 2, 5], [2, 3, 5])  # 8 clamps, excess 1:1
    assert water_fill(6, [1, 2, 3], [10, 10, 10]).tolist() == [1, 2, 3]  # proportional
    assert water_fill(7, [0, 0, 0], [3, 3, 3]).sum() == 7  # zero weights: equal split
    assert water_fill(20, [1, 1], [3, 4]).tolist() == [3, 4]  # infeasible: caps
    assert water_fill(3, [5, 1, 1, 1], [0, 1, 1, 1]).tolist() == [0, 1, 1, 1]
    with pytest.raises(InputError):
        water_fill(3, [1, -1], [2, 2])
    with pytest.raises(InputError):
        water_fill(3, [1, 1], [2])


@pytest.mark.parametrize("seed", range(40))
def test_water_fill_properties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    weights = rng.exponential(size=n) * (rng.random(n) > 0.2)
    caps = rng.integers(0, 9, size=n)
    total = int(rng.integers(0, caps.sum() + 1))
    out = water_fill(total, weights, caps)
    assert out.sum() == total and (out >= 0).all() and (out <= caps).all()
    if caps[weights > 0].sum() >= total:
        # real-valued water level l with sum(min(l*w, cap)) = total (bisection), then round: within 1
        low, high = 0.0, float(total / weights[weights > 0].min()) + 1.0 if total else 0.0
        for _ in range(200):
            level = (low + high) / 2
            low, high = (level, high) if np.minimum(level * weights, caps).sum() < total else (low, level)
        np.testing.assert_array_less(np.abs(out - np.minimum(high * weights, caps)), 1.0 + 1e-6)


def test_block_budgets_same_total_per_layer_and_query_block():
    rng = np.random.default_rng(0)
    hess = rng.dirichlet(np.ones(9), size=3)
    visible = torch.as_tensor(visible_blocks(512, 16))
    forced = visible.clamp(max=2)
    budgets = {kind: block_budgets(allocation_weights(kind, hess, seed=1), 0.7, 512, block_size=16)
               for kind in ("uniform", "hess", "random")}
    for kind, b in budgets.items():
        assert b.shape == (3, 9, 32)
        assert (b <= visible).all() and (b >= forced).all(), kind
        torch.testing.assert_close(b.sum(1), budgets["uniform"].sum(1))
    assert (budgets["uniform"].amax(1) - budgets["uniform"].amin(1) <= 1).all()
    assert not torch.equal(budgets["hess"], budgets["uniform"])
    assert abs(nominal_density(budgets["hess"], 512, 16) - 0.3) < 0.03
    assert torch.equal(block_budgets(hess, 0.0, 512, block_size=16), visible.expand(3, 9, -1))


# ----------------------------------------------------------------------------- sparse runner
def test_sparse_forward_all_blocks_kept_equals_dense(tiny_llama):
    text = load_dataset("calibration", tiny_llama, n=2, seq_len=40)
    batch = tiny_llama.batch_from_ids([text.tokens[0], text.tokens[1, :29]])
    budgets = block_budgets(np.ones((2, 4)), 0.0, 40, block_size=8)
    run = sparse_forward(tiny_llama, batch, budgets, block_size=8)
    dense = tiny_llama.run(batch)
    torch.testing.assert_close(run.logits[batch.mask], dense[batch.mask], atol=1e-5, rtol=1e-5)
    assert run.achieved_sparsity == 0.0


def test_sparse_forward_drops_blocks_and_leaves_no_state(tiny_llama):
    hf = tiny_llama.bridge.original_model
    text = load_dataset("calibration", tiny_llama, n=1, seq_len=64)
    with torch.no_grad():
        before = hf(input_ids=text.tokens).logits
    hooks_before = _module_hooks(hf)
    budgets = block_budgets(np.array([[1.0, 2, 3, 4], [4, 3, 2, 1]]), 0.7, 64, block_size=8)
    run = sparse_forward(tiny_llama, text, budgets, block_size=8)
    assert abs(run.achieved_sparsity - (1 - nominal_density(budgets, 64, 8))) < 1e-9
    assert run.achieved_sparsity > 0.3
    assert not torch.allclose(run.logits, before, atol=1e-4)
    with pytest.raises(InputError, match="budgets"):
        sparse_forward(tiny_llama, text, budgets[:, :, :3], block_size=8)
    with pytest.raises(InputError, match="budgets"):
        sparse_forward(tiny_llama, text, budgets.float(), block_size=8)
    assert STATE.get() is None
    assert _module_hooks(hf) == hooks_before
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=text.tokens).logits, before)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.mark.smollm2
def test_smollm2_hess_two_samples(smollm2):
    probe = HeSS(n_calibration=2, seq_len=32, copy_seq_len=21, n_boot=100).fit(model=smollm2)
    for metric in HeSS.metrics:
        values = probe.mean_[metric]
        assert values.shape == (30, 9) and np.isfinite(values).all()
        np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-9)
    assert np.isfinite(probe.to_frame()["ci_low"]).all()
