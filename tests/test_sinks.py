"""Sinks probe (docs/metrics.md §3): planted sink head, analytic uniform head, massive activations, no-op."""

import math

import pytest
import torch

from probes.base import FRAME_COLUMNS
from probes.sink_tokens import discover_sink_dims, massive_ratio, sink_positions
from probes.sinks import Sinks, analytic_uniform_alpha1, sink_rate
from workbench.capture import capture
from workbench.errors import InputError
from workbench.model import hook_name, load_model

T = 24
SINK_DIM = 0
CONST_DIMS = slice(1, 9)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """tiny-llama with real weights planted in layer 0 (d_model 64, 4 query heads, 2 KV heads):

    - every token's embedding has 0 in dim 0 and 0.1 in dims 1..8; BOS has 50 in dim 0
      (a massive activation: r_0 = 8 = sqrt(64), the ceiling);
    - KV head 0: the key reads only dim 0 into rotary component 7 (the lowest RoPE frequency,
      so the rotation over 24 positions is negligible): every key but BOS is 0;
    - query head 0 reads the constant dims into component 7: a huge positive score on BOS only,
      so it attends to the first token alone (α_1 = 1);
    - query head 1 (same KV head) has W_Q = 0: all scores equal, uniform attention;
    - KV head 0's values ignore dim 0, so v(BOS) ≈ 0 (a no-op sink).
    """
    from transformers import LlamaForCausalLM

    from workbench.registry import REGISTRY
    from workbench.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("planted-sink")
    build_tiny_model(dict(REGISTRY["tiny-llama"].tiny_config), folder)
    hf = LlamaForCausalLM.from_pretrained(folder)
    bos = hf.config.bos_token_id
    d = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[:, SINK_DIM] = 0.0
        emb[:, CONST_DIMS] = 0.1
        emb[bos, SINK_DIM] = 50.0
        attn = hf.model.layers[0].self_attn
        attn.k_proj.weight[:d] = 0.0
        attn.k_proj.weight[7, SINK_DIM] = 10.0
        attn.q_proj.weight[: 2 * d] = 0.0
        attn.q_proj.weight[7, CONST_DIMS] = 10.0
        attn.v_proj.weight[:d, SINK_DIM] = 0.0
    hf.save_pretrained(folder)
    return load_model(str(folder))


def _batch(model, n=3, length=T):
    generator = torch.Generator().manual_seed(0)
    special = set(model.tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(model.tokenizer)) if i not in special])
    rows = [torch.cat([torch.tensor([model.tokenizer.bos_token_id]),
                       vocab[torch.randint(len(vocab), (length - 1,), generator=generator)]]) for _ in range(n)]
    return model.batch_from_ids(rows)


def test_planted_sink_head_scores_one_and_uniform_head_is_analytic(planted):
    cap = capture(planted, _batch(planted), progress=False)
    probe = Sinks(["sink_score"]).fit(cap)
    l0 = cap.layers.index(0)
    assert probe.per_sample_["sink_score"][:, l0, 0] == pytest.approx(torch.ones(3), abs=1e-3)
    assert probe.mean_["sink_score"][l0, 0] == pytest.approx(1.0, abs=1e-3)
    # uniform head: α_k = (1/(T-k+1)) Σ_{i>=k} 1/i (1-based)
    for k in (1, 2, 5, T):
        expected = sum(1 / i for i in range(k, T + 1)) / (T - k + 1)
        assert probe.alpha_[:, l0, 1, k - 1] == pytest.approx(torch.full((3,), expected), abs=1e-5)
    assert analytic_uniform_alpha1(T) == pytest.approx(sum(1 / i for i in range(1, T + 1)) / T)
    # sink rate: the planted head passes ε = 0.3; the uniform one does not (α_1 ≈ 0.16)
    assert probe.sink_rate_ >= 100 / (2 * 4)


def test_massive_activation_dims_and_positions(planted):
    batch = _batch(planted)
    cap = capture(planted, batch, progress=False)
    probe = Sinks(tau=5.0).fit(cap, model=planted)
    assert probe.sink_dims_ == [SINK_DIM]
    assert probe.flagged_layers_[SINK_DIM] == [0, 1]
    assert probe.sink_positions_ == [[0]] * 3
    assert probe.sink_source_used_ == "massive"
    assert probe.phi_[:, 0, 0] == pytest.approx(torch.full((3,), 8.0), abs=0.05)
    # with τ = 20 nothing can pass on d_model = 64 (φ <= sqrt(64) = 8): auto falls back to the first token
    default = Sinks().fit(cap, model=planted)
    assert default.sink_dims_ == [] and default.sink_source_used_ == "first"


def test_noop_score_matches_direct_computation(planted):
    batch = _batch(planted)
    cap = capture(planted, batch, progress=False)
    probe = Sinks(tau=5.0).fit(cap, model=planted)
    seen = {}
    planted.run(batch, fwd_hooks=[(hook_name(0, "pattern"), lambda t, hook: seen.__setitem__("A", t.detach()) or t),
                                  (hook_name(0, "v"), lambda t, hook: seen.__setitem__("v", t.detach()) or t)])
    A, v = seen["A"], seen["v"]                      # [B, H, N, N], [B, N, Hkv, d]
    vnorm = v.norm(dim=-1)                           # [B, N, Hkv]
    for head in range(planted.n_heads):
        kv = head // (planted.n_heads // planted.n_kv_heads)
        mass = A[:, head, :, 0].mean(-1)             # the only sink token is BOS
        expected = mass * (1 - vnorm[:, 0, kv] / vnorm[:, :, kv].mean(-1))
        got = probe.per_sample_["noop_score"][:, cap.layers.index(0), head]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert probe.mean_["noop_score"][0, 0] > 0.95    # all mass on a sink whose value is ~0


def test_discovery_rules_on_synthetic_states():
    x = torch.randn(2, 6, 10, 512)
    x[0, :, 0, 7] = 500.0                            # persistent massive dim on the first token
    x[1, 5, 3, 9] = 500.0                            # a one-layer outlier
    ratio = massive_ratio(x)
    assert ratio[0, 0, 0, 7] == pytest.approx(math.sqrt(512), rel=0.02)
    flagged = (ratio > 20).any(dim=(0, 2))           # [L, D]
    assert discover_sink_dims(flagged, 0.25) == [7]
    assert discover_sink_dims(flagged, 1 / 6) == [7, 9]
    mask = torch.ones(2, 10, dtype=torch.bool)
    sink_mask = (ratio[..., [7]].amax(-1) > 20)
    assert sink_positions(sink_mask, mask) == [[0], []]
    with pytest.raises(InputError):
        discover_sink_dims(flagged, 0.0)


def test_frame_and_errors(tiny_llama):
    cap = capture(tiny_llama, ["the quick brown fox jumps over the lazy dog"], progress=False)
    probe = Sinks().fit(cap)
    frame = probe.to_frame()
    assert list(frame.columns) == FRAME_COLUMNS
    assert set(frame["metric"]) == {"sink_score", "first4_mass"}
    assert len(frame) == 2 * tiny_llama.n_layers * tiny_llama.n_heads
    with_model = Sinks().fit(cap, model=tiny_llama).to_frame()
    assert set(with_model["metric"]) == {"sink_score", "first4_mass", "noop_score"}
    with pytest.raises(InputError, match="needs the model"):
        Sinks(["noop_score"]).fit(cap)
    with pytest.raises(InputError, match="needs a capture"):
        Sinks().fit(model=tiny_llama)
    for kwargs in ({"tau": 0}, {"eps": 1.5}, {"min_layer_frac": 0}, {"sink_source": "last"}, {"batch_size": 0}):
        with pytest.raises(InputError):
            Sinks(**kwargs).fit(cap)
    with pytest.raises(InputError, match="unknown metric"):
        Sinks(["sink"]).fit(cap)
    with pytest.raises(InputError, match="no sample has 64 tokens"):
        sink_rate(tiny_llama, tiny_llama.tokenize(["short prompt"]))
    with pytest.raises(InputError):
        sink_rate(tiny_llama, tiny_llama.tokenize(["short prompt"]), T=1)


def test_sink_rate_on_planted_model(planted):
    rate = sink_rate(planted, _batch(planted, n=2, length=70), T=64)
    # layer 0 head 0 is a sink (α_1 = 1), head 1 uniform (α_1 ≈ 0.074 < 0.3): at least 1 of 8
    assert 100 / 8 <= rate <= 100


@pytest.mark.smollm2
def test_smollm2_sink_rate_and_dims(smollm2):
    from workbench.data import load_dataset

    batch = load_dataset("calibration", smollm2, n=8, seq_len=64)
    rate = sink_rate(smollm2, batch, T=64)
    assert 0 <= rate <= 100
    cap = capture(smollm2, batch, progress=False)
    probe = Sinks().fit(cap, model=smollm2)
    assert 507 in probe.sink_dims_                   # SmolLM2's massive-activation dim (docs/sinks.md)
    assert all(positions and positions[0] == 0 for positions in probe.sink_positions_)
    print(f"SmolLM2 sink rate {rate:.1f}%, D_sink {probe.sink_dims_}")
