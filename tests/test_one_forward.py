"""One model, one forward: the same parameter tensors in every backend, and every intervention
kind giving the same statistics and logits in both capture modes."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench import intervened_run as ir
from workbench.attention_backend import STATE
from workbench.errors import InputError
from workbench.forward import run
from workbench.interventions import HeadIntervention as HI, InterventionSet
from workbench.pattern_rows import DETECTOR_ROWS, STAT_NAMES
from workbench.progress import Cancelled, Progress, reporting

PROMPTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
           "When Mary and John went to the store, John gave a drink to Mary."]


def _kinds(layer: int, head: int, reference) -> dict[str, InterventionSet]:
    """One set per intervention kind (and one composed set) on query head ``(layer, head)``."""
    items = {
        "zero": [HI(layer, head, "zero")],
        "mean": [HI(layer, head, "mean")],
        "resample": [HI(layer, head, "resample")],
        "scale": [HI(layer, head, "scale", alpha=2.5)],
        "softpag": [HI(layer, head, "softpag", u=0.5)],
        "redistribute": [HI(layer, head, "redistribute", keep=0.3, rho=0.2)],
        "composed": [HI(layer, head, "softpag", u=0.3), HI(layer, head, "redistribute", keep=0.2, rho=0.1),
                     HI(layer, head, "scale", alpha=1.5), HI(layer + 1, head, "resample")],
    }
    return {kind: InterventionSet(list_, reference=reference) for kind, list_ in items.items()}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    """|a - b| <= tol (1 + |b|): absolute for probabilities, relative for distances and logits."""
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _assert_same(a, b, tol: float) -> None:
    for name in STAT_NAMES + DETECTOR_ROWS:
        _close(a.row_stats[name], b.row_stats[name], tol, name)
    _close(a.received, b.received, tol, "received")
    _close(a.received_normalized, b.received_normalized, tol, "received_normalized")


def _matrix(model, batch, layer: int, head: int, tol: float) -> None:
    clean = wb.capture(model, batch, mode="stats", progress=False)
    clean_logits = ir.forward(model, batch)
    for kind, spec in _kinds(layer, head, batch).items():
        patterns = wb.capture(model, batch, mode="patterns", interventions=spec, progress=False)
        stats = wb.capture(model, batch, mode="stats", interventions=spec, progress=False)
        _assert_same(patterns, stats, tol)
        changed = max(float((stats.row_stats[n] - clean.row_stats[n]).nan_to_num().abs().max()) for n in STAT_NAMES)
        if kind in ("softpag", "redistribute", "composed"):  # the statistics describe the edited pattern
            assert changed > 1e-3, f"{kind}: the capture did not see the edited pattern"
        logits = {mode: ir.forward(model, batch, spec, mode=mode) for mode in (None, "patterns", "stats")}
        real = batch.mask
        _close(logits["patterns"][real], logits["stats"][real], tol, f"{kind} logits")
        _close(logits[None][real], logits["stats"][real], tol, f"{kind} logits")
        assert (logits[None] - clean_logits)[real].abs().max() > 1e-4, f"{kind} changed nothing"


def test_every_intervention_kind_agrees_in_both_modes_tiny(tiny_llama):
    _matrix(tiny_llama, tiny_llama.tokenize(PROMPTS), layer=0, head=1, tol=1e-4)


@pytest.mark.smollm2
def test_every_intervention_kind_agrees_in_both_modes_smollm2(smollm2):
    batch = wb.load_dataset("calibration", smollm2, seq_len=256, n=2)  # two samples: mean/resample differ
    assert batch.tokens.shape == (2, 256)
    _matrix(smollm2, batch, layer=3, head=4, tol=1e-4)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
def test_every_backend_runs_on_the_same_parameter_tensors(name, request):
    """No second copy: each backend's forward reads exactly the bridge's parameter storage."""
    model = request.getfixturevalue(name)
    batch = model.tokenize(PROMPTS)
    owned = {p.data_ptr() for p in model.bridge.parameters()}
    assert owned == {p.data_ptr() for p in model.bridge.original_model.parameters()}
    seen: dict[str, set[int]] = {}
    for backend in ("sdpa", "eager", "stats"):
        used: set[int] = set()
        handles = [m.register_forward_pre_hook(lambda mod, args, used=used: used.update(
            p.data_ptr() for p in mod.parameters(recurse=False))) for m in model.bridge.modules()]
        try:
            run(model, batch, backend=backend)
        finally:
            for handle in handles:
                handle.remove()
        seen[backend] = used
    assert seen["sdpa"] == seen["eager"] == seen["stats"]
    assert seen["stats"] <= owned and seen["stats"]  # (norms read their weights functionally: not every one is seen)
    assert not hasattr(model, "kernel_model")


def test_the_attention_switch_is_scoped_even_on_cancel(tiny_llama):
    """A cancel mid-forward leaves no call state, no switched attention, no instance override."""
    batch = tiny_llama.tokenize(PROMPTS)
    config = tiny_llama.bridge.original_model.config
    before = config._attn_implementation
    progress = Progress(cancel=lambda: True)
    with pytest.raises(Cancelled), reporting(progress):
        run(tiny_llama, batch, backend="stats")
    assert STATE.get() is None and config._attn_implementation == before
    assert not any("forward" in vars(m) for m in tiny_llama.bridge.modules())
    out = tiny_llama.bridge(batch.tokens, attention_mask=batch.mask.long())
    torch.testing.assert_close(out[batch.mask], run(tiny_llama, batch)[batch.mask], rtol=1e-4, atol=1e-5)


def test_loaded_models_are_accepted(tiny_llama):
    """A TransformerBridge or Hugging Face model already in memory works as the model."""
    bridge_model = wb.load_model(tiny_llama.bridge)
    assert bridge_model.bridge is tiny_llama.bridge
    cap = wb.capture(tiny_llama.bridge, PROMPTS[0], progress=False)
    assert cap.layers == [0, 1]
    assert wb.load_model(tiny_llama.bridge.original_model) is tiny_llama  # its owner, not a second bridge
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_llama.folder))
    wrapped = wb.load_model(fresh)
    assert wrapped.n_layers == tiny_llama.n_layers and wrapped.bridge.original_model is fresh
    batch = tiny_llama.tokenize(PROMPTS)
    torch.testing.assert_close(run(wrapped, batch)[batch.mask], run(tiny_llama, batch)[batch.mask])
    assert ir.loss(tiny_llama, PROMPTS).ndim == 0  # strings accepted like capture does
    assert ir.forward(tiny_llama, PROMPTS[0]).shape[0] == 1


def test_tiles_of_a_pattern_edited_head_are_refused_in_stats_mode(tiny_llama):
    """Its saved LSE describes the unedited map: no wrong tile is shown; other heads still work."""
    cap = wb.capture(tiny_llama, PROMPTS, mode="stats", keep_qk=True, interventions="L0H1:softpag=0.5",
                     progress=False)
    with pytest.raises(InputError, match="patterns mode"):
        cap.pattern(0, 1, 0)
    patterns = wb.capture(tiny_llama, PROMPTS, mode="patterns", keep_patterns=True, interventions="L0H1:softpag=0.5",
                          progress=False)
    torch.testing.assert_close(cap.pattern(0, 2, 0), patterns.pattern(0, 2, 0), rtol=1e-5, atol=1e-5)
