"""The one pipeline (probes.pipeline.analyze) and the CLI on top of it: same numbers as the
separate steps, progress and prompt cancel in every phase, subsets swept only, cheap inputs
checked before the model loads."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import workbench as wb
from app.cli import main
from probes import Detectors, PatternStats, analyze
from workbench.errors import InputError
from workbench.forward import run
from workbench.progress import Cancelled

PROMPTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
           "When Mary and John went to the store, John gave a drink to Mary.",
           "One two three four five six seven eight nine ten eleven twelve."]


def test_pipeline_equals_the_separate_steps(tiny_llama):
    batch = tiny_llama.tokenize(PROMPTS)
    result = analyze(tiny_llama, batch, probes="stats,detectors", mode="stats", progress=False)
    cap = wb.capture(tiny_llama, batch, mode="stats", progress=False)
    expected = pd.concat([PatternStats().fit(cap).to_frame(), Detectors().fit(cap).to_frame()], ignore_index=True)
    pd.testing.assert_frame_equal(result.table, expected)
    assert result.mode == "stats" and result.capture is not None
    assert analyze(tiny_llama, batch, progress=False).mode == "patterns"  # auto: short input


def test_progress_reports_every_stage_and_layer(tiny_llama):
    seen: list[tuple[float, str]] = []
    analyze(tiny_llama, PROMPTS, probes="stats,importance", metrics="entropy,ablation_zero",
            progress=lambda f, m: seen.append((f, m)))
    messages = " | ".join(m for _, m in seen)
    assert "capture (" in messages and "layer 2/2" in messages and "probe importance" in messages
    assert "ablated copies" in messages and "s left" in messages
    fractions = [f for f, _ in seen]
    assert all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)


def test_cancel_lands_inside_a_model_based_probe(tiny_llama):
    """Cancel during the importance sweep stops at the next attention call, not at the end."""
    from probes.importance import HeadImportance

    seen: list[str] = []
    state = {"armed": False, "checks": 0}

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        state["armed"] = state["armed"] or "ablated copies" in message

    def cancel() -> bool:
        state["checks"] += state["armed"]
        return state["armed"]

    probe = HeadImportance(["ablation_zero"], tokens_per_forward=16)  # one ablated copy per forward
    with pytest.raises(Cancelled):
        analyze(tiny_llama, PROMPTS, probes=[probe], progress=progress, cancel=cancel)
    assert state["checks"] == 1  # the first check after the cancel raised
    assert [m for m in seen if "ablated copies" in m][-1].startswith("probe importance 0/1: 1/8 ablated copies")
    logits = run(tiny_llama, tiny_llama.tokenize(PROMPTS))  # the model is intact
    assert torch.isfinite(logits).all()


def test_model_based_probes_sweep_only_the_selection(tiny_llama):
    seen: list[str] = []
    result = analyze(tiny_llama, PROMPTS, probes="importance", metrics="ablation_zero", layers=[1], heads=[0, 2],
                     progress=lambda f, m: seen.append(m))
    assert set(result.table["layer"]) == {1} and set(result.table["head"]) == {0, 2}
    assert any("/2 ablated copies" in m for m in seen)  # two heads ablated, not all eight


def test_hooks_that_cannot_fire_are_refused(tiny_llama):
    batch = tiny_llama.tokenize(PROMPTS)
    with pytest.raises(InputError, match="does not fire"):
        run(tiny_llama, batch, fwd_hooks=[("blocks.0.attn.hook_attn_scores", lambda x, hook: x)])
    with pytest.raises(InputError, match="eager"):
        wb.capture(tiny_llama, batch, mode="stats", fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)],
                   progress=False)


def test_a_probe_that_cannot_run_is_noted(tiny_bert):
    result = analyze(tiny_bert, PROMPTS, probes="stats,importance", on_error="note", progress=False)
    assert "encoder" in result.notes["importance"] and set(result.table["probe"]) == {"stats"}


def test_cli_interventions_device_dtype_and_manifest(tmp_path, tiny_llama):
    out = tmp_path / "run"
    assert main(["analyze", "--model", "tiny-llama", "--dataset", "induction", "--n", "2", "--probes", "stats",
                 "--interventions", "L0H1:softpag=0.5, L1H2:mean", "--dtype", "fp32", "--out", str(out),
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["interventions"] == "L0H1:softpag=0.5, L1H2:mean"
    assert manifest["mode"] == "patterns" and manifest["dtype"] == "float32"
    clean = tmp_path / "clean"
    assert main(["analyze", "--model", "tiny-llama", "--dataset", "induction", "--n", "2", "--probes", "stats",
                 "--out", str(clean), "--no-progress"]) == 0
    edited, plain = (pd.read_parquet(p / "heads.parquet").set_index(["layer", "head", "metric"])["value"]
                     for p in (out, clean))
    assert abs(edited[(0, 1, "self_mass")] - plain[(0, 1, "self_mass")]) > 0.05


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nope"], "unknown dataset"),
    (["--probes", "stats,nope"], "unknown probe"),
    (["--metrics", "nope"], "unknown metric"),
    (["--interventions", "L0H1:bad"], "unknown intervention"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--device", "tpu"], "unknown device"),
    (["--n", "0"], "--n must be a positive integer"),
    (["--out", "/proc/no/such/run"], "cannot write the run folder"),
])
def test_cheap_inputs_fail_before_the_model_loads(monkeypatch, capsys, args, message):
    import workbench.model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(workbench.model, "load_model", no_load)
    assert main(["analyze", "--model", "tiny-llama", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
