"""Head interventions: isolation, exact no-ops, GQA, both modes agree, scoping, validation."""

from __future__ import annotations

import pytest
import torch

from workbench import intervened_run as ir
from workbench.errors import InputError
from workbench.interventions import (HeadIntervention as HI, InterventionSet, ReferenceZ, parse_interventions,
                                     redistribute_delta)
from workbench import forward as forward_module
from workbench.attention_backend import STATE
from workbench.model import hook_name

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Mary and John went",
           "One two three four five six seven"]
REFERENCE = ["Attention heads move information", "The capital of France is Paris, and"]


@pytest.fixture(scope="module")
def batch(tiny_llama):
    return tiny_llama.tokenize(PROMPTS)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return tiny_llama.tokenize(REFERENCE)


def _record(store, name):
    """A hook storing what it sees under ``name`` (TL aliases: ``hook.name`` may differ)."""
    def hook(z, hook):
        store[name] = z.detach().clone()
        return z
    return name, hook


def _hook_counts(model):
    return {name: (len(hp._forward_hooks), len(hp._backward_hooks), len(hp.fwd_hooks), len(hp.bwd_hooks))
            for name, hp in model.bridge.hook_dict.items()}


CASES = {
    "zero": [HI(0, 1, "zero")],
    "scale": [HI(1, 2, "scale", alpha=2.5)],
    "softpag": [HI(0, 3, "softpag", u=0.7)],
    "mean": [HI(1, 0, "mean")],
    "resample": [HI(0, 2, "resample")],
    "redistribute": [HI(0, 1, "redistribute", keep=0.3, rho=0.2)],
    "redistribute_span": [HI(0, 2, "redistribute", keep=0.3, rho=0.5, span=(2, 6))],
    "composed": [HI(0, 1, "softpag", u=0.3), HI(0, 1, "redistribute", keep=0.2, rho=0.1, span=(1, 5)),
                 HI(0, 1, "redistribute", keep=0.5, rho=0.1), HI(0, 1, "scale", alpha=1.5),
                 HI(1, 3, "resample"), HI(1, 3, "scale", alpha=0.5)],
}


# ------------------------------------------------------------------ isolation
def test_patching_clean_z_back_restores_exact_output(tiny_llama, batch):
    clean_store = {}
    name = hook_name(1, "z")
    clean = tiny_llama.run(batch, fwd_hooks=[_record(clean_store, name)])

    def patch_back(z, hook):
        z = z.clone()
        z[:, :, 2] = clean_store[name][:, :, 2]
        return z
    spec = InterventionSet([HI(1, 2, "zero")])
    ablated = tiny_llama.run(batch, interventions=spec)
    restored = tiny_llama.run(batch, interventions=spec, fwd_hooks=[(name, patch_back)])
    assert not torch.equal(ablated, clean)
    assert torch.equal(restored, clean)


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3)])
def test_zero_ablation_touches_only_its_head(tiny_llama, batch, layer, head):
    clean, ablated = {}, {}
    names = [hook_name(li, "z") for li in range(layer + 1)]
    tiny_llama.run(batch, fwd_hooks=[_record(clean, n) for n in names])
    spec = InterventionSet([HI(layer, head, "zero")])
    tiny_llama.run(batch, interventions=spec, fwd_hooks=[_record(ablated, n) for n in names])
    for li in range(layer):
        assert torch.equal(ablated[names[li]], clean[names[li]])
    others = [h for h in range(tiny_llama.n_heads) if h != head]
    assert torch.equal(ablated[names[layer]][:, :, others], clean[names[layer]][:, :, others])
    assert ablated[names[layer]][:, :, head].abs().max() == 0
    assert clean[names[layer]][:, :, head].abs().max() > 0


@pytest.mark.parametrize("backend", ["sdpa", "eager", "stats"])
def test_gqa_edits_only_the_query_head(tiny_llama, batch, backend):
    """Heads 0 and 1 share KV head 0 on tiny-llama (4 query, 2 KV heads)."""
    assert tiny_llama.n_kv_heads == 2 and tiny_llama.n_heads == 4
    seen = {}
    for items in ([], [HI(0, 1, "zero")], [HI(0, 1, "softpag", u=1.0)]):
        tiny_llama.run(batch, backend=backend, interventions=InterventionSet(items),
                       fwd_hooks=[(hook_name(0, "z"), _record(seen, "z")[1])])
        if not items:
            clean = seen["z"]
            continue
        assert torch.equal(seen["z"][:, :, [0, 2, 3]], clean[:, :, [0, 2, 3]])
        assert not torch.allclose(seen["z"][:, :, 1], clean[:, :, 1])


def test_softpag_full_gives_own_value(tiny_llama, batch):
    """u = 1 makes the head attend only to itself: z_i = v_i of its KV head (GQA-mapped)."""
    store = {}
    spec = InterventionSet([HI(0, 3, "softpag", u=1.0)])
    tiny_llama.run(batch, interventions=spec,
                   fwd_hooks=[_record(store, hook_name(0, "v")), _record(store, hook_name(0, "z"))])
    v, z = store[hook_name(0, "v")], store[hook_name(0, "z")]
    assert torch.allclose(z[:, :, 3], v[:, :, 3 // 2], atol=1e-6)


# ------------------------------------------------------------------ exact no-ops
@pytest.mark.parametrize("mode", ["patterns", "stats"])
def test_identity_parameters_are_exact_noops(tiny_llama, batch, mode):
    clean = ir.forward(tiny_llama, batch, mode=mode)
    spec = InterventionSet([HI(0, 1, "scale", alpha=1.0), HI(1, 2, "softpag", u=0.0),
                            HI(0, 3, "redistribute", keep=1.0, rho=0.0)])
    assert torch.equal(ir.forward(tiny_llama, batch, spec, mode=mode), clean)


# ------------------------------------------------------------------ rules
def test_redistribute_rule_by_hand():
    probs = torch.tensor([[0.6, 0.1, 0.2, 0.1],   # span mass 0.3, non-sink share 1 -> selected
                          [0.9, 0.05, 0.03, 0.02],  # span mass 0.08 < 0.2 -> untouched
                          [0.5, 0.0, 0.0, 0.5]])   # no weight on span cols 1,2 -> untouched
    is_sink = torch.tensor([True, False, False, False])
    in_span = torch.tensor([False, True, True, False])
    new = probs + redistribute_delta(probs, is_sink, in_span, keep=0.6, rho=0.5)
    omega = 0.4 * 0.6
    expected0 = torch.tensor([0.36, 0.1 + omega / 3, 0.2 + 2 * omega / 3, 0.1])
    assert torch.allclose(new[0], expected0)
    assert torch.equal(new[1:], probs[1:])
    assert torch.allclose(new.sum(-1), probs.sum(-1))


def test_redistribute_moves_sink_mass_in_patterns(tiny_llama, batch):
    store = {}
    item = HI(0, 2, "redistribute", keep=0.25, rho=0.0)
    tiny_llama.run(batch, fwd_hooks=[_record(store, hook_name(0, "pattern"))])
    clean = store.pop(hook_name(0, "pattern"))[:, 2]
    spec = InterventionSet([item])
    tiny_llama.run(batch, interventions=spec, fwd_hooks=[_record(store, hook_name(0, "pattern"))])
    new = store[hook_name(0, "pattern")][:, 2]
    rows = batch.mask[:, 1:]
    sink_ratio = new[:, 1:, 0][rows] / clean[:, 1:, 0][rows]
    assert torch.allclose(sink_ratio, torch.full_like(sink_ratio, 0.25), atol=1e-5)
    assert torch.allclose(new.sum(-1), clean.sum(-1), atol=1e-5)
    assert torch.equal(new[:, 0], clean[:, 0])  # query 0 only sees the sink: nothing to move


def test_reference_rules():
    z = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3, 1)  # sample 0: 0,1,2; sample 1: 3,4,(5 pad)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ref = ReferenceZ(z, mask)
    positions = torch.arange(5)
    mean = ref.mean_at(positions)[:, 0]
    assert torch.allclose(mean, torch.tensor([1.5, 2.5, 2.0, 2.0, 2.0]))  # past the reference: pooled
    res = ref.resample_at(3, positions)[..., 0]
    assert torch.allclose(res[0], torch.tensor([3.0, 4.0, 3.5, 3.5, 3.5]))  # from sample 1, then its mean
    assert torch.allclose(res[1], torch.tensor([0.0, 1.0, 2.0, 1.0, 1.0]))  # from sample 0
    assert torch.allclose(res[2], res[0])


def test_mean_with_own_batch_is_per_position_mean(tiny_llama, batch):
    store, clean = {}, {}
    name = hook_name(1, "z")
    tiny_llama.run(batch, fwd_hooks=[_record(clean, name)])
    spec = InterventionSet([HI(1, 0, "mean")], reference=batch)
    tiny_llama.run(batch, interventions=spec, fwd_hooks=[_record(store, name)])
    z, m = clean[name][:, :, 0], batch.mask.float()[..., None]
    expected = (z * m).sum(0) / m.sum(0)
    assert torch.allclose(store[name][:, :, 0], expected.expand_as(z), atol=1e-6)


# ------------------------------------------------------------------ modes agree
@pytest.mark.parametrize("case", list(CASES))
def test_modes_agree_forward_and_loss(tiny_llama, batch, reference, case):
    spec = InterventionSet(CASES[case], reference=reference)
    clean = ir.forward(tiny_llama, batch)
    patterns = ir.forward(tiny_llama, batch, spec, mode="patterns")
    stats = ir.forward(tiny_llama, batch, spec, mode="stats")
    real = batch.mask
    assert (patterns - clean)[real].abs().max() > 1e-3, "the intervention changed nothing"
    assert (patterns - stats)[real].abs().max() < 1e-4
    loss_p = ir.loss(tiny_llama, batch, spec, mode="patterns")
    loss_s = ir.loss(tiny_llama, batch, spec, mode="stats")
    assert abs(float(loss_p - loss_s)) < 1e-4
    assert abs(float(loss_p - ir.loss(tiny_llama, batch))) > 1e-5


def test_modes_agree_generation_and_topk(tiny_llama, reference):
    spec = InterventionSet([HI(0, 1, "softpag", u=0.8), HI(1, 0, "mean"), HI(0, 2, "resample"),
                            HI(0, 3, "redistribute", keep=0.2, rho=0.3), HI(1, 1, "scale", alpha=3.0)],
                           reference=reference)
    prompt = "The quick brown fox"
    plain = ir.generate(tiny_llama, prompt, max_new_tokens=8)
    texts = {mode: ir.generate(tiny_llama, prompt, spec, max_new_tokens=8, mode=mode) for mode in ("patterns", "stats")}
    assert texts["patterns"] == texts["stats"]
    assert texts["patterns"] != plain
    top_p = ir.next_token_topk(tiny_llama, prompt, spec, k=5, mode="patterns")
    top_s = ir.next_token_topk(tiny_llama, prompt, spec, k=5, mode="stats")
    assert [t for t, _ in top_p] == [t for t, _ in top_s]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(top_p, top_s))
    assert top_p != ir.next_token_topk(tiny_llama, prompt, k=5)


def test_generation_step_matches_forward(tiny_llama, reference):
    """Each greedy step with interventions equals the argmax of an intervened full forward."""
    spec = InterventionSet([HI(0, 1, "zero"), HI(1, 2, "mean")], reference=reference)
    prompt = "Mary and John"
    text = ir.generate(tiny_llama, prompt, spec, max_new_tokens=3, mode="stats")
    ids = tiny_llama.encode(prompt)
    for _ in range(3):
        logits = ir.forward(tiny_llama, tiny_llama.batch_from_ids([ids]), spec)
        ids = torch.cat([ids, logits[0, -1].argmax().reshape(1)])
    assert tiny_llama.tokenizer.decode(ids[len(tiny_llama.encode(prompt)):], skip_special_tokens=True) == text


# ------------------------------------------------------------------ scoping
def test_no_hook_survives_a_raising_call(tiny_llama, batch):
    before = _hook_counts(tiny_llama)
    clean = tiny_llama.run(batch)

    def boom(z, hook):
        raise RuntimeError("boom")
    spec = InterventionSet([HI(0, 1, "softpag", u=0.5), HI(1, 0, "zero")])
    with pytest.raises(RuntimeError, match="boom"):
        tiny_llama.run(batch, interventions=spec, fwd_hooks=[(hook_name(1, "z"), boom)])
    assert _hook_counts(tiny_llama) == before
    assert torch.equal(tiny_llama.run(batch), clean)
    ir.forward(tiny_llama, batch, spec)
    assert _hook_counts(tiny_llama) == before
    assert torch.equal(tiny_llama.run(batch), clean)


def test_nothing_survives_a_raising_stats_call(tiny_llama, batch):
    """A recorder that raises mid-forward leaves no call state, attention switch or edit behind."""
    clean = ir.forward(tiny_llama, batch, mode="stats")
    config = tiny_llama.bridge.original_model.config
    implementation = config._attn_implementation

    def boom(call, result):
        raise RuntimeError("boom")
    spec = InterventionSet([HI(0, 1, "softpag", u=0.5)])
    with pytest.raises(RuntimeError, match="boom"):
        forward_module.run(tiny_llama, batch, backend="stats", edits=spec.compile(tiny_llama, batch), recorders=[boom])
    assert STATE.get() is None
    assert config._attn_implementation == implementation
    assert not any("forward" in vars(m) for m in tiny_llama.bridge.modules())
    assert torch.equal(ir.forward(tiny_llama, batch, mode="stats"), clean)


# ------------------------------------------------------------------ validation
BAD = [
    (HI(2, 0, "zero"), "layer index 2"),
    (HI(0, 4, "zero"), "head index 4"),
    (HI(0, 0, "scale", alpha=-1.0), "alpha"),
    (HI(0, 0, "softpag", u=1.5), "u=1.5"),
    (HI(0, 0, "redistribute", keep=-0.1), "keep"),
    (HI(0, 0, "redistribute", rho=2.0), "rho"),
    (HI(0, 0, "redistribute", span=(5, 5)), "span"),
    (HI(0, 0, "redistribute", span=(2, 60)), "past the input"),
    (HI(1, 0, "redistribute"), "last layer"),
    (HI(0, 0, "redistribute", sink_positions=()), "sink_positions"),
    (HI(0, 0, "mean"), "reference"),
    (HI(0, 0, "resample"), "reference"),
]


@pytest.mark.parametrize("item,message", BAD)
@pytest.mark.parametrize("mode", ["patterns", "stats"])
def test_bad_interventions_fail_before_running(tiny_llama, batch, monkeypatch, item, message, mode):
    def no_run(*args, **kwargs):
        raise AssertionError("the model ran before validation")
    monkeypatch.setattr(tiny_llama, "run", no_run)
    monkeypatch.setattr(forward_module, "run", no_run)
    monkeypatch.setattr(ir, "run", no_run)
    with pytest.raises(InputError, match=message):
        ir.forward(tiny_llama, batch, InterventionSet([HI(0, 1, "zero"), item]), mode=mode)


def test_bad_calls(tiny_llama, tiny_bert, batch):
    with pytest.raises(InputError, match="unknown mode"):
        ir.forward(tiny_llama, batch, mode="sdpa")
    with pytest.raises(InputError, match="encoder"):
        ir.generate(tiny_bert, "hello there")
    with pytest.raises(InputError, match="encoder"):
        ir.loss(tiny_bert, tiny_bert.tokenize(["hello there"]))
    with pytest.raises(InputError, match="max_new_tokens"):
        ir.generate(tiny_llama, "hello", max_new_tokens=0)
    with pytest.raises(InputError, match="k=0"):
        ir.next_token_topk(tiny_llama, "hello", k=0)
    with pytest.raises(InputError, match="HeadIntervention"):
        InterventionSet(["L0H1:zero"])
    with pytest.raises(InputError, match="TokenBatch"):
        ir.forward(tiny_llama, batch, InterventionSet([HI(0, 1, "mean")], reference=["some text"]))


def test_parse_round_trip_and_errors(reference):
    text = "L3H2:zero, L5H1:scale=2, L7H0:softpag=0.5, L4H4:mean, L4H1:redistribute=0.6;rho=0.4;span=3:9;sinks=0+1"
    spec = parse_interventions(text, reference=reference)
    assert [i.kind for i in spec] == ["zero", "scale", "softpag", "mean", "redistribute"]
    assert spec.items[1].alpha == 2.0 and spec.items[2].u == 0.5
    assert spec.items[4] == HI(4, 1, "redistribute", keep=0.6, rho=0.4, span=(3, 9), sink_positions=(0, 1))
    assert parse_interventions(spec.text).items == spec.items
    for bad, message in [("L3:zero", "cannot parse"), ("L3H2:ablate", "unknown intervention"),
                         ("L3H2:zero=2", "takes no value"), ("L3H2:scale=x", "not a number"),
                         ("L3H2:redistribute;foo=1", "unknown option"), ("", "no intervention")]:
        with pytest.raises(InputError, match=message):
            parse_interventions(bad)
    assert ir.as_intervention_set("L0H1:zero").items == (HI(0, 1, "zero"),)
    assert len(ir.as_intervention_set(None)) == 0
