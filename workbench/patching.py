"""Activation patching between a clean and a corrupted prompt (docs/metrics.md §11).

The corrupted batch is run with one activation replaced by its value from the clean run, and a
metric ``m`` (default: logit difference answer − distractor at the last token) is read. The
normalised recovery of a patch is::

    r = (mean m_patched − mean m_corrupt) / (mean m_clean − mean m_corrupt)

(means over samples; 1 = the patch restores the clean behaviour, 0 = no effect), with a
percentile bootstrap interval over samples. Sites:

- ``z``: a head's output ``z`` (``blocks.{l}.attn.hook_z``, before ``W_O``), at every position or
  at one position;
- ``resid``: the residual stream entering layer ``l`` (``blocks.{l}.hook_resid_pre``) at one position.

Positions count from each sample's last real token, Python style (``-1`` = last token), so
prompts of different lengths line up at their end. Clean and corrupted prompts must have the
same token length (samples where they differ are dropped). Many patches run in one forward
(copies of the corrupted batch), all through :func:`workbench.forward.run` with hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.attention_backend import check_cancelled
from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.forward import require_causal, run
from workbench.logit_attribution import answer_token

Metric = Callable[[torch.Tensor], torch.Tensor]
"""``last-token logits [B, V] -> [B]`` per-sample metric."""
SITES = ("z", "resid")


@dataclass
class PatchingSetup:
    """Aligned clean/corrupted batches and the metric.

    Attributes:
        clean, corrupt: ``TokenBatch`` of the kept samples (same lengths row by row).
        metric: per-sample metric of last-token logits.
        metric_name: its name. kept: indices of the kept samples in the input.
        labels: token strings of the first clean prompt (for position labels).
    """

    clean: TokenBatch
    corrupt: TokenBatch
    metric: Metric
    metric_name: str
    kept: list[int]
    labels: list[str]


def logit_diff_metric(answers: torch.Tensor, distractors: torch.Tensor) -> Metric:
    """``logit(answer) − logit(distractor)`` per sample, from last-token logits ``[B, V]``."""
    rows = torch.arange(len(answers))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[rows, answers] - logits[rows, distractors]
    return metric


def logprob_metric(answers: torch.Tensor) -> Metric:
    """``log p(answer)`` per sample."""
    rows = torch.arange(len(answers))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), -1)[rows, answers]
    return metric


METRICS = ("logit_diff", "logprob")


def setup(model, clean_prompts: Sequence[str], corrupt_prompts: Sequence[str], answers: Sequence[str],
          distractors: Sequence[str] | None = None, metric: str = "logit_diff") -> PatchingSetup:
    """Tokenize and align clean/corrupted prompts and build the metric.

    Raises:
        InputError: mismatched list lengths, unknown metric, a logit difference without
            distractors, or no pair whose prompts have the same token length.
    """
    require_causal(model, "activation patching")
    if metric not in METRICS:
        raise InputError(f"unknown patching metric '{metric}': use one of {', '.join(METRICS)}")
    n = len(clean_prompts)
    if len(corrupt_prompts) != n or len(answers) != n or (distractors is not None and len(distractors) != n):
        raise InputError("give one corrupted prompt, answer (and distractor) per clean prompt")
    if metric == "logit_diff" and distractors is None:
        raise InputError("the logit_diff metric needs a distractor per prompt: give distractors or use metric='logprob'")
    clean_ids = [model.encode(p) for p in clean_prompts]
    corrupt_ids = [model.encode(p) for p in corrupt_prompts]
    kept = [i for i in range(n) if clean_ids[i].numel() == corrupt_ids[i].numel()]
    if not kept:
        raise InputError("no clean/corrupted pair has the same token length: corrupt by swapping tokens "
                         "for tokens of the same length (e.g. one name for another)")
    if metric == "logit_diff":
        kept = [i for i in kept if answer_token(model, answers[i]) != answer_token(model, distractors[i])]
        if not kept:
            raise InputError("every answer starts with the same token as its distractor: their logit difference "
                             "is 0; give answers and distractors that differ in their first token")
    answer_ids = torch.tensor([answer_token(model, answers[i]) for i in kept])
    if metric == "logit_diff":
        distractor_ids = torch.tensor([answer_token(model, distractors[i]) for i in kept])
        fn = logit_diff_metric(answer_ids, distractor_ids)
    else:
        fn = logprob_metric(answer_ids)
    clean = model.batch_from_ids([clean_ids[i] for i in kept])
    corrupt = model.batch_from_ids([corrupt_ids[i] for i in kept])
    return PatchingSetup(clean, corrupt, fn, metric, kept, model.str_tokens(clean_ids[kept[0]]))


def setup_from_batch(model, batch: TokenBatch, metric: str = "logit_diff") -> PatchingSetup:
    """:func:`setup` from a dataset batch whose meta has ``prompt``, ``corrupt_prompt``,
    ``answer`` (and ``distractor``), e.g. the bundled ``ioi``."""
    meta = batch.meta
    need = ["prompt", "corrupt_prompt", "answer"] + (["distractor"] if metric == "logit_diff" else [])
    missing = [k for k in need if not all(k in m for m in meta)]
    if missing:
        raise InputError(f"patching needs '{missing[0]}' in every item (the bundled ioi dataset has them): "
                         "use --dataset ioi or a .jsonl with prompt, corrupt_prompt, answer, distractor")
    return setup(model, [m["prompt"] for m in meta], [m["corrupt_prompt"] for m in meta],
                 [m["answer"] for m in meta], [m["distractor"] for m in meta] if "distractor" in need else None,
                 metric)


def _last_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, (lengths - 1).to(logits.device)].float().cpu()


def clean_activations(model, batch: TokenBatch, site: str) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Last-token logits ``[B, V]`` and every layer's activation at ``site``:
    ``z [B, N, H, d]`` or ``resid_pre [B, N, D]``."""
    store: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(tensor: torch.Tensor, hook) -> torch.Tensor:
            store[layer] = tensor.detach().clone()
            return tensor
        return hook
    hooks = [(_site_name(site, layer), keep(layer)) for layer in range(model.n_layers)]
    logits = run(model, batch, fwd_hooks=hooks)
    return _last_logits(logits, batch.lengths), store


def _site_name(site: str, layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z" if site == "z" else f"blocks.{layer}.hook_resid_pre"


@dataclass(frozen=True)
class Patch:
    """One patch: ``site`` at ``layer`` (``head`` for z, else None), ``position`` counted from
    the end (-1 = last token) or None for every position (z only)."""

    site: str
    layer: int
    head: int | None = None
    position: int | None = None


def patched_metrics(model, setup_: PatchingSetup, patches: Sequence[Patch], *,
                    tokens_per_forward: int = 2048, progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample metrics: ``(patched [P, B], clean [B], corrupt [B])``.

    Copies of the corrupted batch run together (``copies × B × N <= tokens_per_forward``), copy
    ``c`` carrying patch ``c``. ``progress`` (optional) is called with the number of patches done.
    """
    sites = {p.site for p in patches}
    bad = sites - set(SITES)
    if bad:
        raise InputError(f"unknown patching site '{sorted(bad)[0]}': use z or resid")
    clean, corrupt = setup_.clean, setup_.corrupt
    lengths = clean.lengths
    B, N = clean.tokens.shape
    for p in patches:
        if p.position is not None and not -int(lengths.min()) <= p.position <= -1:
            raise InputError(f"position {p.position} is outside the shortest prompt ({int(lengths.min())} tokens): "
                             f"give -1 (last token) down to -{int(lengths.min())}")
        if p.site == "resid" and p.position is None:
            raise InputError("residual-stream patching needs a position (-1 = last token)")
        model.check_heads([p.layer], None if p.head is None else [p.head])
    sources = {site: clean_activations(model, clean, site) for site in sites}
    clean_metric = setup_.metric(next(iter(sources.values()))[0]) if sources else \
        setup_.metric(_last_logits(run(model, clean), lengths))
    corrupt_metric = setup_.metric(_last_logits(run(model, corrupt), lengths))
    per_forward = max(1, tokens_per_forward // (B * N))
    out = torch.empty(len(patches), B)
    for start in range(0, len(patches), per_forward):
        check_cancelled()
        chunk = list(patches[start:start + per_forward])
        c = len(chunk)
        rep = TokenBatch(corrupt.tokens.repeat(c, 1), corrupt.mask.repeat(c, 1), [{}] * (c * B))
        hooks = []
        for layer in sorted({p.layer for p in chunk}):
            for site in sorted({p.site for p in chunk if p.layer == layer}):
                mine = [(i, p) for i, p in enumerate(chunk) if p.layer == layer and p.site == site]
                hooks.append((_site_name(site, layer), _patch_hook(mine, sources[site][1][layer], lengths, B)))
        logits = run(model, rep, fwd_hooks=hooks)
        last = _last_logits(logits, lengths.repeat(c)).reshape(c, B, -1)
        out[start:start + c] = torch.stack([setup_.metric(last[i]) for i in range(c)])
        if progress is not None:
            progress(start + c)
    return out, clean_metric, corrupt_metric


def _patch_hook(items: list[tuple[int, Patch]], source: torch.Tensor, lengths: torch.Tensor, B: int):
    """A hook writing the clean ``source`` into each listed copy's rows (at its head/position)."""
    def hook(tensor: torch.Tensor, hook) -> torch.Tensor:
        tensor = tensor.clone()
        src = source.to(tensor.device, tensor.dtype)
        for copy, p in items:
            rows = slice(copy * B, (copy + 1) * B)
            if p.position is None:
                if p.head is None:
                    tensor[rows] = src
                else:
                    tensor[rows, :, p.head] = src[:, :, p.head]
            else:
                index = torch.arange(B, device=tensor.device)
                pos = (lengths + p.position).to(tensor.device)
                target = tensor[rows]
                if p.head is None:
                    target[index, pos] = src[index, pos]
                else:
                    target[index, pos, p.head] = src[index, pos, p.head]
                tensor[rows] = target
        return tensor
    return hook


def recovery(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor, *, n_boot: int = 1000,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised recovery ``[P]`` of each patch with a 95 % percentile bootstrap interval over samples.

    Args:
        patched: ``[P, B]`` metric per patch and sample; clean, corrupt: ``[B]``.
    Returns:
        ``(value, ci_low, ci_high)``; NaN where the clean and corrupted means coincide.
    """
    patched, clean, corrupt = (t.double().numpy() for t in (patched, clean, corrupt))

    value = _ratio(patched, clean, corrupt)
    B = clean.shape[0]
    if B < 2 or n_boot < 1:
        return value, np.full_like(value, np.nan), np.full_like(value, np.nan)
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, patched.shape[0]))
    for i in range(n_boot):
        idx = rng.integers(0, B, B)
        draws[i] = _ratio(patched[:, idx], clean[idx], corrupt[idx])
    with np.errstate(invalid="ignore"):
        low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    return value, low, high


def _ratio(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray) -> np.ndarray:
    """``(mean patched − mean corrupt) / (mean clean − mean corrupt)`` per patch ``[P]``."""
    denom = clean.mean() - corrupt.mean()
    if denom == 0:
        return np.full(patched.shape[0], np.nan)
    return (patched.mean(-1) - corrupt.mean()) / denom


COLUMNS = ["site", "layer", "head", "position", "token", "recovery", "ci_low", "ci_high",
           "metric_patched", "metric_clean", "metric_corrupt", "n_samples"]


def patch_table(model, setup_: PatchingSetup, site: str, *, layers: Sequence[int] | None = None,
                heads: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                tokens_per_forward: int = 2048, n_boot: int = 1000, progress=None) -> pd.DataFrame:
    """Patch every selected site and tabulate the recovery.

    Args:
        site: ``"z"`` (each head of ``layers × heads``; ``positions`` None = all positions at
            once, else one row per position) or ``"resid"`` (each layer × position; ``positions``
            default = every position of the shortest prompt).
        positions: offsets from the last token (-1 = last).
    Returns:
        columns :data:`COLUMNS` (``head`` = -1 for resid rows, ``position`` = 0 for "all
        positions", ``token`` = the first clean prompt's token at that position).
    """
    if site not in SITES:
        raise InputError(f"unknown patching site '{site}': use z or resid")
    layers, heads = model.check_heads(layers, heads)
    shortest = int(setup_.clean.lengths.min())
    if positions is None:
        positions = [None] if site == "z" else list(range(-shortest, 0))
    positions = list(positions)
    if site == "z":
        patches = [Patch("z", layer, head, pos) for layer in layers for head in heads for pos in positions]
    else:
        patches = [Patch("resid", layer, None, pos) for layer in layers for pos in positions]
    patched, clean, corrupt = patched_metrics(model, setup_, patches, tokens_per_forward=tokens_per_forward,
                                              progress=progress)
    value, low, high = recovery(patched, clean, corrupt, n_boot=n_boot)
    labels = setup_.labels
    return pd.DataFrame({
        "site": site, "layer": [p.layer for p in patches],
        "head": [-1 if p.head is None else p.head for p in patches],
        "position": [0 if p.position is None else p.position for p in patches],
        "token": ["(all)" if p.position is None else labels[len(labels) + p.position] for p in patches],
        "recovery": value, "ci_low": low, "ci_high": high,
        "metric_patched": patched.mean(-1).numpy(), "metric_clean": float(clean.mean()),
        "metric_corrupt": float(corrupt.mean()), "n_samples": patched.shape[1],
    }, columns=COLUMNS)


def heatmap(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Layer × head (z, all positions) or layer × position (resid, or z at one position) heatmap
    of the recovery; a cell's ``customdata`` is ``[layer, head, position]``."""
    if table.empty:
        raise InputError("empty patching table: nothing to plot")
    site = table["site"].iloc[0]
    by_head = site == "z"
    if by_head and table["position"].nunique() != 1:
        raise InputError("a z-patching table with several positions: plot one position at a time "
                         "(table[table.position == p])")
    column = "head" if by_head else "position"
    cols = sorted(table[column].unique())
    layers = sorted(table["layer"].unique())
    grid = table.pivot_table(index="layer", columns=column, values="recovery", aggfunc="mean", dropna=False)
    grid = grid.reindex(index=layers, columns=cols)
    head_of = np.array(cols)[None, :] if by_head else -1
    position_of = int(table["position"].iloc[0]) if by_head else np.array(cols)[None, :]
    custom = np.stack(np.broadcast_arrays(np.array(layers)[:, None], head_of, position_of), -1)
    if by_head:
        x = [f"H{h}" for h in cols]
    else:
        tokens = table.drop_duplicates("position").set_index("position")["token"]
        x = [f"{p}: {tokens.get(p, '')!r}" for p in cols]
    span = float(np.nanmax(np.abs(grid.values))) if np.isfinite(grid.values).any() else 1.0
    figure = go.Figure(go.Heatmap(z=grid.values, x=x, y=[f"L{layer}" for layer in layers], customdata=custom,
                                  colorscale="RdBu", zmid=0, zmin=-span, zmax=span,
                                  colorbar={"title": "recovery"},
                                  hovertemplate="%{y} %{x}<br>recovery %{z:.3f}<extra></extra>"))
    where = "all positions" if table["position"].iloc[0] == 0 else f"position {table['position'].iloc[0]}"
    what = f"head z ({where})" if by_head else "residual stream"
    figure.update_layout(title=title or f"activation patching: {what}", xaxis_title=column,
                         yaxis_title="layer", yaxis_autorange="reversed")
    return figure
