"""Direct logit attribution, OV/QK circuits, composition and activation patching (docs/metrics.md §11).

Planted structure on the tiny random Llama (a head with zero ``W_O``; a head wired to copy a
token), exact patching identities, and on SmolLM2 the decomposition identity plus agreement
with straightforward re-implementations written directly against the Hugging Face modules.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from probes.attribution import LogitAttribution
from workbench import circuits, patching
from workbench.data import load_dataset
from workbench.errors import InputError
from workbench.logit_attribution import answer_token, components, project, vocab_contributions

PROMPTS = ["When Mary and John went to the store, John gave a drink to",
           "When Anna and Paul went to the house, Paul gave a book to"]


@contextlib.contextmanager
def planted(edits):
    """Temporarily overwrite parameter slices: ``[(param, index, value)]``; restored on exit."""
    saved = [(param, index, param.data[index].clone()) for param, index, _ in edits]
    try:
        with torch.no_grad():
            for param, index, value in edits:
                param.data[index] = value
        yield
    finally:
        with torch.no_grad():
            for param, index, value in saved:
                param.data[index] = value


def _proj(model, layer, name):
    return getattr(model.bridge.blocks[layer].attn, name).original_component.weight


# ------------------------------------------------------------------ planted structure (tiny model)
def test_head_with_zero_output_weights_has_no_attribution_and_no_composition(tiny_llama):
    model, layer, head = tiny_llama, 0, 2
    d = model.d_head
    batch = model.tokenize(PROMPTS)
    with planted([(_proj(model, layer, "o"), (slice(None), slice(head * d, (head + 1) * d)), 0.0)]):
        probe = LogitAttribution().fit(model=model, batch=batch)
        scores = circuits.composition_scores(model)
    assert torch.all(probe.per_sample_["dla"][:, layer, head] == 0)
    assert (probe.mean_["dla"] != 0).sum() >= model.n_layers * model.n_heads - 1   # the others are live
    written = scores[(scores.src_layer == layer) & (scores.src_head == head)]
    assert len(written) == 3 * model.n_heads and (written.score == 0).all()
    assert (scores[scores.src_head != head].score > 0).all()


def test_head_wired_to_copy_a_token_promotes_it(tiny_llama):
    model, layer, head = tiny_llama, 1, 1
    d, group = model.d_head, circuits.kv_head(tiny_llama, 1)
    w_u = model.bridge.W_U.detach().float()
    token = int(w_u.norm(dim=0).argmax())   # |u_t|^2 >= u_t . u_j for every j (Cauchy-Schwarz)
    x = circuits._embedding_rows(model, torch.tensor([token]))[0] * circuits._ln_weight(model, layer)
    read = x / x.pow(2).sum()                      # x_t . read = 1: value 1 for the token
    write = w_u[:, token] / circuits._ln_weight(model, None)
    o_cols = torch.zeros(model.bridge.cfg.d_model, d)
    o_cols[:, 0] = write * 5
    v_rows = torch.zeros(d, model.bridge.cfg.d_model)
    v_rows[0] = read
    with planted([(_proj(model, layer, "v"), (slice(group * d, (group + 1) * d), slice(None)), v_rows),
                  (_proj(model, layer, "o"), (slice(None), slice(head * d, (head + 1) * d)), o_cols)]):
        ov = circuits.ov_tokens(model, layer, head, token, k=3)
        text = model.tokenizer.decode([token] * 6)
        batch = model.batch_from_ids([torch.cat([model.encode("a")[:1], torch.tensor([token] * 6)])])
        parts = components(model, batch)
        per_head = parts.vectors[:, parts.head_index[layer, head]]
        logits = vocab_contributions(model, per_head, parts.scale)[0]
        contrib, _ = project(model, parts, torch.tensor([token]))
    assert ov["promoted"].token_id.iloc[0] == token, text
    assert int(logits.argmax()) == token
    assert contrib[0, parts.head_index[layer, head]] > 0


def test_decomposition_sums_to_the_logit_on_tiny_models(tiny_llama, tiny_gpt2):
    for model in (tiny_llama, tiny_gpt2):
        batch = model.tokenize(PROMPTS)
        parts = components(model, batch)
        assert parts.residual_error < 1e-4
        target = parts.logits.argmax(-1)
        other = (target + 1) % parts.logits.shape[-1]
        rows = torch.arange(len(batch))
        values, labels = project(model, parts, target, other)
        assert labels[-1] == "bias" and len(labels) == values.shape[1]
        torch.testing.assert_close(values.sum(1), parts.logits[rows, target] - parts.logits[rows, other],
                                   atol=1e-4, rtol=1e-4)


def test_circuit_inputs_are_checked(tiny_llama):
    with pytest.raises(InputError, match="out of range"):
        circuits.ov_tokens(tiny_llama, 5, 0, 3)
    with pytest.raises(InputError, match="composition kind"):
        circuits.composition_scores(tiny_llama, kinds=("x",))
    with pytest.raises(InputError, match="vocabulary"):
        circuits.qk_keys(tiny_llama, 0, 0, 10 ** 6)


# ------------------------------------------------------------------ patching identities (tiny model)
@pytest.fixture(scope="module")
def pair(tiny_llama):
    clean = ["When Mary and John went to the store, John gave a drink to"]
    corrupt = ["When Mary and John went to the store, Mary gave a drink to"]
    return patching.setup(tiny_llama, clean, corrupt, ["Mary"], ["John"])


def test_residual_patch_at_the_only_changed_token_recovers_exactly_one(tiny_llama, pair):
    changed = [i for i in range(pair.clean.tokens.shape[1]) if pair.clean.tokens[0, i] != pair.corrupt.tokens[0, i]]
    assert len(changed) == 1
    table = patching.patch_table(tiny_llama, pair, "resid", layers=[0], n_boot=10)
    offset = changed[0] - int(pair.clean.lengths[0])
    at = table.set_index("position")["recovery"]
    assert at[offset] == pytest.approx(1.0, abs=1e-5)
    assert (at.drop(offset).abs() < 1e-5).all()        # unchanged positions carry no difference at layer 0


def test_patching_a_head_into_its_own_run_recovers_exactly_one(tiny_llama, pair):
    same = patching.PatchingSetup(pair.clean, pair.clean, pair.metric, pair.metric_name, pair.kept, pair.labels)
    heads = [patching.Patch("z", layer, head) for layer in range(2) for head in range(tiny_llama.n_heads)]
    patched, clean, _ = patching.patched_metrics(tiny_llama, same, heads + [patching.Patch("z", 1, 0, -1)])
    _, _, corrupt = patching.patched_metrics(tiny_llama, pair, heads[:1])
    torch.testing.assert_close(patched, clean.expand_as(patched), atol=1e-6, rtol=0)
    value, _, _ = patching.recovery(patched, clean, corrupt, n_boot=10)
    assert value == pytest.approx([1.0] * len(value), abs=1e-4)


def test_patching_inputs_are_checked(tiny_llama, pair):
    with pytest.raises(InputError, match="same token length"):
        patching.setup(tiny_llama, ["a b c"], ["a b c d e"], ["x"], ["y"])
    with pytest.raises(InputError, match="outside the shortest prompt"):
        patching.patch_table(tiny_llama, pair, "resid", positions=[-100])
    with pytest.raises(InputError, match="site"):
        patching.patch_table(tiny_llama, pair, "mlp")
    with pytest.raises(InputError, match="distractor"):
        patching.setup(tiny_llama, PROMPTS[:1], PROMPTS[:1], ["a"], None)


# ------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def ioi(smollm2):
    """Four IOI items whose clean and corrupted prompts all have one token length (no padding,
    so the reference implementations below run the Hugging Face model on the plain batch)."""
    full = load_dataset("ioi", smollm2)
    lengths = [len(smollm2.encode(m["prompt"])) for m in full.meta]
    common = max(set(lengths), key=lengths.count)
    rows = [i for i, m in enumerate(full.meta)
            if lengths[i] == common and len(smollm2.encode(m["corrupt_prompt"])) == common][:4]
    assert len(rows) == 4
    return full.select(rows)


@pytest.mark.smollm2
def test_sum_identity_on_smollm2(smollm2, ioi):
    probe = LogitAttribution().fit(model=smollm2, batch=ioi)
    assert probe.identity_error_ <= 1e-3
    parts = components(smollm2, ioi)
    assert parts.residual_error <= 1e-3
    targets = torch.tensor([answer_token(smollm2, m["answer"]) for m in ioi.meta])
    values, _ = project(smollm2, parts, targets)
    assert (values.sum(1) - parts.logits[torch.arange(len(ioi)), targets]).abs().max() <= 1e-3


def _hf_logits(model, ids, hooks=()):
    """Last-token logits ``[B, V]`` of the plain Hugging Face model with forward pre-hooks
    ``[(module, fn)]`` (removed on exit)."""
    handles = [module.register_forward_pre_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            return model.bridge.original_model(input_ids=ids).logits[:, -1].float()
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.smollm2
def test_dla_matches_a_straightforward_implementation_on_smollm2_ioi(smollm2, ioi):
    """Per-head DLA recomputed from o_proj inputs, the RMSNorm formula and lm_head rows."""
    hf = smollm2.bridge.original_model
    layers, norm, lm_head = hf.model.layers, hf.model.norm, hf.lm_head
    d, H = smollm2.d_head, smollm2.n_heads
    probe = LogitAttribution(["dla_diff"]).fit(model=smollm2, batch=ioi)
    seen, final = {}, {}

    def keep(store, key):
        return lambda module, args: store.__setitem__(key, args[0][:, -1].detach())
    hooks = [(layer.self_attn.o_proj, keep(seen, i)) for i, layer in enumerate(layers)] + [(norm, keep(final, "x"))]
    _hf_logits(smollm2, ioi.tokens, hooks)
    x = final["x"]                                                         # [B, D]
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    a = torch.tensor([answer_token(smollm2, m["answer"]) for m in ioi.meta])
    b = torch.tensor([answer_token(smollm2, m["distractor"]) for m in ioi.meta])
    u = (lm_head.weight[a] - lm_head.weight[b]) * norm.weight / rms        # [B, D]
    for layer in range(smollm2.n_layers):
        w = layers[layer].self_attn.o_proj.weight                          # [D, H*d]
        for head in range(H):
            out = seen[layer][:, head * d:(head + 1) * d] @ w[:, head * d:(head + 1) * d].T   # [B, D]
            want = (out * u).sum(-1)
            got = probe.per_sample_["dla_diff"][:, layer, head]
            torch.testing.assert_close(got, want.float(), atol=2e-4, rtol=1e-3, msg=f"L{layer}H{head}")


@pytest.mark.smollm2
def test_patching_matches_a_straightforward_implementation_on_smollm2_ioi(smollm2, ioi):
    """Head patching recomputed with plain forward pre-hooks on o_proj of the Hugging Face model."""
    layers = smollm2.bridge.original_model.model.layers
    setup = patching.setup_from_batch(smollm2, ioi)
    assert setup.kept == [0, 1, 2, 3]
    chosen = [(9, 3), (14, 4), (20, 1)]
    table = patching.patch_table(smollm2, setup, "z", layers=sorted({l for l, _ in chosen}),
                                 heads=sorted({h for _, h in chosen}), n_boot=10)
    d = smollm2.d_head
    clean_ids = setup.clean.tokens
    corrupt_ids = setup.corrupt.tokens
    a = torch.tensor([answer_token(smollm2, m["answer"]) for m in ioi.meta])
    b = torch.tensor([answer_token(smollm2, m["distractor"]) for m in ioi.meta])
    rows = torch.arange(len(a))

    def diff(logits):
        return (logits[rows, a] - logits[rows, b]).mean()
    stash = {}

    def keep(layer):
        return lambda module, args: stash.__setitem__(layer, args[0].detach().clone())
    clean = diff(_hf_logits(smollm2, clean_ids, [(layers[l].self_attn.o_proj, keep(l)) for l, _ in chosen]))
    corrupt = diff(_hf_logits(smollm2, corrupt_ids))
    for layer, head in chosen:
        def put(module, args, layer=layer, head=head):
            x = args[0].clone()
            x[..., head * d:(head + 1) * d] = stash[layer][..., head * d:(head + 1) * d]
            return (x,)
        patched = diff(_hf_logits(smollm2, corrupt_ids, [(layers[layer].self_attn.o_proj, put)]))
        want = float((patched - corrupt) / (clean - corrupt))
        got = table[(table.layer == layer) & (table["head"] == head)].recovery.item()
        assert got == pytest.approx(want, abs=2e-3), (layer, head)


# ------------------------------------------------------------------ CLI
def test_patch_command_writes_a_table_and_a_figure(tmp_path, capsys, tiny_llama):
    import json

    import pandas as pd

    from app.cli import main

    data = tmp_path / "pairs.jsonl"
    items = [{"prompt": PROMPTS[0], "corrupt_prompt": PROMPTS[0].replace("store, John", "store, Mary"),
              "answer": "Mary", "distractor": "John"},
             {"prompt": PROMPTS[0].replace("drink", "book"),
              "corrupt_prompt": PROMPTS[0].replace("drink", "book").replace("store, John", "store, Mary"),
              "answer": "Mary", "distractor": "John"}]
    data.write_text("\n".join(json.dumps(i) for i in items))
    out = tmp_path / "patch"
    args = ["patch", "--model", "tiny-llama", "--dataset", str(data), "--out", str(out), "--no-progress"]
    assert main(args + ["--site", "z", "--position", "-1"]) == 0
    table = pd.read_parquet(out / "patching.parquet")
    assert len(table) == tiny_llama.n_layers * tiny_llama.n_heads and set(table["position"]) == {-1}
    assert (out / "patching.csv").is_file() and "plotly" in (out / "patching.html").read_text()
    assert json.loads((out / "manifest.json").read_text())["n_samples"] == 2
    assert main(args + ["--site", "resid"]) == 2                      # an earlier run is never replaced silently
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--site", "resid", "--force"]) == 0
    assert set(pd.read_parquet(out / "patching.parquet")["site"]) == {"resid"}
    assert main(["patch", "--model", "tiny-llama", "--dataset", "induction", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "corrupt_prompt" in capsys.readouterr().err
