"""Cost estimates of slow jobs (issue 13, "show an estimated cost for slow probes"): each probe's
:meth:`probes.base.Probe.cost_forwards` against the forwards it really runs, counted on tiny-llama
with a hook on every decoder block (token × layer passes / (layers × input width)); wall time on
this shared machine is too noisy to assert (tiny-llama's forward is mostly call overhead, so its
estimates run ~20× high). Measured once on SmolLM2-135M (2 loaded CPU cores, ioi × 4, measured
forward 0.63 s): importance ablation_zero on 27 heads estimated 71 s, ran 29 s; attribution
estimated 2.5 s, ran 2.2 s."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from probes.pipeline import analyze
from probes.registry import PROBES
from workbench.data import load_dataset


@contextmanager
def counted_forwards(model, width: int):
    """Yields a list whose ``sum()`` after the block is the forward-equivalents of ``width``-token
    inputs that ran (each decoder block call adds its tokens / (n_layers × width))."""
    passes: list[float] = []

    def hook(_module, args, kwargs, _out):
        hidden = args[0] if args else kwargs["hidden_states"]
        passes.append(hidden.shape[0] * hidden.shape[1] / (model.n_layers * width))
    handles = [layer.register_forward_hook(hook, with_kwargs=True)
               for layer in model.bridge.original_model.model.layers]
    try:
        yield passes
    finally:
        for handle in handles:
            handle.remove()


# probe, dataset, samples, most the estimate may exceed the counted forwards (a backward counts 2
# forwards in the estimate and no block call; importance's ablated copies start at their layer)
CASES = [("importance", "ioi", 8, 1.6), ("hess", "ioi", 4, 3.0), ("attribution", "ioi", 8, 1.0),
         ("vhd", "context_qa", 4, 1.0)]


@pytest.mark.parametrize("name, dataset, samples, slack", CASES)
def test_cost_forwards_bounds_the_forwards_a_probe_runs(tiny_llama, name, dataset, samples, slack):
    batch = load_dataset(dataset, tiny_llama, n=samples)
    width = batch.tokens.shape[1]
    estimate = PROBES[name]().cost_forwards(tiny_llama.n_layers, tiny_llama.n_heads, width, samples)
    with counted_forwards(tiny_llama, width) as passes:
        analyze(tiny_llama, batch, probes=name, progress=False)
    ran = sum(passes)
    assert ran <= estimate * 1.001 <= slack * ran * 1.002, (name, ran, estimate)


def test_capture_probes_cost_about_one_capture_and_sinks_one_scan_more(tiny_llama):
    batch = load_dataset("ioi", tiny_llama, n=8)
    width = batch.tokens.shape[1]
    for name in ("stats", "detectors", "sparsity", "retrieval"):
        assert PROBES[name]().cost_forwards(2, 4, width, 8) is None
    with counted_forwards(tiny_llama, width) as capture_only:
        analyze(tiny_llama, batch, probes="stats", progress=False)
    with counted_forwards(tiny_llama, width) as with_sinks:
        analyze(tiny_llama, batch, probes="sinks", progress=False)
    extra = sum(with_sinks) - sum(capture_only)
    assert extra == pytest.approx(PROBES["sinks"]().cost_forwards(2, 4, width, 8))


def test_cost_follows_the_probe_settings():
    full = PROBES["importance"]().cost_forwards(30, 9, 40, 8)
    zero_only = PROBES["importance"](["ablation_zero"]).cost_forwards(30, 9, 40, 8)
    assert zero_only == 8 * (1 + 270)
    assert full == 8 * (1 + 3 * 270 + 3 + 3 + 1 + 270)
    assert PROBES["importance"](["ablation_zero"], layers=[0], heads=[1, 2]).cost_forwards(30, 9, 40, 8) == 8 * 3
    assert PROBES["retrieval"](generate=True).cost_forwards(30, 9, 1024, 5) == 10
    # HeSS: its bundled other set (8 × 257 tokens) dominates a short prompt
    assert PROBES["hess"]().cost_forwards(30, 9, 10, 1) == pytest.approx(3 * (1 + 8 * 257 / 10))


def test_patching_forwards_counts_every_patched_copy(tiny_llama):
    from app.web.services.patching import ioi_example, patching_forwards
    from workbench.patching import patch_table, setup

    item = ioi_example(0)
    pair = setup(tiny_llama, [item["prompt"]], [item["corrupt_prompt"]], [item["answer"]], None, "logprob")
    width = pair.clean.tokens.shape[1]
    with counted_forwards(tiny_llama, width) as passes:
        patch_table(tiny_llama, pair, "z")
        patch_table(tiny_llama, pair, "resid")
    assert sum(passes) == pytest.approx(patching_forwards(tiny_llama.n_layers, tiny_llama.n_heads, width))


def test_app_estimate_scales_the_measured_forward(ws, analysis):
    from app.web.services.headmap import estimate_seconds, probe_cost_note

    n_layers, n_heads = len(analysis.capture.layers), len(analysis.capture.heads)
    forwards = PROBES["importance"]().cost_forwards(n_layers, n_heads, 40, 8)
    seconds = estimate_seconds(analysis, "importance", n_layers, n_heads, 8, 40)
    from app.web.services.cost import forward_flops
    from workbench.model import load_model

    model = load_model(analysis.model_name)
    ratio = forward_flops(model, 40) / forward_flops(model, analysis.n_tokens)
    assert seconds == pytest.approx(forwards * analysis.forward_s * ratio)
    n = 1000  # the arithmetic, written out: 2 × block parameters per token + 2·n²·d_head per head and layer
    blocks = sum(p.numel() for p in model.bridge.original_model.model.layers.parameters())
    blocks += model.bridge.original_model.model.norm.weight.numel()
    attention = 2 * n * n * model.d_head * model.n_heads * model.n_layers
    assert forward_flops(model, n) == pytest.approx(2 * blocks * n + attention)
    assert estimate_seconds(analysis, "stats", n_layers, n_heads) is None
    note = probe_cost_note(ws, analysis, "importance", "ioi", 8)
    assert note.startswith("importance on 8 samples of ioi: ~") and "forwards of one" in note
    assert probe_cost_note(ws, analysis, "detectors", None, 1) == ""


def test_patching_and_long_context_pages_estimate_from_the_analysis(ws, analysis):
    from app.web.services import long_context, patching

    session = {"analysis": next(k for k, v in ws.analyses._items.items() if v is analysis)}
    item = patching.ioi_example(0)
    note = patching.estimate_note(ws, session, "tiny-llama", item["prompt"])
    assert note.startswith("patching every head and every layer × position: ~") and "up to" in note
    assert patching.estimate_note(ws, session, "tiny-gpt2", item["prompt"]) == ""  # no forward of that model
    note = long_context.estimate_note(ws, session, "tiny-llama", 512, [0.5, 0.9])
    assert note.startswith("2 needle captures: ~2 forwards of one 512-token input, roughly")
