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
import torch

from app.web.jobs import JobContext
from app.web.services.analysis import Analysis, run_pipeline
from app.web.services.headmap import split_metric_value
from app.web.services.inputs import parse_float
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


ALPHA_RANGE = (0.0, 100.0)  # scale factors the form accepts (> 1 reinforces, < 1 dampens)
TARGET_ROWS = ("target", "distractor", "logit difference")


def make_item(layer: int | None, head: int | None, kind: str | None, alpha=None, u=None) -> dict:
    """One intervention as JSON for the session store; α and u are parsed, never coerced.

    Raises:
        InputError: no head, unknown kind, or α / u not a number in range (names the field).
    """
    if layer is None or head is None:
        raise InputError("no head chosen: pick a layer and a head (or click one on the Head map page)")
    if kind not in KINDS:
        raise InputError(f"unknown intervention '{kind}': use one of {', '.join(KINDS)}")
    item = {"layer": int(layer), "head": int(head), "kind": kind}
    if kind == "scale":
        item["alpha"] = parse_float(alpha, "α", *ALPHA_RANGE)
    if kind == "softpag":
        item["u"] = parse_float(u, "u", 0.0, 1.0)
    return item


def uses(kind: str | None) -> set[str]:
    """The parameters an intervention kind reads (the form shows only these)."""
    return {"scale": {"alpha"}, "softpag": {"u"}}.get(kind or "", set())


def add_item(items: Sequence[dict] | None, item: dict) -> list[dict]:
    """The list with ``item`` added (replacing an earlier one on the same head)."""
    kept = [i for i in (items or []) if (i["layer"], i["head"]) != (item["layer"], item["head"])]
    return sorted(kept + [item], key=lambda i: (i["layer"], i["head"]))


def describe_item(item: dict) -> str:
    extra = {"scale": f" α={float(item.get('alpha', 'nan')):g}",
             "softpag": f" u={float(item.get('u', 'nan')):g}"}.get(item["kind"], "")
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
    """The model's outputs on the prompt, with or without the interventions.

    ``last_logits [V]`` are the next-token logits (target-token read-outs); ``continuation_ids``
    the greedy continuation (None until the follow-up job has run).
    """

    topk: list[tuple[str, float]] | None = None
    loss: float | None = None
    last_logits: torch.Tensor | None = None
    continuation_ids: list[int] | None = None
    continuation: str | None = None
    pieces: list[str] | None = None  # the continuation's tokens as text
    frame: pd.DataFrame | None = None
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class Target:
    """The token whose logit the comparison follows (and an optional distractor)."""

    text: str
    token_id: int
    distractor_text: str | None = None
    distractor_id: int | None = None


@dataclass
class Comparison:
    """One before/after comparison, tagged with what it was computed for.

    Attributes:
        items: the intervention list.
        analysis_key: the session's analysis (prompt) it ran on; results under another
            prompt or list are stale (:func:`staleness`).
        complete: the follow-up (continuations, head scores) has filled in.
    """

    items: list[dict]
    mode: str
    before: Side
    after: Side
    analysis_key: str | None = None
    prompt: str = ""
    target: Target | None = None
    complete: bool = False


def _try(side: Side, what: str, fn):
    try:
        return fn()
    except WorkbenchError as err:
        side.notes[what] = str(err)
        return None


def single_token(model: HookedModel, text: str | None, what: str) -> int | None:
    """The id of ``text`` when it is exactly one token (leading space kept); None when empty.

    Raises:
        InputError: ``text`` is several tokens (lists them) or none.
    """
    if text is None or text == "":
        return None
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = ", ".join(repr(model.tokenizer.decode([i])) for i in ids) or "none"
        raise InputError(f"{what} {text!r} is {len(ids)} tokens ({pieces}): give a single token, "
                         "e.g. ' Paris' with its leading space")
    return int(ids[0])


def make_target(model: HookedModel, target: str | None, distractor: str | None) -> Target | None:
    """The checked :class:`Target` (None without a target; a distractor alone is refused)."""
    target_id = single_token(model, target, "target token")
    distractor_id = single_token(model, distractor, "distractor token")
    if target_id is None:
        if distractor_id is not None:
            raise InputError("a distractor needs a target token: type the target too")
        return None
    return Target(target, target_id, distractor or None, distractor_id)


def next_token_side(ws: Workspace, model: HookedModel, analysis: Analysis, spec) -> Side:
    """Top-k, loss and next-token logits from ONE forward (fused SDPA backend) under ``spec``."""
    from workbench import intervened_run
    from workbench.model import next_token_loss

    side = Side()
    logits = intervened_run.forward(model, analysis.batch, spec)            # [1, N, V]
    side.last_logits = logits[0, analysis.n_tokens - 1].float().cpu()
    probs, ids = torch.softmax(side.last_logits, -1).topk(min(ws.limits.topk, side.last_logits.numel()))
    side.topk = [(model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(probs, ids)]
    if analysis.n_tokens >= 2 and model.causal:
        side.loss = float(next_token_loss(logits, analysis.batch))
    else:
        side.notes["loss"] = "needs a causal model and at least 2 tokens"
    return side


def clean_side(ws: Workspace, model: HookedModel, analysis: Analysis, analysis_key: str | None) -> Side:
    """The 'before' side of a prompt, computed once per analysis and cached."""
    if analysis_key and analysis_key in ws.clean_sides:
        return ws.clean_sides.get(analysis_key)
    if analysis.clean_last_logits is not None:  # the analysis job already ran the clean forward
        side = Side(last_logits=analysis.clean_last_logits, loss=analysis.clean_loss)
        probs, ids = torch.softmax(side.last_logits, -1).topk(min(ws.limits.topk, side.last_logits.numel()))
        side.topk = [(model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(probs, ids)]
        if side.loss is None:
            side.notes["loss"] = "needs a causal model and at least 2 tokens"
    else:
        side = next_token_side(ws, model, analysis, None)
    side.frame = analysis.frame
    if analysis_key:
        ws.clean_sides.put(side, analysis_key)
    return side


def continuation(ws: Workspace, model: HookedModel, analysis: Analysis, spec) -> list[int]:
    """Greedy continuation ids with a KV cache (:func:`workbench.forward.generate_ids`), interventions at every step."""
    from workbench.forward import generate_ids, require_causal
    from workbench.interventions import as_intervention_set

    require_causal(model, "generation")
    ids = analysis.batch.tokens[0, :analysis.n_tokens]
    steps = min(ws.limits.continuation_tokens, model.n_ctx - ids.numel())
    if steps < 1:
        raise InputError(f"the prompt fills the model context of {model.n_ctx} tokens: no room to continue it")
    edits = as_intervention_set(spec).compile(model, analysis.batch) if spec is not None else None
    return generate_ids(model, ids, max_new_tokens=steps, edits=edits).tolist()


def _scores(model: HookedModel, analysis: Analysis, spec, ctx: JobContext, base: float, span: float) -> pd.DataFrame:
    """Pattern statistics and detectors of every head with the interventions active (the one pipeline)."""
    result = run_pipeline(model, analysis.batch, ["stats", "detectors"], analysis.mode, ctx, base, span,
                          interventions=spec)
    return result.table


def start_comparison(ws: Workspace, analysis: Analysis, items: Sequence[dict] | None, analysis_key: str | None = None,
                     target: str | None = None, distractor: str | None = None) -> str:
    """Queue the fast half of before/after: top-k, loss and target logits (one forward per side;
    the clean side cached per prompt). Returns the job id; :func:`start_followup` adds the rest."""
    items = [dict(i) for i in (items or [])]
    if not items:
        raise InputError("no intervention in the list: add at least one head")

    def job(ctx: JobContext) -> dict:
        ctx.progress(0.05, f"loading {analysis.model_name}")
        model = load_model(analysis.model_name)
        chosen = make_target(model, target, distractor)
        spec = build_set(model, items)
        ctx.progress(0.3, "before: next token and loss")
        before = clean_side(ws, model, analysis, analysis_key)
        ctx.progress(0.6, "after: next token and loss")
        after = next_token_side(ws, model, analysis, spec)
        ctx.check()
        comparison = Comparison(items, analysis.mode, before, after, analysis_key, analysis.prompt, chosen)
        return {"kind": "comparison", "key": ws.comparisons.put(comparison)}

    return ws.jobs.submit("intervene", job)


def start_followup(ws: Workspace, key: str) -> str:
    """Queue the slow half of a comparison: both greedy continuations (KV cache; the clean one
    cached per prompt) and the heads' scores under the interventions, on the prompt it was run on."""
    comparison: Comparison = ws.comparisons.get(key)
    analysis: Analysis = ws.analyses.get(comparison.analysis_key)

    def job(ctx: JobContext) -> dict:
        model = load_model(analysis.model_name)
        spec = build_set(model, comparison.items)
        before, after = comparison.before, Side()
        ctx.progress(0.05, "before: greedy continuation")
        if before.continuation_ids is None and "continuation" not in before.notes:
            before_ids = _try(before, "continuation", lambda: continuation(ws, model, analysis, None))
        else:
            before_ids = before.continuation_ids
        ctx.progress(0.3, "after: greedy continuation")
        after.continuation_ids = _try(after, "continuation", lambda: continuation(ws, model, analysis, spec))
        ctx.progress(0.55, "after: head scores")
        after.frame = _scores(model, analysis, spec, ctx, 0.55, 0.45)
        ctx.check()  # a cancelled follow-up publishes nothing
        decode = model.tokenizer.decode
        if before_ids is not None:
            before.pieces = [decode([i]) for i in before_ids]
            before.continuation = decode(before_ids, skip_special_tokens=True)
            before.continuation_ids = before_ids
        if after.continuation_ids is not None:
            comparison.after.pieces = [decode([i]) for i in after.continuation_ids]
            comparison.after.continuation = decode(after.continuation_ids, skip_special_tokens=True)
            comparison.after.continuation_ids = after.continuation_ids
        comparison.after.frame = after.frame
        comparison.after.notes.update(after.notes)
        comparison.complete = True
        return {"kind": "followup", "key": key}

    return ws.jobs.submit("intervene-followup", job)


def staleness(comparison: Comparison, analysis_key: str | None, items: Sequence[dict] | None) -> str | None:
    """Why a shown comparison no longer matches the session (None when it does).

    ``"prompt"``: computed for another prompt (clear it); ``"list"``: for another intervention list (mark it).
    """
    if comparison.analysis_key != analysis_key:
        return "prompt"
    if [dict(i) for i in (items or [])] != comparison.items:
        return "list"
    return None


def target_table(comparison: Comparison) -> pd.DataFrame | None:
    """Logit and probability of the target (and distractor) before/after, and their logit difference."""
    target = comparison.target
    if target is None or comparison.before.last_logits is None or comparison.after.last_logits is None:
        return None
    rows = []
    sides = {"before": comparison.before.last_logits, "after": comparison.after.last_logits}
    probs = {name: torch.softmax(logits, -1) for name, logits in sides.items()}

    def row(what: str, token_id: int) -> dict:
        out = {"": what}
        for name in sides:
            out[f"logit {name}"] = float(sides[name][token_id])
            out[f"p {name}"] = float(probs[name][token_id])
        out["Δ logit"] = out["logit after"] - out["logit before"]
        return out

    rows.append(row(f"target {target.text!r}", target.token_id))
    if target.distractor_id is not None:
        rows.append(row(f"distractor {target.distractor_text!r}", target.distractor_id))
        diff = {"": "logit difference (target − distractor)"}
        for name in sides:
            diff[f"logit {name}"] = rows[0][f"logit {name}"] - rows[1][f"logit {name}"]
            diff[f"p {name}"] = None
        diff["Δ logit"] = diff["logit after"] - diff["logit before"]
        rows.append(diff)
    return pd.DataFrame(rows, columns=["", "logit before", "p before", "logit after", "p after", "Δ logit"])


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where two continuations (token ids) differ; None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


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
    if comparison.after.frame is None:
        raise InputError("the heads' scores under the interventions are still being computed")
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
