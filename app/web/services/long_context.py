"""Long-context page: needle samples at a chosen length and depths, every head placed by
(streaming_mass, retrieval_score), and one head's map thumbnail and needle row on click.

The taxonomy job runs the one pipeline (:func:`app.web.services.analysis.run_pipeline`) with the
``retrieval`` and ``sparsity`` probes in stats mode (docs/metrics.md §10); the head view re-runs
the forward of one sample up to the head's layer with Q/K/LSE kept for that head only, then
recomputes a pooled thumbnail and the exact rows that predict the answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app.web.jobs import JobContext
from app.web.services.analysis import run_pipeline
from app.web.services.workspace import Workspace
from probes.figures import kv_saliency_line, taxonomy_scatter, taxonomy_table
from workbench.batch import TokenBatch
from workbench.errors import InputError

LENGTHS = (512, 1024, 2048, 4096, 8192)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class Taxonomy:
    """A finished long-context run.

    Attributes:
        table: one row per head: ``layer, head`` and the dataset mean (``ci_low``/``ci_high`` for
            the retrieval score) of every retrieval/sparsity metric.
        batch: the needle samples (for the head view).
        model_name, description: what was run.
        kv_saliency: the dataset-level KV saliency share (``SparsityProfile.kv_saliency_``).
    """

    table: pd.DataFrame
    batch: TokenBatch
    model_name: str
    description: str
    kv_saliency: dict


def check_request(ws: Workspace, seq_len, depths) -> tuple[int, list[float]]:
    """Validated ``(seq_len, depths)``; one line naming the problem otherwise."""
    try:
        seq_len = int(seq_len)
    except (TypeError, ValueError):
        raise InputError(f"length {seq_len!r}: pick one from the list") from None
    if seq_len not in LENGTHS or seq_len > ws.limits.stats:
        allowed = [n for n in LENGTHS if n <= ws.limits.stats]
        raise InputError(f"length {seq_len}: use one of {allowed}")
    chosen = sorted({float(d) for d in (depths or [])})
    if not chosen or any(not 0 <= d <= 1 for d in chosen):
        raise InputError("no needle depth chosen: tick at least one")
    return seq_len, chosen


def estimate_note(ws: Workspace, session: dict | None, model_name: str, seq_len, depths) -> str:
    """The run's estimate: one stats-mode capture of each needle sample (one per depth) of ``seq_len``
    tokens, scaled from the analysed prompt's measured forward by the arithmetic (:mod:`app.web.services.cost`);
    "" without an analysis of ``model_name`` to scale from."""
    from app.web.services.analysis import get_analysis
    from app.web.services.cost import cost_note, seconds_per_forward

    seq_len, depths = check_request(ws, seq_len, depths)
    analysis = get_analysis(ws, session)
    per_forward = seconds_per_forward(analysis, model_name, seq_len)
    if per_forward is None:
        return ""
    forwards = float(len(depths))
    return cost_note(f"{len(depths)} needle captures", forwards, analysis, seq_len, forwards * per_forward,
                     bound="roughly", caveat="the statistics capture costs more than a plain forward, and a short "
                     "prompt's forward is mostly fixed overhead")


def start_taxonomy(ws: Workspace, model_name: str, seq_len, depths) -> str:
    """Validate, then queue the taxonomy job; returns the job id."""
    model_name = ws.check_model(model_name)
    seq_len, depths = check_request(ws, seq_len, depths)

    def job(ctx: JobContext) -> dict:
        return {"kind": "long_context", "key": ws.taxonomies.put(build_taxonomy(model_name, seq_len, depths, ctx))}

    return ws.jobs.submit("long_context", job)


def build_taxonomy(model_name: str, seq_len: int, depths: list[float], ctx: JobContext) -> Taxonomy:
    from workbench.data import datasets_dir
    from workbench.model import load_model
    from workbench.needle import generate_needles

    ctx.progress(0.02, f"loading {model_name}")
    model = load_model(model_name)
    if seq_len > model.n_ctx:
        raise InputError(f"length {seq_len} exceeds {model_name}'s context of {model.n_ctx}: pick a shorter one")
    batch = generate_needles(model, datasets_dir() / "calibration.txt", seq_len=seq_len, depths=depths)
    result = run_pipeline(model, batch, ["retrieval", "sparsity"], "stats", ctx, 0.05, 0.9)
    if result.notes:
        raise InputError("; ".join(f"{k}: {v}" for k, v in result.notes.items()))
    ctx.check()
    table = taxonomy_table(result.table)
    desc = f"{model_name}, {len(batch)} needle samples of {seq_len} tokens (depths {', '.join(f'{d:.0%}' for d in depths)})"
    return Taxonomy(table, batch, model_name, desc, result.probes["sparsity"].kv_saliency_)


def taxonomy_figure(tax: Taxonomy) -> go.Figure:
    """Every head at (streaming_mass, retrieval_score), coloured by block_density_90
    (:func:`probes.figures.taxonomy_scatter`); a click selects the head."""
    return taxonomy_scatter(tax.table, title=f"{tax.description}<br><sup>{kv_saliency_line(tax.kv_saliency)}</sup>")


def sample_options(tax: Taxonomy) -> list[dict]:
    return [{"label": f"depth {m['depth']:.0%} (answer {m['answer']})", "value": i} for i, m in enumerate(tax.batch.meta)]


def head_view(tax: Taxonomy, layer: int, head: int, sample: int | None, size: int = 128) -> tuple[go.Figure, go.Figure]:
    """``(thumbnail, needle row)`` figures of one head on one needle sample (exact, recomputed)."""
    from workbench.capture import capture
    from workbench.model import load_model
    from workbench.recompute import thumbnail_from_capture, tile_from_capture

    sample = 0 if sample is None else int(sample)
    if not 0 <= sample < len(tax.batch):
        raise InputError(f"sample {sample} is not in this run ({len(tax.batch)} samples)")
    model = load_model(tax.model_name)
    one = tax.batch.select([sample])
    cap = capture(model, one, layers=[layer], heads=[head], mode="stats", keep_qk=True, detectors=False, progress=False)
    meta = one.meta[0]
    (t0, t1), (a0, a1) = meta["needle_span"], meta["answer_span"]
    n = int(one.lengths[0])
    _, mean = thumbnail_from_capture(cap, layer, head, 0, size=size)
    thumb = go.Figure(go.Heatmap(z=np.log10(mean.numpy() + 1e-9), colorscale="Viridis",
                                 colorbar=dict(title="log10 mean A")))
    bins = mean.shape[1]
    thumb.add_vrect(x0=t0 * bins / n - 0.5, x1=t1 * bins / n - 0.5, line_width=1, line_color="red",
                    annotation_text="needle", annotation_position="top left")
    thumb.update_layout(title=f"L{layer}H{head}: the whole {n}-token map, mean-pooled to {mean.shape[0]}×{bins}",
                        yaxis=dict(autorange="reversed", title="query bin"), xaxis_title="key bin", height=460,
                        margin=dict(l=50, r=20, t=50, b=40))
    rows = tile_from_capture(cap, layer, head, 0, (a0 - 1, a1 - 1), (0, n)).numpy()
    row_fig = go.Figure()
    for r, values in enumerate(rows):
        row_fig.add_trace(go.Scatter(y=values, mode="lines", name=f"row {a0 - 1 + r} → answer token {r + 1}"))
    row_fig.add_vrect(x0=t0 - 0.5, x1=t1 - 0.5, fillcolor="red", opacity=0.15, line_width=0,
                      annotation_text="needle", annotation_position="top left")
    row_fig.update_layout(title=f"L{layer}H{head}: the rows that predict the answer (needle at depth {meta['depth']:.0%})",
                          xaxis_title="key position", yaxis_title="attention", height=360,
                          margin=dict(l=50, r=20, t=50, b=40))
    return thumb, row_fig
