"""Patching page: activation patching of one clean / corrupted prompt pair (docs/metrics.md §11).

The job patches every head's ``z`` (all positions) and the residual stream at every layer ×
position from the clean into the corrupted run and keeps both tables; the page draws the
layer × head and layer × position heatmaps of the normalised recovery.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go

from app.web.jobs import JobContext
from app.web.services.cost import cost_note, seconds_per_forward
from app.web.services.workspace import ResultCache, Workspace
from workbench.data import dataset_source
from workbench.errors import InputError
from workbench.model import load_model
from workbench.patching import METRICS, heatmap, patch_table, setup

MAX_PROMPT_CHARS = 2000
_CACHES: dict[int, ResultCache] = {}
_LOCK = threading.Lock()


@dataclass
class PatchingResult:
    """A finished patching run of one prompt pair.

    Attributes:
        heads: the ``z`` table (one row per head, all positions); resid: layer × position table.
        clean_metric, corrupt_metric: the metric on the clean and the corrupted prompt.
        description: model, metric and prompts, for the page.
    """

    heads: pd.DataFrame
    resid: pd.DataFrame
    clean_metric: float
    corrupt_metric: float
    description: str


def results(ws: Workspace) -> ResultCache:
    """The workspace's cache of finished patching results (made on first use)."""
    with _LOCK:
        if id(ws) not in _CACHES:
            _CACHES[id(ws)] = ResultCache(4, "patching result")
        return _CACHES[id(ws)]


def ioi_example(index: int = 0) -> dict:
    """The ``index``-th item of the bundled ``ioi`` set: ``prompt, corrupt_prompt, answer, distractor``."""
    path, _ = dataset_source("ioi")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[index % len(lines)])


def check_request(clean: str | None, corrupt: str | None, answer: str | None, distractor: str | None,
                  metric: str | None) -> tuple[str, str, str, str | None, str]:
    """Validate the form before any model work; returns the cleaned values.

    Raises:
        InputError: an empty field, a prompt above the length limit, an unknown metric, or a
            logit difference without a distractor.
    """
    for name, value in (("clean prompt", clean), ("corrupted prompt", corrupt), ("answer", answer)):
        if not value or not str(value).strip():
            raise InputError(f"empty {name}: fill it in (or press 'IOI example')")
    for name, value in (("clean prompt", clean), ("corrupted prompt", corrupt)):
        if len(value) > MAX_PROMPT_CHARS:
            raise InputError(f"{name} has {len(value)} characters: patching runs many copies, keep it under "
                             f"{MAX_PROMPT_CHARS}")
    metric = metric or "logit_diff"
    if metric not in METRICS:
        raise InputError(f"unknown metric '{metric}': use one of {', '.join(METRICS)}")
    distractor = distractor if distractor and str(distractor).strip() else None
    if metric == "logit_diff" and distractor is None:
        raise InputError("the logit difference needs a distractor token: fill it in or choose log p(answer)")
    return clean, corrupt, answer, distractor, metric


def patching_forwards(n_layers: int, n_heads: int, n_tokens: int) -> int:
    """Forward-equivalents of one run: a patched copy of the corrupted prompt per head (``z``) and per
    layer × position (``resid``), plus each table's clean and corrupted runs (:func:`patch_table`)."""
    return n_layers * n_heads + n_layers * n_tokens + 4


def estimate_note(ws: Workspace, session: dict | None, model_name: str, clean: str) -> str:
    """The run's estimate (:func:`patching_forwards` × the analysed prompt's measured forward,
    :mod:`app.web.services.cost`), or "" without an analysis of ``model_name`` to scale from."""
    from app.web.services.analysis import get_analysis

    analysis = get_analysis(ws, session)
    if seconds_per_forward(analysis, model_name, 1) is None:
        return ""
    model = load_model(model_name)
    n_tokens = int(model.encode(clean).numel())
    forwards = patching_forwards(model.n_layers, model.n_heads, n_tokens)
    seconds = forwards * seconds_per_forward(analysis, model_name, n_tokens)
    return cost_note("patching every head and every layer × position", forwards, analysis, n_tokens, seconds)


def start_patching(ws: Workspace, model_name: str, clean: str | None, corrupt: str | None, answer: str | None,
                   distractor: str | None, metric: str | None) -> str:
    """Validate, then queue the patching job; returns the job id."""
    model_name = ws.check_model(model_name)
    clean, corrupt, answer, distractor, metric = check_request(clean, corrupt, answer, distractor, metric)

    def job(ctx: JobContext) -> dict:
        ctx.progress(0.02, f"loading {model_name}")
        model = load_model(model_name)
        pair = setup(model, [clean], [corrupt], [answer], None if distractor is None else [distractor], metric)
        n_heads = model.n_layers * model.n_heads
        n_resid = model.n_layers * int(pair.clean.lengths[0])
        total = n_heads + n_resid

        def step(offset: int, what: str):
            def report(done: int) -> None:
                ctx.progress(0.05 + 0.95 * (offset + done) / total, f"patching {what}: {done} done")
            return report
        heads = patch_table(model, pair, "z", progress=step(0, "head outputs"))
        resid = patch_table(model, pair, "resid", progress=step(n_heads, "residual stream"))
        result = PatchingResult(heads, resid, float(heads["metric_clean"].iloc[0]),
                                float(heads["metric_corrupt"].iloc[0]),
                                f"{model.name}, metric {metric}, clean {clean!r} vs corrupted {corrupt!r}")
        return {"kind": "patching", "key": results(ws).put(result)}

    return ws.jobs.submit("patching", job)


def figures(result: PatchingResult) -> tuple[go.Figure, go.Figure]:
    """Layer × head and layer × position heatmaps of the recovery."""
    heads = heatmap(result.heads, title="head outputs z (all positions): recovery — click a cell to open the head")
    resid = heatmap(result.resid, title="residual stream (layer × position): recovery")
    return heads, resid


def summary(result: PatchingResult) -> str:
    """One line: the two metric values and the strongest heads."""
    top = result.heads.dropna(subset=["recovery"]).nlargest(3, "recovery")
    best = ", ".join(f"L{r.layer}H{r.head} {r.recovery:.2f}" for r in top.itertuples())
    return (f"{result.description}: clean {result.clean_metric:.3f}, corrupted {result.corrupt_metric:.3f}; "
            f"highest head recovery: {best or 'n/a'}")


def head_of_click(click: dict | None) -> tuple[int, int] | None:
    """``(layer, head)`` of a clicked cell of the head heatmap (its customdata), or None."""
    if not click or not click.get("points"):
        return None
    custom = click["points"][0].get("customdata")
    if isinstance(custom, dict):
        custom = [custom[k] for k in sorted(custom, key=int)]
    try:
        layer, head = int(custom[0]), int(custom[1])
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return (layer, head) if head >= 0 else None
