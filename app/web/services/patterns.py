"""Pattern viewer: one head's token × token map, zoomable, and the row view.

Only what is on screen goes to the browser: a region up to ``EXACT`` tokens per axis is sent
exactly (with token labels); a larger one as a max-pooled thumbnail of at most ``THUMB`` bins
per axis. Patterns-mode analyses pool the kept map; stats-mode analyses (long inputs) recompute
exact tiles and pooled thumbnails from the saved Q/K/LSE (:mod:`workbench.recompute`), so the
whole map is never built.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from app.web.services.analysis import Analysis
from probes.figures import pattern_heatmap
from workbench.errors import InputError
from workbench.recompute import thumbnail_from_capture, tile_from_capture

EXACT = 160   # tokens per axis shown exactly, with labels
THUMB = 192   # bins per axis of a pooled view
ROW_EXACT = 256  # keys of a row shown exactly (one bar per key); longer rows are pooled to ROW_BINS
ROW_BINS = 480   # about the plot width in pixels / 2: a pooled row keeps the max of each bin
ROW_LABELS = 64   # at most this many key labels on the row view's axis
ROW_TOPK = 8      # the row's strongest keys, listed wherever they are
ROW_TOP_LABELS = 3  # of which the strongest are labelled on the plot (all are in the table)
LOG_FLOOR = 1e-6  # log-scale views show log10(max(weight, LOG_FLOOR))

Region = tuple[int, int, int, int]  # q0, q1, k0, k1 (half-open token ranges)


def check_head(analysis: Analysis, layer: int | None, head: int | None) -> tuple[int, int]:
    if layer is None or head is None:
        raise InputError("no head selected: pick a layer and head, or click one on the Head map page")
    analysis.capture.index_of(int(layer), int(head))  # raises a clear InputError when outside
    return int(layer), int(head)


def full_region(analysis: Analysis) -> Region:
    n = analysis.n_tokens
    return (0, n, 0, n)


def _tile(analysis: Analysis, layer: int, head: int, region: Region) -> torch.Tensor:
    q0, q1, k0, k1 = region
    if analysis.mode == "patterns":
        return analysis.capture.pattern(layer, head, 0)[q0:q1, k0:k1]
    return tile_from_capture(analysis.capture, layer, head, 0, (q0, q1), (k0, k1))


def _pooled(analysis: Analysis, layer: int, head: int, region: Region) -> torch.Tensor:
    """Max over bins of the region, at most ``THUMB`` bins per axis (``kernels``' bin edges)."""
    q0, q1, k0, k1 = region
    if analysis.mode == "stats":
        whole = region == full_region(analysis)
        mx, _ = thumbnail_from_capture(analysis.capture, layer, head, 0, size=THUMB,
                                       q_range=None if whole else (q0, q1), k_range=None if whole else (k0, k1))
        return mx
    tile = analysis.capture.pattern(layer, head, 0)[q0:q1, k0:k1]
    return torch.nn.functional.adaptive_max_pool2d(tile[None, None], (min(THUMB, q1 - q0), min(THUMB, k1 - k0)))[0, 0]


def view_region(analysis: Analysis, region: Region | None, hide_bos: bool = False) -> Region:
    """The region to draw: ``region`` (or the whole map), without key 0 when ``hide_bos``."""
    q0, q1, k0, k1 = region or full_region(analysis)
    if hide_bos and k0 == 0 and k1 > 1:
        k0 = 1
    return q0, q1, k0, k1


def _scaled(values: torch.Tensor, log: bool) -> torch.Tensor:
    return values.clamp_min(LOG_FLOOR).log10() if log else values


def pattern_view(analysis: Analysis, layer: int, head: int, region: Region | None = None, *,
                 log: bool = False, hide_bos: bool = False, query: int | None = None) -> tuple[go.Figure, dict, str]:
    """Figure of ``region`` of one head's map, the view description (for zoom), and an info line.

    Args:
        log: colour by log10 of the weight (small weights become visible next to a sink).
        hide_bos: leave key 0 (the BOS / sink column) out, so the colour scale fits the rest.
        query: mark this query row on the map (the row view's token), when it is in the region.
    """
    layer, head = check_head(analysis, layer, head)
    q0, q1, k0, k1 = view_region(analysis, region, hide_bos)
    title = f"L{layer}H{head} attention pattern"
    scale_note = " (log10 weight)" if log else ""
    zmin = math.log10(LOG_FLOOR) if log else 0.0
    if q1 - q0 <= EXACT and k1 - k0 <= EXACT:
        tokens = analysis.tokens
        tile = _tile(analysis, layer, head, (q0, q1, k0, k1))
        fig = pattern_heatmap(_scaled(tile, log), tokens[q0:q1], tokens[k0:k1], title=title + scale_note,
                              q_offset=q0, k_offset=k0)
        fig.update_traces(zmin=zmin)
        if log:
            fig.update_traces(hovertemplate="query %{y}<br>key %{x}<br>log10 weight %{z:.3f}<extra></extra>")
        fig.update_layout(height=max(420, min(900, 14 * (q1 - q0) + 160)))
        if query is not None and q0 <= query < q1:
            fig.add_shape(type="rect", xref="paper", x0=0, x1=1, yref="y", y0=query - q0 - 0.5,
                          y1=query - q0 + 0.5, line=dict(color="#d62728", width=2), fillcolor="rgba(0,0,0,0)")
        view = {"kind": "tile", "q0": q0, "q1": q1, "k0": k0, "k1": k1}
        info = f"exact weights, queries [{q0}, {q1}) × keys [{k0}, {k1}); drag to zoom, double-click to reset"
        return fig, view, info
    pooled = _scaled(_pooled(analysis, layer, head, (q0, q1, k0, k1)).float().cpu(), log).numpy()
    dq, dk = (q1 - q0) / pooled.shape[0], (k1 - k0) / pooled.shape[1]
    what = "max log10 weight in bin" if log else "max weight in bin"
    fig = go.Figure(go.Heatmap(
        z=pooled, x0=k0 + dk / 2, dx=dk, y0=q0 + dq / 2, dy=dq, colorscale="Blues", zmin=zmin,
        hovertemplate=f"query ≈ %{{y:.0f}}<br>key ≈ %{{x:.0f}}<br>{what} %{{z:.4f}}<extra></extra>"))
    fig.update_layout(title=f"{title} (max-pooled){scale_note}", xaxis_title="key position",
                      yaxis_title="query position", height=640, margin=dict(l=60, r=20, t=50, b=50))
    fig.update_yaxes(autorange="reversed")
    if query is not None and q0 <= query < q1:
        fig.add_shape(type="rect", xref="paper", x0=0, x1=1, yref="y", y0=query, y1=query + max(1.0, dq),
                      line=dict(color="#d62728", width=2), fillcolor="rgba(0,0,0,0)")
    view = {"kind": "pooled", "q0": q0, "q1": q1, "k0": k0, "k1": k1}
    info = (f"{analysis.n_tokens} tokens: each cell is the max over about {dq:.0f} × {dk:.0f} tokens "
            f"(queries [{q0}, {q1}) × keys [{k0}, {k1})); zoom to below {EXACT} tokens for exact weights")
    return fig, view, info


def region_from_relayout(view: dict | None, relayout: dict | None, n: int) -> Region | None:
    """The region a zoom/reset event asks for; None when the event is not a zoom.

    ``view`` says how the shown figure maps axis units to tokens: ``tile`` figures have
    categorical axes (index 0 = ``k0``/``q0``), ``pooled`` ones are in token positions.
    """
    if not relayout or not view:
        return None
    if relayout.get("xaxis.autorange") or relayout.get("yaxis.autorange"):
        return (0, n, 0, n)
    keys = ("xaxis.range[0]", "xaxis.range[1]", "yaxis.range[0]", "yaxis.range[1]")
    if not any(k in relayout for k in keys):
        return None
    offset_k = view["k0"] if view["kind"] == "tile" else 0
    offset_q = view["q0"] if view["kind"] == "tile" else 0
    shift = 0.5 if view["kind"] == "tile" else 0.0  # category i spans [i - 0.5, i + 0.5]

    def span(a_key: str, b_key: str, lo: int, hi: int, offset: int) -> tuple[int, int]:
        if a_key not in relayout or b_key not in relayout:
            return lo, hi
        a, b = sorted((float(relayout[a_key]), float(relayout[b_key])))
        start = max(0, math.floor(a + shift) + offset)
        stop = min(n, math.ceil(b + shift) + offset)
        return (start, stop) if stop > start else (lo, hi)

    k0, k1 = span("xaxis.range[0]", "xaxis.range[1]", view["k0"], view["k1"], offset_k)
    q0, q1 = span("yaxis.range[0]", "yaxis.range[1]", view["q0"], view["q1"], offset_q)
    return (q0, q1, k0, k1)


def check_query(analysis: Analysis, query: int | None) -> int:
    n = analysis.n_tokens
    query = n - 1 if query is None else int(query)
    if not 0 <= query < n:
        raise InputError(f"query position {query} is outside the prompt of {n} tokens: use 0..{n - 1}")
    return query


def row_weights(analysis: Analysis, layer: int, head: int, query: int) -> torch.Tensor:
    """The whole exact row ``[n_keys]`` of ``query`` (keys ``0..query`` when causal).

    Stats mode recomputes it from the saved q, k and LSE (:func:`workbench.recompute.tile_from_capture`,
    ``O(n · d)``); the full map is never built.
    """
    stop = query + 1 if analysis.capture.causal else analysis.n_tokens
    return _tile(analysis, layer, head, (query, query + 1, 0, stop))[0].float().cpu()


def row_view(analysis: Analysis, layer: int, head: int, query: int | None,
             k_range: tuple[int, int] | None = None, *, log: bool = False, hide_bos: bool = False,
             topk: int = ROW_TOPK) -> go.Figure:
    """What token ``query`` attends to: its whole row, wherever the keys are.

    Up to ``ROW_EXACT`` keys (the row, or the zoomed ``k_range``) are one exact bar each; a
    longer row is max-pooled to ``ROW_BINS`` bars (no key is dropped), and its ``topk``
    strongest keys are marked with their exact weights (red diamonds). The key axis is in token
    positions, so a zoom (``k_range``) shows that part exactly.
    """
    layer, head = check_head(analysis, layer, head)
    query = check_query(analysis, query)
    weights = row_weights(analysis, layer, head, query)
    stop = weights.numel()
    start, end = (0, stop) if k_range is None else (max(0, int(k_range[0])), min(stop, int(k_range[1])))
    if hide_bos and start == 0 and end > 1:
        start = 1
    if end <= start:
        start, end = 0, stop
    tokens = analysis.tokens
    shown = weights[start:end]
    label = f"token {query} {tokens[query]!r} (L{layer}H{head})"
    fig = go.Figure()
    if end - start <= ROW_EXACT:
        positions = list(range(start, end))
        fig.add_trace(go.Bar(x=positions, y=shown.numpy(), name="weight",
                             customdata=[repr(tokens[j]) for j in positions],
                             hovertemplate="key %{x}: %{customdata}<br>weight %{y:.4f}<extra></extra>"))
        labels = [f"{j}:{tokens[j]!r}" for j in positions]
        step = max(1, -(-len(labels) // ROW_LABELS))  # label every k-th key so the labels stay readable
        fig.update_xaxes(tickmode="array", tickvals=positions[::step], ticktext=labels[::step])
        detail = "exact"
    else:
        edges = torch.linspace(start, end, ROW_BINS + 1).round().long()
        bins = torch.bucketize(torch.arange(start, end), edges[1:], right=True)
        pooled = torch.zeros(ROW_BINS).scatter_reduce_(0, bins, shown, "amax", include_self=False)
        centres = ((edges[:-1] + edges[1:]).float() / 2).numpy()
        fig.add_trace(go.Bar(x=centres, y=pooled.numpy(), width=(edges[1:] - edges[:-1]).numpy(), name="max in bin",
                             customdata=list(zip(edges[:-1].tolist(), (edges[1:] - 1).tolist())),
                             hovertemplate="keys %{customdata[0]}..%{customdata[1]}<br>max weight %{y:.4f}"
                                           "<extra></extra>"))
        detail = f"max-pooled, {(end - start) / ROW_BINS:.1f} keys per bar; zoom for exact weights"
    top = top_keys_of(weights, tokens, topk, start, end)
    if top and end - start > ROW_EXACT:
        fig.add_trace(go.Scatter(x=[p for p, _, _ in top], y=[w for _, _, w in top], mode="markers+text",
                                 name=f"top-{len(top)} keys",
                                 text=spaced_labels(top, end - start),
                                 textposition="top center", marker=dict(color="#d62728", symbol="diamond", size=9),
                                 customdata=[repr(t) for _, t, _ in top],
                                 hovertemplate="key %{x}: %{customdata}<br>weight %{y:.4f}<extra></extra>"))
    fig.update_layout(title=f"what {label} attends to: keys {start}..{end - 1} of {stop} ({detail})",
                      xaxis_title="key position", yaxis_title="attention weight", height=340, showlegend=False,
                      margin=dict(l=50, r=20, t=50, b=80), bargap=0)
    if log:
        fig.update_yaxes(type="log")
    return fig


def spaced_labels(top: list[tuple[int, str, float]], span: int, count: int = ROW_TOP_LABELS,
                  gap: float = 0.12) -> list[str]:
    """Plot labels ``"pos:'token'"`` for the strongest of ``top`` (strongest first), at most ``count``,
    skipping a key closer than ``gap`` of the shown ``span`` to one already labelled (their labels
    would overlap); the others get "" (they keep their marker, hover and table row)."""
    labels, placed = [], []
    for pos, token, _ in top:
        free = len(placed) < count and all(abs(pos - other) >= gap * span for other in placed)
        labels.append(f"{pos}:{token!r}" if free else "")
        if free:
            placed.append(pos)
    return labels


def top_keys_of(weights: torch.Tensor, tokens: list[str], k: int, start: int = 0,
                stop: int | None = None) -> list[tuple[int, str, float]]:
    """The ``k`` largest entries of a row ``weights [n]`` within ``[start, stop)``: ``(position, token, weight)``."""
    stop = weights.numel() if stop is None else stop
    part = weights[start:stop]
    if part.numel() == 0:
        return []
    values, index = torch.topk(part, min(k, part.numel()))
    return [(start + int(j), tokens[start + int(j)], float(v)) for v, j in zip(values, index)]


def top_keys(analysis: Analysis, layer: int, head: int, query: int, k: int = 5) -> list[tuple[int, str, float]]:
    """The ``k`` keys ``query`` attends to most over its whole row: ``(position, token, weight)``."""
    layer, head = check_head(analysis, layer, head)
    query = check_query(analysis, query)
    return top_keys_of(row_weights(analysis, layer, head, query), analysis.tokens, k)


def row_range_from_relayout(relayout: dict | None, n_keys: int) -> tuple[int, int] | None | bool:
    """Key range a zoom on the row view asks for; ``False`` for a reset, None when not a zoom."""
    if not relayout:
        return None
    if relayout.get("xaxis.autorange"):
        return False
    if "xaxis.range[0]" not in relayout or "xaxis.range[1]" not in relayout:
        return None
    a, b = sorted((float(relayout["xaxis.range[0]"]), float(relayout["xaxis.range[1]"])))
    start, stop = max(0, math.ceil(a - 0.5)), min(n_keys, math.floor(b + 0.5) + 1)
    return (start, stop) if stop > start else None
