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
from probes.figures import pattern_heatmap, row_bar
from workbench.errors import InputError
from workbench.recompute import thumbnail_from_capture, tile_from_capture

EXACT = 160   # tokens per axis shown exactly, with labels
THUMB = 192   # bins per axis of a pooled view
ROW_WINDOW = 256  # keys shown in the row view of long inputs
ROW_LABELS = 64   # at most this many key labels on the row view's axis

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


def pattern_view(analysis: Analysis, layer: int, head: int, region: Region | None = None) -> tuple[go.Figure, dict, str]:
    """Figure of ``region`` of one head's map, the view description (for zoom), and an info line."""
    layer, head = check_head(analysis, layer, head)
    q0, q1, k0, k1 = region or full_region(analysis)
    title = f"L{layer}H{head} attention pattern"
    if q1 - q0 <= EXACT and k1 - k0 <= EXACT:
        tokens = analysis.tokens
        fig = pattern_heatmap(_tile(analysis, layer, head, (q0, q1, k0, k1)), tokens[q0:q1], tokens[k0:k1],
                              title=title, q_offset=q0, k_offset=k0)
        fig.update_layout(height=max(420, min(900, 14 * (q1 - q0) + 160)))
        view = {"kind": "tile", "q0": q0, "q1": q1, "k0": k0, "k1": k1}
        info = f"exact weights, queries [{q0}, {q1}) × keys [{k0}, {k1}); drag to zoom, double-click to reset"
        return fig, view, info
    pooled = _pooled(analysis, layer, head, (q0, q1, k0, k1)).float().cpu().numpy()
    dq, dk = (q1 - q0) / pooled.shape[0], (k1 - k0) / pooled.shape[1]
    fig = go.Figure(go.Heatmap(
        z=pooled, x0=k0 + dk / 2, dx=dk, y0=q0 + dq / 2, dy=dq, colorscale="Blues", zmin=0.0,
        hovertemplate="query ≈ %{y:.0f}<br>key ≈ %{x:.0f}<br>max weight in bin %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"{title} (max-pooled)", xaxis_title="key position", yaxis_title="query position",
                      height=640, margin=dict(l=60, r=20, t=50, b=50))
    fig.update_yaxes(autorange="reversed")
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


def row_view(analysis: Analysis, layer: int, head: int, query: int | None) -> go.Figure:
    """Bar chart of what token ``query`` attends to (a window of keys for long inputs)."""
    layer, head = check_head(analysis, layer, head)
    n = analysis.n_tokens
    query = n - 1 if query is None else int(query)
    if not 0 <= query < n:
        raise InputError(f"query position {query} is outside the prompt of {n} tokens: use 0..{n - 1}")
    stop = query + 1 if analysis.capture.causal else n
    start = max(0, stop - ROW_WINDOW)
    weights = _tile(analysis, layer, head, (query, query + 1, start, stop))[0]
    tokens = analysis.tokens
    fig = row_bar(weights, tokens[start:stop], query_label=f"token {query} {tokens[query]!r} (L{layer}H{head})")
    labels = [f"{start + j}:{t!r}" for j, t in enumerate(tokens[start:stop])]
    fig.update_traces(x=labels)
    if len(labels) > ROW_LABELS:  # label every k-th key so the labels stay readable
        step = -(-len(labels) // ROW_LABELS)
        fig.update_xaxes(tickmode="array", tickvals=labels[::step], ticktext=labels[::step])
    if start > 0:
        fig.update_layout(title=f"{fig.layout.title.text} (keys {start}..{stop - 1})")
    fig.update_layout(height=320)
    return fig


def top_keys(analysis: Analysis, layer: int, head: int, query: int, k: int = 5) -> list[tuple[int, str, float]]:
    """The ``k`` keys ``query`` attends to most: ``(position, token, weight)``."""
    n = analysis.n_tokens
    stop = query + 1 if analysis.capture.causal else n
    weights = _tile(analysis, layer, head, (query, query + 1, 0, stop))[0]
    values, index = torch.topk(weights, min(k, stop))
    tokens = analysis.tokens
    return [(int(j), tokens[int(j)], float(v)) for v, j in zip(values, index)]

