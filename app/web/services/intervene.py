"""Intervene: ablate / reinforce / SoftPAG heads and compare the model before and after.

A session's interventions are a JSON list in its own ``dcc.Store`` (``[{layer, head, kind,
alpha, u}, ...]``); each comparison builds an :class:`workbench.interventions.InterventionSet`
from that list and hands it to calls that scope their hooks to themselves, under
``model.lock``. Nothing about one session's interventions is kept on the server between calls,
so two sessions never see each other's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go

from app.web.jobs import JobContext
from app.web.services.analysis import Analysis, run_pipeline
from app.web.services.headmap import split_metric_value
from app.web.services.workspace import Workspace
from probes.figures import head_heatmap
from workbench.data import load_dataset
from workbench.errors import InputError, WorkbenchError
from workbench.model import HookedModel, load_model

KINDS: dict[str, str] = {
    "zero": "ablate: zero the head output",
    "mean": "ablate: replace by its mean over a reference set (calibration text)",
    "scale": "reinforce / dampen: multiply the head output by α",
    "softpag": "SoftPAG: A ← (1−u)·A + u·I",
}
REFERENCE = ("calibration", 8, 64)  # dataset, samples, tokens of the mean-ablation reference


def make_item(layer: int | None, head: int | None, kind: str | None, alpha: float | None = None,
              u: float | None = None) -> dict:
    """One intervention as JSON for the session store (range checks happen in ``validate``)."""
    if layer is None or head is None:
        raise InputError("no head chosen: pick a layer and a head (or click one on the Head map page)")
    if kind not in KINDS:
        raise InputError(f"unknown intervention '{kind}': use one of {', '.join(KINDS)}")
    item = {"layer": int(layer), "head": int(head), "kind": kind}
    if kind == "scale":
        item["alpha"] = float(2.0 if alpha is None else alpha)
        if item["alpha"] < 0:
            raise InputError(f"α = {item['alpha']} is negative: use α ≥ 0 (> 1 reinforces, < 1 dampens)")
    if kind == "softpag":
        item["u"] = float(0.5 if u is None else u)
        if not 0.0 <= item["u"] <= 1.0:
            raise InputError(f"u = {item['u']} is outside [0, 1]")
    return item


def add_item(items: Sequence[dict] | None, item: dict) -> list[dict]:
    """The list with ``item`` added (replacing an earlier one on the same head)."""
    kept = [i for i in (items or []) if (i["layer"], i["head"]) != (item["layer"], item["head"])]
    return sorted(kept + [item], key=lambda i: (i["layer"], i["head"]))


def describe_item(item: dict) -> str:
    extra = {"scale": f" α={item.get('alpha')}", "softpag": f" u={item.get('u')}"}.get(item["kind"], "")
    return f"L{item['layer']}H{item['head']} {item['kind']}{extra}"


def build_set(model: HookedModel, items: Sequence[dict]):
    """The validated :class:`InterventionSet` of a session's list (reference batch for ``mean``)."""
    from workbench.interventions import HeadIntervention, InterventionSet

    if not items:
        raise InputError("no intervention in the list: add at least one head")
    heads = [HeadIntervention(layer=i["layer"], head=i["head"], kind=i["kind"],
                              **{k: i[k] for k in ("alpha", "u") if k in i}) for i in items]
    reference = None
    if any(h.kind == "mean" for h in heads):
        name, n, seq_len = REFERENCE
        reference = load_dataset(name, model, n=n, seq_len=min(seq_len, model.n_ctx))
    spec = InterventionSet(heads, reference=reference)
    spec.validate(model)
    return spec


@dataclass
class Side:
    """The model's outputs on the prompt, with or without the interventions."""

    topk: list[tuple[str, float]] | None = None
    loss: float | None = None
    continuation: str | None = None
    frame: pd.DataFrame | None = None
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Comparison:
    items: list[dict]
    mode: str
    before: Side
    after: Side


def _try(side: Side, what: str, fn):
    try:
        return fn()
    except WorkbenchError as err:
        side.notes[what] = str(err)
        return None


def outputs(ws: Workspace, model: HookedModel, analysis: Analysis, spec, ctx: JobContext, label: str,
            base: float, span: float) -> Side:
    """Top-k next tokens, loss, greedy continuation and head scores under ``spec`` (None = clean)."""
    from workbench import intervened_run

    side, prompt = Side(), analysis.prompt
    # logits are the same in every capture mode: the fused backend (and a KV cache for generation)
    ctx.progress(base, f"{label}: next-token top-{ws.limits.topk}")
    side.topk = _try(side, "top-k", lambda: intervened_run.next_token_topk(model, prompt, spec, k=ws.limits.topk))
    ctx.progress(base + span * 0.25, f"{label}: loss")
    loss = _try(side, "loss", lambda: intervened_run.loss(model, analysis.batch, spec))
    side.loss = None if loss is None else float(loss)
    ctx.progress(base + span * 0.5, f"{label}: greedy continuation")
    side.continuation = _try(side, "continuation", lambda: intervened_run.generate(
        model, prompt, spec, max_new_tokens=ws.limits.continuation_tokens))
    ctx.progress(base + span * 0.75, f"{label}: head scores")
    if spec is None:
        side.frame = analysis.frame
    else:
        side.frame = _scores(model, analysis, spec, ctx, base + span * 0.75, span * 0.25)
    return side


def _scores(model: HookedModel, analysis: Analysis, spec, ctx: JobContext, base: float, span: float) -> pd.DataFrame:
    """Pattern statistics and detectors of every head with the interventions active (the one pipeline)."""
    result = run_pipeline(model, analysis.batch, ["stats", "detectors"], analysis.mode, ctx, base, span,
                          interventions=spec)
    return result.table


def start_comparison(ws: Workspace, analysis: Analysis, items: Sequence[dict] | None) -> str:
    """Validate the list, then queue the before/after comparison; returns the job id."""
    items = [dict(i) for i in (items or [])]
    if not items:
        raise InputError("no intervention in the list: add at least one head")

    def job(ctx: JobContext) -> dict:
        ctx.progress(0.02, f"loading {analysis.model_name}")
        model = load_model(analysis.model_name)
        spec = build_set(model, items)
        before = outputs(ws, model, analysis, None, ctx, "before", 0.05, 0.4)
        after = outputs(ws, model, analysis, spec, ctx, "after", 0.5, 0.45)
        ctx.check()
        return {"kind": "comparison", "key": ws.comparisons.put(Comparison(items, analysis.mode, before, after))}

    return ws.jobs.submit("intervene", job)


def topk_table(comparison: Comparison) -> pd.DataFrame:
    """Rank-aligned top-k next tokens: ``rank, before, p_before, after, p_after``.

    Rows are aligned by rank (not token text: several token ids can decode to the same string).
    """
    before, after = comparison.before.topk or [], comparison.after.topk or []
    rows = []
    for rank in range(max(len(before), len(after))):
        b = before[rank] if rank < len(before) else (None, None)
        a = after[rank] if rank < len(after) else (None, None)
        rows.append({"rank": rank + 1, "before": None if b[0] is None else repr(b[0]), "p_before": b[1],
                     "after": None if a[0] is None else repr(a[0]), "p_after": a[1]})
    return pd.DataFrame(rows, columns=["rank", "before", "p_before", "after", "p_after"])


def delta_metric_options(comparison: Comparison) -> list[dict]:
    frame = comparison.after.frame
    if frame is None or frame.empty:
        return []
    pairs = frame[["probe", "metric"]].drop_duplicates()
    return [{"label": f"{p} / {m}", "value": f"{p}|{m}"} for p, m in pairs.itertuples(index=False)]


def delta_figure(comparison: Comparison, value: str | None) -> go.Figure:
    """Δ = after − before of one head metric, every head; the intervened heads are outlined."""
    probe, metric = split_metric_value(value)
    pick = lambda f: f[(f["probe"] == probe) & (f["metric"] == metric)].set_index(["layer", "head"])["value"]  # noqa: E731
    delta = (pick(comparison.after.frame) - pick(comparison.before.frame)).dropna()
    if delta.empty:
        raise InputError(f"metric {probe}/{metric} is not available before and after: pick another")
    frame = delta.rename("value").reset_index().assign(probe=probe, metric=metric, ci_low=float("nan"),
                                                         ci_high=float("nan"))
    fig = head_heatmap(frame, metric, probe=probe, title=f"Δ {probe}/{metric} (after − before)")
    bound = float(delta.abs().max()) or 1e-6
    fig.update_traces(colorscale="RdBu_r", zmin=-bound, zmax=bound,
                      hovertemplate="layer %{customdata[0]} head %{customdata[1]}<br>Δ = %{z:.4g}<extra></extra>")
    for item in comparison.items:
        fig.add_shape(type="rect", x0=item["head"] - 0.5, x1=item["head"] + 0.5, y0=item["layer"] - 0.5,
                      y1=item["layer"] + 0.5, line=dict(color="black", width=2, dash="dot"), xref="x", yref="y")
    fig.update_layout(height=max(360, 22 * frame["layer"].nunique() + 140))
    return fig
