"""Head map: every registered probe's metrics as layer × head heatmaps, and on-demand probes."""

from __future__ import annotations

import html
import re
from pathlib import Path

import plotly.graph_objects as go

from app.web.jobs import JobContext
from app.web.services.analysis import Analysis, run_pipeline
from app.web.services.cost import cost_note, seconds_per_forward
from app.web.services.metric_help import describe
from app.web.services.workspace import Workspace
from probes.figures import head_heatmap
from probes.registry import PROBES
from workbench.capture import resolve_mode
from workbench.data import load_dataset
from workbench.errors import InputError
from workbench.model import load_model

SEPARATOR = "|"
DATASET_SAMPLES = 8
MAX_DATASET_SAMPLES = 64


def metric_value(probe: str, metric: str) -> str:
    return f"{probe}{SEPARATOR}{metric}"


def split_metric_value(value: str | None) -> tuple[str, str]:
    """``"probe|metric"`` -> ``(probe, metric)``."""
    if not value or SEPARATOR not in value:
        raise InputError("no metric chosen: pick one from the list")
    probe, metric = value.split(SEPARATOR, 1)
    return probe, metric


def metric_options(analysis: Analysis) -> list[dict]:
    """Every computed ``(probe, metric)`` of the analysis, in table order."""
    pairs = analysis.frame[["probe", "metric"]].drop_duplicates()
    return [{"label": f"{p} / {m}{_source_note(analysis, p)}", "value": metric_value(p, m)}
            for p, m in pairs.itertuples(index=False)]


def _source_note(analysis: Analysis, probe: str) -> str:
    source = analysis.sources.get(probe, "this prompt")
    return "" if source == "this prompt" else f" (on {source})"


def default_metric(options: list[dict], current: str | None) -> str | None:
    """Keep the current choice if still offered, else the first option."""
    values = [o["value"] for o in options]
    if current in values:
        return current
    return values[0] if values else None


def probe_catalog(analysis: Analysis | None) -> list[dict]:
    """Every registered probe: its metrics, whether it needs the model, and whether it is computed."""
    computed = set() if analysis is None else set(analysis.frame["probe"].unique())
    notes = {} if analysis is None else analysis.notes
    sources = {} if analysis is None else analysis.sources
    return [{"name": name, "metrics": list(cls.metrics), "needs_model": cls.needs_model,
             "computed": name in computed, "note": notes.get(name, ""), "source": sources.get(name, "this prompt")}
            for name, cls in PROBES.items()]


def headmap_figure(analysis: Analysis, value: str | None, selected: tuple[int, int] | None) -> go.Figure:
    """The layer × head map of one metric; hover shows definition, value and 95% interval."""
    probe, metric = split_metric_value(value)
    rows = analysis.frame[(analysis.frame["probe"] == probe) & (analysis.frame["metric"] == metric)]
    if rows.empty:
        raise InputError(f"metric {probe}/{metric} is not computed for this prompt: compute the probe first")
    fig = head_heatmap(rows, metric, probe=probe, title=f"{probe} / {metric}",
                       selected=tuple(selected) if selected else None)
    explain = html.escape(describe(probe, metric))
    template = fig.data[0].hovertemplate
    if rows[["ci_low", "ci_high"]].isna().all().all():  # one sample (a single prompt): no interval
        template = re.sub(r"<br>95% CI .*?(?=<extra>)", "<br>95% CI: n/a (one sample)", template)
    fig.update_traces(hovertemplate=f"<i>{explain}</i><br>" + template)
    n_layers = rows["layer"].nunique()
    fig.update_layout(height=max(360, 22 * n_layers + 140), clickmode="event")
    return fig


def check_probe_request(ws: Workspace, analysis: Analysis, name: str | None, dataset: str | None = None,
                        n=None) -> tuple[str, str | None, int]:
    """Validate a Compute request before any job starts: ``(probe, dataset or None, samples)``.

    On "this prompt" the probe's own pre-check (:meth:`probes.base.Probe.check_run`) runs now,
    so a probe that needs several samples is refused at once instead of after its sweep.

    Raises:
        InputError: unknown probe, dataset the app may not load, bad sample count, or a failed pre-check.
    """
    from app.web.services.analysis import check_dataset
    from app.web.services.inputs import parse_int

    if not name:
        raise InputError("no probe chosen: pick one from the list")
    if name not in PROBES:
        raise InputError(f"unknown probe '{name}': use one of {', '.join(PROBES)}")
    if dataset:
        return name, check_dataset(ws, dataset), parse_int(n, "samples", 1, MAX_DATASET_SAMPLES, DATASET_SAMPLES)
    try:
        PROBES[name]().check_run(load_model(analysis.model_name), analysis.batch)
    except InputError as err:
        raise InputError(f"probe '{name}' cannot run on this prompt: {err} (try computing it on a dataset)") from None
    return name, None, 1


def estimate_seconds(analysis: Analysis, name: str, n_layers: int, n_heads: int, samples: int = 1,
                     n_tokens: int | None = None) -> float | None:
    """A rough upper bound of a probe's run time: the forward-equivalents it states about itself
    (:meth:`probes.base.Probe.cost_forwards`, on ``samples`` inputs of ``n_tokens`` tokens, default the
    prompt's) × the measured clean forward of this prompt scaled to ``n_tokens``
    (:func:`app.web.services.cost.seconds_per_forward`). None for a probe that costs about one
    capture, or without a measured forward."""
    n_tokens = n_tokens or analysis.n_tokens
    forwards = PROBES[name]().cost_forwards(n_layers, n_heads, n_tokens, samples)
    per_forward = seconds_per_forward(analysis, analysis.model_name, n_tokens)
    return None if forwards is None or per_forward is None else forwards * per_forward


def probe_cost_note(ws: Workspace, analysis: Analysis, name: str, dataset: str | None, samples: int) -> str:
    """The estimate shown when a probe starts (:func:`estimate_seconds`; a dataset's inputs are
    loaded to count their padded width), or "" for a probe that costs about one capture."""
    n_tokens = analysis.n_tokens
    if dataset:
        n_tokens = int(load_dataset(dataset, load_model(analysis.model_name), n=samples).tokens.shape[1])
    n_layers, n_heads = len(analysis.capture.layers), len(analysis.capture.heads)
    seconds = estimate_seconds(analysis, name, n_layers, n_heads, samples, n_tokens)
    if seconds is None:
        return ""
    forwards = PROBES[name]().cost_forwards(n_layers, n_heads, n_tokens, samples)
    source = f"{name} on {samples} samples of {Path(dataset).name}" if dataset else f"{name} on this prompt"
    return cost_note(source, forwards, analysis, n_tokens, seconds)


def start_probe(ws: Workspace, analysis: Analysis, name: str | None, dataset: str | None = None,
                n=None) -> str:
    """Job: fit a registered probe on the analysed prompt, or on ``n`` samples of ``dataset``.

    Dataset-level probes (importance with resampling, HeSS, sink rates) need several samples;
    their rows join the head table with the source noted in :attr:`Analysis.sources`.
    """
    name, dataset, n = check_probe_request(ws, analysis, name, dataset, n)
    source = f"{Path(dataset).name} ×{n}" if dataset else "this prompt"

    def job(ctx: JobContext) -> dict:
        ctx.progress(0.05, f"loading {analysis.model_name}")
        model = load_model(analysis.model_name)
        batch, mode = analysis.batch, analysis.mode
        if dataset:
            ctx.progress(0.1, f"loading {n} samples of {Path(dataset).name}")
            batch = load_dataset(dataset, model, n=n)
            mode = resolve_mode("auto", int(batch.lengths.max()), ws.limits.patterns)
        result = run_pipeline(model, batch, [name], mode, ctx, 0.2, 0.8)
        if name in result.notes:
            hint = "" if dataset else "; try computing it on a dataset instead"
            raise InputError(f"probe '{name}' cannot run on {source}: {result.notes[name]}{hint}")
        ctx.check()  # cancelled: the analysis keeps its old table
        analysis.add_frame(result.table, source)
        return {"kind": "probe", "probe": name, "metrics": sorted(result.table["metric"].unique().tolist())}

    return ws.jobs.submit(f"probe:{name}", job)


def head_summary(analysis: Analysis, selected: tuple[int, int] | None) -> str:
    """A line about the selected head: its top metrics."""
    if not selected:
        return "no head selected: click a cell of the map"
    layer, head = selected
    rows = analysis.frame[(analysis.frame["layer"] == layer) & (analysis.frame["head"] == head)]
    parts = [f"{r.metric}={r.value:.3g}" for r in rows.itertuples() if r.probe == "detectors"]
    return f"selected L{layer}H{head}" + (f" ({', '.join(parts)})" if parts else "")
