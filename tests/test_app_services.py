"""Fast, non-browser tests of the Dash app's service layer and job manager (tiny-llama)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from app.web.jobs import Cancelled, JobContext, JobManager
from app.web.services import analysis as svc
from app.web.services import atlas as atlas_svc
from app.web.services import headmap, intervene, patterns, runs, safe
from app.web.services.workspace import Limits, Workspace
from workbench.errors import InputError, WorkbenchError

from app_support import PROMPT, run_job


# ---------------------------------------------------------------- job manager
def test_job_manager_reports_progress_result_and_errors():
    jobs = JobManager(max_workers=1)
    gate = threading.Event()

    def slow(ctx: JobContext):
        ctx.progress(0.5, "half way")
        gate.wait(5)
        return 42

    job = jobs.submit("slow", slow)
    deadline = time.time() + 5
    while jobs.status(job)["message"] != "half way" and time.time() < deadline:
        time.sleep(0.01)
    assert jobs.status(job)["state"] == "running" and jobs.status(job)["progress"] == 0.5
    with pytest.raises(InputError, match="running"):
        jobs.result(job)
    gate.set()
    assert jobs.wait(job)["state"] == "done" and jobs.result(job) == 42

    def user_error(ctx):
        raise InputError("bad prompt: fix it")

    def bug(ctx):
        raise ZeroDivisionError("oops")

    assert jobs.wait(jobs.submit("e", user_error))["error"] == "bad prompt: fix it"
    status = jobs.wait(jobs.submit("b", bug))
    assert status["state"] == "error" and "ZeroDivisionError" in status["error"]
    with pytest.raises(InputError, match="unknown or expired job"):
        jobs.status("nope")
    jobs.shutdown()


def test_cancel_stops_a_running_job_at_its_next_check_and_skips_a_queued_one():
    jobs = JobManager(max_workers=1)
    steps = []

    def loop(ctx):
        for i in range(500):
            ctx.progress(i / 500, f"step {i}")
            steps.append(i)
            time.sleep(0.01)
        return "finished"

    running = jobs.submit("loop", loop)
    queued = jobs.submit("never", lambda ctx: steps.append("queued ran"))
    while not steps:
        time.sleep(0.01)
    assert jobs.cancel(running) and jobs.cancel(queued)
    assert jobs.wait(running)["state"] == "cancelled"
    assert jobs.wait(queued)["state"] == "cancelled"
    assert "queued ran" not in steps and len(steps) < 500
    assert not jobs.cancel(running)  # already finished
    jobs.shutdown()


def test_model_jobs_take_turns_and_say_where_they_wait():
    """Issue 13 bug 6: a job behind another session's model job says so, with its place in the
    queue, and a cancel there is immediate; tokenizer-only jobs do not wait."""
    jobs = JobManager(max_workers=2)
    gate = threading.Event()
    first = jobs.submit("long", lambda ctx: (ctx.progress(0.5, "probe sinks"), gate.wait(10)))
    second = jobs.submit("short", lambda ctx: "second ran")
    third = jobs.submit("short", lambda ctx: "third ran")
    quick = jobs.submit("example", lambda ctx: "no model needed", uses_model=False)
    assert jobs.wait(quick, 5)["state"] == "done"
    deadline = time.time() + 5
    while jobs.status(second)["state"] != "waiting" and time.time() < deadline:
        time.sleep(0.01)
    status = jobs.status(second)
    assert status["state"] == "waiting" and status["position"] == 1
    assert "waiting for the model (another job is running): position 1" in status["message"]
    assert jobs.status(third)["position"] == 2 and jobs.status(first)["message"] == "probe sinks"
    start = time.time()
    assert jobs.cancel(second)
    assert jobs.wait(second, 2)["state"] == "cancelled" and time.time() - start < 1.0
    assert jobs.status(third)["position"] == 1
    assert jobs.cancel(first) and jobs.status(first)["state"] == "cancelling"
    assert jobs.status(first)["message"].startswith("cancelling")
    gate.set()
    assert jobs.wait(third, 5)["state"] == "done" and jobs.result(third) == "third ran"
    jobs.shutdown()


# ---------------------------------------------------------------- model & prompt
def test_analysis_captures_every_head_and_scores_it(analysis, tiny_llama):
    assert analysis.mode == "patterns"
    assert analysis.tokens == tiny_llama.str_tokens(tiny_llama.encode(PROMPT))
    assert [t for _, t in svc.token_strip(analysis)] == analysis.tokens
    frame = analysis.frame
    assert {"stats", "detectors"} <= set(frame["probe"])
    assert len(frame[frame["metric"] == "entropy"]) == tiny_llama.n_layers * tiny_llama.n_heads
    assert f"{analysis.n_tokens} tokens, patterns mode" in svc.summary(analysis)


def test_bad_inputs_give_one_line_messages(ws, tiny_llama):
    assert safe(svc.start_analysis, ws, "tiny-llama", "   ")[1].startswith("empty prompt")
    assert safe(svc.resolve_model_name, None, "")[1].startswith("no model chosen")
    assert "is not allowed here" in safe(svc.start_analysis, ws, "no-such-model", "hello")[1]
    anything = Workspace(default_model="tiny-llama", allow_any_model=True)
    status = anything.jobs.wait(svc.start_analysis(anything, "no-such-model", "hello"), 60)
    assert status["state"] == "error" and "unknown model 'no-such-model'" in status["error"]
    anything.jobs.shutdown()
    small = Workspace(default_model="tiny-llama", limits=Limits(patterns=4, stats=8))
    status = small.jobs.wait(svc.start_analysis(small, "tiny-llama", PROMPT), 60)
    assert status["state"] == "error" and "longer than the app's limit of 8 tokens" in status["error"]
    small.jobs.shutdown()
    assert safe(svc.get_analysis, ws, {"analysis": "gone"})[1].endswith("run it again")


def test_dataset_example_text(ws, tiny_llama):
    result = run_job(ws, svc.start_example(ws, "tiny-llama", "factual", 0))
    assert result["kind"] == "example" and result["text"].strip()
    status = ws.jobs.wait(svc.start_example(ws, "tiny-llama", "factual", 10_000))
    assert status["state"] == "error" and "pick an index below" in status["error"]


@pytest.mark.parametrize("limits", [Limits(), Limits(patterns=4, stats=512)], ids=["patterns", "stats"])
def test_cancel_inside_the_capture_forward_publishes_nothing(tiny_llama, limits):
    from app.web.jobs import Job

    class CancelAtFirstLayer(JobContext):
        def progress(self, fraction, message):
            if "layer 1/" in message:
                self._job.cancel_flag.set()
            super().progress(fraction, message)

    local = Workspace(default_model="tiny-llama", limits=limits)
    job = Job(id="x", kind="analysis")
    with pytest.raises(Cancelled):
        svc.analyse(local, "tiny-llama", PROMPT, CancelAtFirstLayer(job))
    assert job.message.startswith("capture (")  # stopped inside the forward, at layer 0
    assert not local.analyses._items
    local.jobs.shutdown()
    clean = tiny_llama.run(tiny_llama.tokenize([PROMPT]))
    torch.testing.assert_close(clean, tiny_llama.run(tiny_llama.tokenize([PROMPT])))  # model still usable


def test_cancel_inside_the_sinks_scan_is_reported_and_prompt():
    """Issue 13 bug 5: the sinks probe's residual scan (one long forward on a 4k prompt) reports
    sub-progress per layer and stops at the next layer after Cancel, through the job manager."""
    jobs = JobManager(max_workers=1)
    local = Workspace(default_model="tiny-llama", jobs=jobs)
    seen = []

    def job(ctx):
        class CancelInScan(JobContext):
            def progress(self, fraction, message):
                seen.append(message)
                if "layers scanned" in message:
                    self._job.cancel_flag.set()
                super().progress(fraction, message)

        return svc.analyse(local, "tiny-llama", PROMPT, CancelInScan(ctx._job))

    status = jobs.wait(jobs.submit("analysis", job), 120)
    assert status["state"] == "cancelled"
    scanned = [m for m in seen if "layers scanned" in m]
    assert len(scanned) == 1 and "1/" in scanned[0]  # stopped at the first layer of the scan
    assert not local.analyses._items
    jobs.shutdown()


# ---------------------------------------------------------------- head map
def test_head_map_lists_metrics_and_hover_explains_them(analysis):
    options = headmap.metric_options(analysis)
    values = [o["value"] for o in options]
    assert "stats|entropy" in values and "detectors|induction" in values
    fig = headmap.headmap_figure(analysis, "detectors|induction", (1, 2))
    assert "mass on tokens right after earlier copies" in fig.data[0].hovertemplate
    assert "95% CI" in fig.data[0].hovertemplate
    assert fig.layout.shapes[0].x0 == 1.5 and fig.layout.shapes[0].y0 == 0.5  # selected head outlined
    catalog = {p["name"]: p for p in headmap.probe_catalog(analysis)}
    assert catalog["stats"]["computed"] and not catalog["stats"]["needs_model"]
    with pytest.raises(InputError, match="not computed"):
        headmap.headmap_figure(analysis, "stats|no_such_metric", None)


def test_model_probe_on_demand_adds_its_metrics(ws, tiny_llama):
    from probes.registry import PROBES

    model_probes = [name for name, cls in PROBES.items() if not cls.needs_capture]
    if not model_probes:
        pytest.skip("no model-based probe registered yet")
    fresh = ws.analyses.get(run_job(ws, svc.start_analysis(ws, "tiny-llama", PROMPT))["key"])
    name = model_probes[0]
    status = ws.jobs.wait(headmap.start_probe(ws, fresh, name, "calibration", 2), 300)
    assert status["state"] == "done", status
    assert name in set(fresh.frame["probe"]) and fresh.sources[name] == "calibration ×2"
    assert any(o["value"].startswith(f"{name}|") for o in headmap.metric_options(fresh))
    with pytest.raises(InputError, match="unknown probe"):
        headmap.start_probe(ws, fresh, "nope")


# ---------------------------------------------------------------- pattern viewer
def test_pattern_view_is_exact_and_labelled(analysis):
    fig, view, info = patterns.pattern_view(analysis, 1, 2)
    expected = analysis.capture.pattern(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(fig.data[0].z), expected, atol=1e-6)
    assert view == {"kind": "tile", "q0": 0, "q1": analysis.n_tokens, "k0": 0, "k1": analysis.n_tokens}
    assert fig.data[0].y[1].startswith("1:")
    row = patterns.row_view(analysis, 1, 2, 5)
    np.testing.assert_allclose(np.asarray(row.data[0].y), expected[5, :6], atol=1e-6)
    with pytest.raises(InputError, match="outside the prompt"):
        patterns.row_view(analysis, 1, 2, 999)
    with pytest.raises(InputError, match="out of range|not captured"):
        patterns.pattern_view(analysis, 9, 0)


def test_zoom_events_map_to_token_regions():
    tile = {"kind": "tile", "q0": 10, "q1": 30, "k0": 5, "k1": 25}
    event = {"xaxis.range[0]": 1.6, "xaxis.range[1]": 6.4, "yaxis.range[0]": 8.4, "yaxis.range[1]": 2.6}
    assert patterns.region_from_relayout(tile, event, 100) == (13, 19, 7, 12)
    pooled = {"kind": "pooled", "q0": 0, "q1": 1000, "k0": 0, "k1": 1000}
    event = {"xaxis.range[0]": 100.2, "xaxis.range[1]": 180.7, "yaxis.range[0]": 400.9, "yaxis.range[1]": 300.1}
    assert patterns.region_from_relayout(pooled, event, 1000) == (300, 401, 100, 181)
    assert patterns.region_from_relayout(pooled, {"xaxis.autorange": True}, 1000) == (0, 1000, 0, 1000)
    assert patterns.region_from_relayout(pooled, {"autosize": True}, 1000) is None


def test_long_inputs_use_stats_mode_thumbnails_and_exact_tiles(ws, analysis, tiny_llama):
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 24)
    long_ws = Workspace(default_model="tiny-llama", limits=Limits(patterns=16, stats=512))
    stats = long_ws.analyses.get(run_job(long_ws, svc.start_analysis(long_ws, "tiny-llama", text))["key"])
    dense = ws.analyses.get(run_job(ws, svc.start_analysis(ws, "tiny-llama", text))["key"])
    assert stats.mode == "stats" and dense.mode == "patterns" and stats.n_tokens == dense.n_tokens
    n = stats.n_tokens
    assert n > patterns.EXACT  # the full view is pooled, never the whole map
    fig, view, info = patterns.pattern_view(stats, 1, 3)
    z = np.asarray(fig.data[0].z)
    assert view["kind"] == "pooled" and max(z.shape) <= patterns.THUMB and "max over" in info
    full = dense.capture.pattern(1, 3, 0)
    ref = torch.nn.functional.adaptive_max_pool2d(full[None, None], z.shape)[0, 0].numpy()
    assert np.isclose(z.max(), ref.max(), atol=1e-4)
    region = patterns.region_from_relayout(view, {"xaxis.range[0]": 20, "xaxis.range[1]": 60,
                                                  "yaxis.range[0]": 120, "yaxis.range[1]": 80}, n)
    fig, view, _ = patterns.pattern_view(stats, 1, 3, region)
    assert view["kind"] == "tile"
    q0, q1, k0, k1 = region
    np.testing.assert_allclose(np.asarray(fig.data[0].z), full[q0:q1, k0:k1].numpy(), atol=1e-4)
    row = patterns.row_view(stats, 1, 3, n - 1)  # the whole row, exact, from q, k and the LSE
    np.testing.assert_allclose(np.asarray(row.data[0].y), full[n - 1].numpy(), atol=1e-4)
    assert list(row.data[0].x[:2]) == [0, 1] and len(row.layout.xaxis.tickvals) <= patterns.ROW_LABELS
    long_ws.jobs.shutdown()


def test_long_rows_are_pooled_whole_with_their_top_keys(analysis, monkeypatch):
    """Issue 13 bug 4: a row longer than the exact limit shows every key (max-pooled) and its
    strongest keys wherever they are, with exact weights; a zoom shows that part exactly."""
    monkeypatch.setattr(patterns, "ROW_EXACT", 4)
    monkeypatch.setattr(patterns, "ROW_BINS", 3)
    n = analysis.n_tokens
    weights = analysis.capture.pattern(0, 1, 0)[n - 1]
    row = patterns.row_view(analysis, 0, 1, n - 1, topk=2)
    bars, top = row.data[0], row.data[1]
    assert len(bars.y) == 3 and np.isclose(max(bars.y), float(weights.max()), atol=1e-6)
    edges = [int(round(float(e))) for e in torch.linspace(0, n, 4)]
    for b in range(3):  # every key is in one bar: each bar is the max of its keys
        assert np.isclose(bars.y[b], float(weights[edges[b]:edges[b + 1]].max()), atol=1e-6)
    expected = torch.topk(weights, 2)
    assert list(top.x) == expected.indices.tolist()
    np.testing.assert_allclose(list(top.y), expected.values.numpy(), atol=1e-6)
    zoom = patterns.row_view(analysis, 0, 1, n - 1, (2, 5))
    assert list(zoom.data[0].x) == [2, 3, 4]
    np.testing.assert_allclose(list(zoom.data[0].y), weights[2:5].numpy(), atol=1e-6)
    assert patterns.row_range_from_relayout({"xaxis.range[0]": 1.6, "xaxis.range[1]": 4.4}, n) == (2, 5)
    assert patterns.row_range_from_relayout({"autosize": True}, n) is None
    assert [k for k, _, _ in patterns.top_keys(analysis, 0, 1, n - 1, 2)] == expected.indices.tolist()


# ---------------------------------------------------------------- atlas
def test_atlas_embeds_every_head_and_classes_follow_the_threshold(ws, tiny_llama):
    atlas = ws.atlases.get(run_job(ws, atlas_svc.start_atlas(ws, "tiny-llama", "induction", 4, "pca"))["key"])
    table = atlas.table
    assert len(table) == tiny_llama.n_layers * tiny_llama.n_heads
    assert np.isfinite(table[["x", "y"]].to_numpy()).all()
    assert {"entropy", "induction", "previous_token"} <= set(atlas.features)
    assert set(atlas_svc.head_class(table, 2.0)) == {"other"}  # no score is above 2
    best = table[list(atlas_svc.DETECTORS)].idxmax(axis=1)
    assert (atlas_svc.head_class(table, -1.0) == best).all()
    fig = atlas_svc.atlas_figure(atlas, "layer", 0.3)
    assert [list(map(int, c[:2])) for c in fig.data[0].customdata] == table[["layer", "head"]].to_numpy().tolist()
    with pytest.raises(InputError, match="unknown embedding"):
        atlas_svc.start_atlas(ws, "tiny-llama", "induction", 4, "mds")


def test_cancelled_atlas_publishes_nothing(ws, tiny_llama):
    class CancelAfterFirstBatch(JobContext):
        calls = 0

        def progress(self, fraction, message):
            self.calls += 1
            if self.calls == 3:
                self._job.cancel_flag.set()
            super().progress(fraction, message)

    from app.web.jobs import Job

    before = len(ws.atlases._items)
    ctx = CancelAfterFirstBatch(Job(id="x", kind="atlas"))
    with pytest.raises(Cancelled):
        atlas_svc.build_atlas(ws, "tiny-llama", "induction", 8, "pca", ctx, batch_size=2)
    assert len(ws.atlases._items) == before


# ---------------------------------------------------------------- intervene
def test_intervention_list_building():
    items = intervene.add_item([], intervene.make_item(1, 2, "zero"))
    items = intervene.add_item(items, intervene.make_item(0, 1, "scale", alpha="3"))
    items = intervene.add_item(items, intervene.make_item(1, 2, "softpag", u=0.25))  # replaces L1H2
    assert [intervene.describe_item(i) for i in items] == ["L0H1 scale α=3", "L1H2 softpag u=0.25"]
    assert safe(intervene.make_item, None, 0, "zero")[1].startswith("no head chosen")
    assert safe(intervene.make_item, 0, 0, "explode")[1].startswith("unknown intervention")
    assert intervene.uses("scale") == {"alpha"} and intervene.uses("softpag") == {"u"} and not intervene.uses("zero")


@pytest.mark.parametrize("field, value, message", [
    ("alpha", "1000", "α 1000 is out of range"), ("alpha", -7, "α -7 is out of range"),
    ("alpha", "abc", "α 'abc' is not a number"), ("alpha", "", "α is empty"),
    ("u", "1.5", "u 1.5 is out of range"), ("u", "nan", "is not a finite number")])
def test_intervention_parameters_are_refused_not_coerced(field, value, message):
    """Issue 13 bug 8: α 1000 -> 5, -7 -> 0, "abc" -> 2 were silently coerced."""
    kind = "scale" if field == "alpha" else "softpag"
    _, error = safe(intervene.make_item, 0, 0, kind, **{field: value})
    assert error is not None and message in error


@pytest.fixture(scope="module")
def analysis_key(ws, analysis):
    return next(k for k, v in ws.analyses._items.items() if v is analysis)


def test_comparison_shows_the_effect_of_an_ablation(ws, analysis, analysis_key, tiny_llama):
    items = [intervene.make_item(1, 2, "zero"), intervene.make_item(0, 1, "mean")]
    key = run_job(ws, intervene.start_comparison(ws, analysis, items, analysis_key))["key"]
    comparison = ws.comparisons.get(key)
    before, after = comparison.before, comparison.after
    assert len(before.topk) == ws.limits.topk and before.loss != after.loss
    assert not comparison.complete and after.continuation is None  # the fast half only
    clean_topk = intervened_run_topk(tiny_llama, ws.limits.topk)
    assert [t for t, _ in before.topk] == [t for t, _ in clean_topk]
    np.testing.assert_allclose([p for _, p in before.topk], [p for _, p in clean_topk], atol=1e-5)
    assert run_job(ws, intervene.start_followup(ws, key))["kind"] == "followup"
    assert comparison.complete and before.continuation and after.continuation is not None
    assert len(before.pieces) == len(before.continuation_ids)
    table = intervene.topk_table(comparison)
    assert list(table.columns) == ["rank", "before", "p_before", "after", "p_after"]
    assert not np.allclose(table["p_before"], table["p_after"])
    fig = intervene.delta_figure(comparison, "stats|entropy")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isfinite(z).all() and np.abs(z[1]).sum() > 0  # layer 1 reads the mean-ablated L0H1 output
    assert np.allclose(z[0], 0.0, atol=1e-6)  # layer 0 patterns are computed before any edited output
    assert safe(intervene.start_comparison, ws, analysis, [])[1].startswith("no intervention")
    status = ws.jobs.wait(intervene.start_comparison(ws, analysis, [{"layer": 7, "head": 0, "kind": "zero"}]))
    assert status["state"] == "error" and "layer index 7 out of range" in status["error"]
    # the clean side is cached per prompt: a second comparison reuses it
    again = ws.comparisons.get(run_job(ws, intervene.start_comparison(ws, analysis, items[:1], analysis_key))["key"])
    assert again.before is before
    assert intervene.staleness(again, analysis_key, items[:1]) is None
    assert intervene.staleness(again, analysis_key, items) == "list"
    assert intervene.staleness(again, "another prompt", items[:1]) == "prompt"


def intervened_run_topk(model, k):
    from workbench import intervened_run

    return intervened_run.next_token_topk(model, PROMPT, None, k=k)


def _single_token_words(model, count: int) -> list[tuple[str, int]]:
    found = []
    for token_id in model.encode(PROMPT).tolist():
        text = model.tokenizer.decode([token_id])
        if text.strip() and model.tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]:
            if all(token_id != t for _, t in found):
                found.append((text, token_id))
    assert len(found) >= count
    return found[:count]


def test_target_token_logits_before_and_after(ws, analysis, analysis_key, tiny_llama):
    """Issue 10 (Intervene page): a target token's logit, probability and the logit difference
    to a distractor, before and after, from the same logits as the top-k."""
    (target, tid), (distractor, did) = _single_token_words(tiny_llama, 2)
    items = [intervene.make_item(1, 2, "zero")]
    key = run_job(ws, intervene.start_comparison(ws, analysis, items, analysis_key, target, distractor))["key"]
    comparison = ws.comparisons.get(key)
    table = intervene.target_table(comparison)
    assert list(table[""]) == [f"target {target!r}", f"distractor {distractor!r}", "logit difference (target − distractor)"]
    from workbench import intervened_run

    spec = intervene.build_set(tiny_llama, items)
    for side, interventions in (("before", None), ("after", spec)):
        logits = intervened_run.forward(tiny_llama, analysis.batch, interventions)[0, -1]
        probs = torch.softmax(logits, -1)
        assert table.loc[0, f"logit {side}"] == pytest.approx(float(logits[tid]), abs=1e-4)
        assert table.loc[0, f"p {side}"] == pytest.approx(float(probs[tid]), abs=1e-6)
        assert table.loc[2, f"logit {side}"] == pytest.approx(float(logits[tid] - logits[did]), abs=1e-4)
    assert table.loc[0, "Δ logit"] == pytest.approx(table.loc[0, "logit after"] - table.loc[0, "logit before"])
    status = ws.jobs.wait(intervene.start_comparison(ws, analysis, items, analysis_key, target + target))
    assert status["state"] == "error" and "give a single token" in status["error"]
    status = ws.jobs.wait(intervene.start_comparison(ws, analysis, items, analysis_key, None, distractor))
    assert status["state"] == "error" and "a distractor needs a target" in status["error"]
    assert intervene.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert intervene.first_divergence([1, 2], [1, 2]) is None and intervene.first_divergence([1], [1, 5]) == 1


def test_two_sessions_intervening_at_once_never_see_each_other(ws, analysis, tiny_llama):
    """Two browser sessions = two intervention lists; run them concurrently, compare to serial runs."""
    from workbench import intervened_run

    sessions = {"a": [intervene.make_item(1, 2, "zero")], "b": [intervene.make_item(1, 0, "scale", alpha=4.0)]}
    serial = {}
    for name, items in sessions.items():
        spec = intervene.build_set(tiny_llama, items)
        serial[name] = (intervened_run.next_token_topk(tiny_llama, PROMPT, spec, k=ws.limits.topk),
                        float(intervened_run.loss(tiny_llama, analysis.batch, spec)))
    clean_logits = tiny_llama.run(analysis.batch)
    results: dict[str, list] = {"a": [], "b": []}
    errors = []

    def session(name: str) -> None:
        try:
            for _ in range(3):
                job = intervene.start_comparison(ws, analysis, sessions[name])
                results[name].append(ws.comparisons.get(run_job(ws, job)["key"]))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=session, args=(name,)) for name in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    for name, comparisons in results.items():
        assert len(comparisons) == 3
        for c in comparisons:
            assert c.items == sessions[name]
            assert c.after.topk == serial[name][0]
            assert c.after.loss == pytest.approx(serial[name][1], abs=1e-6)
    assert results["a"][0].after.loss != pytest.approx(results["b"][0].after.loss, abs=1e-6)
    torch.testing.assert_close(tiny_llama.run(analysis.batch), clean_logits)  # no hook survived


# ---------------------------------------------------------------- runs
def _write(path, metrics: dict[str, float], layers=2, heads=4):
    from workbench.runstore import write_run

    rows = [{"layer": layer, "head": head, "probe": "stats", "metric": m, "value": v + layer + 0.1 * head,
             "ci_low": np.nan, "ci_high": np.nan}
            for m, v in metrics.items() for layer in range(layers) for head in range(heads)]
    return write_run(path, pd.DataFrame(rows), {"model": "tiny-llama", "dataset": "x"})


def test_runs_browse_and_compare(tmp_path):
    root = tmp_path / "runs"
    _write(root / "a", {"entropy": 1.0, "max_weight": 0.5})
    b = _write(root / "b", {"entropy": 3.0})
    (root / "not-a-run").mkdir()
    (root / ".tmp-a-123").mkdir()
    (root / ".tmp-a-123" / "manifest.json").write_text("{}")
    assert [o["value"] for o in runs.discover_runs(root)] == ["a", "b"]  # never hidden writer folders
    run_a, run_b = runs.open_run(root, "a"), runs.open_run(root, str(b))  # a name, or a path under the root
    assert [o["value"] for o in runs.run_metric_options(run_a, run_b)] == ["stats|entropy"]
    assert runs.top_table(run_a, "stats|entropy")["value"].is_monotonic_decreasing
    fig = runs.compare_figure(run_a, run_b, "stats|entropy")
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), 2.0)
    _, message = safe(runs.compare_figure, run_a, run_b, "stats|max_weight")
    assert "do not share metric stats/max_weight" in message and "stats/entropy" in message
    assert "no run named 'missing'" in safe(runs.open_run, root, "missing")[1]
    assert "no run named 'not-a-run'" in safe(runs.open_run, root, "not-a-run")[1]
    assert safe(runs.open_run, root, "  ")[1].startswith("no run chosen")
    assert runs.run_differences(run_a, run_b) == []


@pytest.mark.parametrize("name", ["/etc", "../../etc", "/root", "a/../../..", "~", ".tmp-a-123", "/", "."])
def test_runs_outside_the_root_are_refused_without_saying_whether_they_exist(tmp_path, name):
    """Issue 13 bug 9 / issue 14 item 3: the Runs page read any folder and said whether it existed."""
    root = tmp_path / "runs"
    _write(root / "a", {"entropy": 1.0})
    (root / ".tmp-a-123").mkdir()
    _, message = safe(runs.open_run, root, name)
    assert message is not None and "is not a run under the runs root" in message
    assert "exist" not in message


def test_runs_that_differ_are_flagged(tmp_path):
    from workbench.runstore import write_run

    rows = pd.DataFrame([{"layer": 0, "head": 0, "probe": "stats", "metric": "entropy", "value": 1.0,
                          "ci_low": np.nan, "ci_high": np.nan}])
    a = write_run(tmp_path / "a", rows, {"model": "tiny-llama", "dataset": "induction", "seq_lengths": [64]})
    b = write_run(tmp_path / "b", rows, {"model": "smollm2-135m", "dataset": "induction", "seq_lengths": [128]})
    differences = runs.run_differences(runs.open_run(tmp_path, "a"), runs.open_run(tmp_path, "b"))
    assert differences == ["model: tiny-llama vs smollm2-135m", "seq_lengths: [64] vs [128]"]
    assert a and b


@pytest.mark.parametrize("name", ["/etc/passwd", "../../etc/hosts", "~/.bashrc", "notes.txt", "../data/x.txt"])
def test_app_datasets_come_only_from_bundled_names_and_the_data_folder(tmp_path, name):
    """Issue 14 item 3: Load example returned the text of any file."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("hello world\n")
    (tmp_path / "notes.txt").write_text("secret\n")
    plain = Workspace(default_model="tiny-llama")
    with_data = Workspace(default_model="tiny-llama", data_dir=tmp_path / "data")
    try:
        for ws in (plain, with_data):
            _, message = safe(svc.check_dataset, ws, name)
            assert message is not None and "is not available in the app" in message
            assert safe(svc.start_example, ws, "tiny-llama", name, 0)[1] == message
        assert svc.check_dataset(plain, "induction") == "induction"
        assert svc.check_dataset(with_data, "x.txt") == str((tmp_path / "data" / "x.txt").resolve())
        assert "x.txt" in [o["value"] for o in svc.dataset_options(with_data)]
        assert "--data-dir" in safe(svc.check_dataset, plain, "x.txt")[1]
    finally:
        plain.jobs.shutdown()
        with_data.jobs.shutdown()


# ---------------------------------------------------------------- the app object
def test_create_app_loads_no_model_and_serves_local_assets(tmp_path):
    from app.web.factory import create_app
    from workbench import model as model_module

    loaded = set(model_module._LOADED)
    app = create_app("/no/such/model/folder", runs_dir=tmp_path)
    assert set(model_module._LOADED) == loaded  # nothing loaded at creation
    client = app.server.test_client()
    page = client.get("/").get_data(as_text=True)
    assert "cdn" not in page.lower() and "https://" not in page
    layout = client.get("/_dash-layout").get_json()
    assert layout["props"]["children"][1]["props"]["data"]["model"] == "/no/such/model/folder"
    assert isinstance(app.workspace, Workspace)
    app.workspace.jobs.shutdown()


def test_safe_reports_bugs_without_raising():
    value, message = safe(lambda: 1 / 0)
    assert value is None and message.startswith("internal error (ZeroDivisionError")
    assert safe(lambda: (_ for _ in ()).throw(WorkbenchError("clear line")))[1] == "clear line"

