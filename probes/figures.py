"""Pure plotly figure builders (no Dash, no model): heatmaps, patterns, curves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch


def head_heatmap(frame: pd.DataFrame, metric: str, *, probe: str | None = None,
                 title: str | None = None, selected: tuple[int, int] | None = None) -> go.Figure:
    """Layer × head heatmap of one metric from a tidy head table.

    Hover shows the value and its 95% interval; ``customdata`` carries ``(layer, head)`` so a
    click can select the head.
    """
    rows = frame[frame["metric"] == metric]
    if probe is not None:
        rows = rows[rows["probe"] == probe]
    if rows.empty:
        raise ValueError(f"no rows for metric '{metric}' in the table")
    grid = rows.pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
    low = rows.pivot_table(index="layer", columns="head", values="ci_low", aggfunc="mean", dropna=False)
    high = rows.pivot_table(index="layer", columns="head", values="ci_high", aggfunc="mean", dropna=False)
    low, high = low.reindex_like(grid), high.reindex_like(grid)
    layers, heads = grid.index.to_numpy(), grid.columns.to_numpy()
    interval = np.vectorize(lambda lo, hi: "n/a (one sample)" if not (np.isfinite(lo) and np.isfinite(hi))
                            else f"[{lo:.4g}, {hi:.4g}]", otypes=[object])(low.to_numpy(), high.to_numpy())
    custom = np.stack([
        np.repeat(layers[:, None], len(heads), 1).astype(object),
        np.repeat(heads[None, :], len(layers), 0).astype(object), interval,
    ], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[str(h) for h in heads], y=[str(layer) for layer in layers],
        customdata=custom, colorscale="Viridis", colorbar=dict(title=metric),
        hovertemplate=(f"layer %{{customdata[0]}} head %{{customdata[1]}}<br>{metric} = %{{z:.4g}}"
                       "<br>95% CI %{customdata[2]}<extra></extra>"),
    ))
    if selected is not None:
        fig.add_shape(type="rect", x0=selected[1] - 0.5, x1=selected[1] + 0.5, y0=selected[0] - 0.5,
                      y1=selected[0] + 0.5, line=dict(color="red", width=3), xref="x", yref="y")
    fig.update_layout(title=title or metric, xaxis_title="head", yaxis_title="layer",
                      margin=dict(l=50, r=20, t=50, b=40))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def pattern_heatmap(pattern: torch.Tensor, query_tokens: Sequence[str], key_tokens: Sequence[str] | None = None,
                    *, title: str = "attention pattern", q_offset: int = 0, k_offset: int = 0) -> go.Figure:
    """Token × token map ``pattern [q, k]`` with token labels (``offset`` = absolute start)."""
    key_tokens = query_tokens if key_tokens is None else key_tokens
    values = pattern.detach().float().cpu().numpy()
    q_labels = [f"{q_offset + i}:{t!r}" for i, t in enumerate(query_tokens)]
    k_labels = [f"{k_offset + j}:{t!r}" for j, t in enumerate(key_tokens)]
    fig = go.Figure(go.Heatmap(
        z=values, x=k_labels, y=q_labels, colorscale="Blues", zmin=0.0,
        hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.4f}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="key (attended to)", yaxis_title="query",
                      margin=dict(l=80, r=20, t=50, b=80))
    fig.update_yaxes(autorange="reversed")
    return fig


def row_bar(weights: torch.Tensor, key_tokens: Sequence[str], *, query_label: str) -> go.Figure:
    """Bar chart: what one query token attends to."""
    values = weights.detach().float().cpu().numpy()
    fig = go.Figure(go.Bar(x=[f"{j}:{t!r}" for j, t in enumerate(key_tokens)], y=values,
                           hovertemplate="%{x}<br>%{y:.4f}<extra></extra>"))
    fig.update_layout(title=f"what {query_label} attends to", yaxis_title="attention weight",
                      margin=dict(l=50, r=20, t=50, b=80))
    return fig


def curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
           x_title: str, y_title: str) -> go.Figure:
    """Line chart of named ``(x, y)`` series (pruning curves, sparsity curves)."""
    fig = go.Figure()
    for name, (x, y) in series.items():
        fig.add_trace(go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


STREAMING_THRESHOLD = 0.95  # streaming_mass above this: a sink + sliding-window KV cache serves the head


def taxonomy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per head from a tidy head table holding the ``retrieval`` and ``sparsity`` metrics:
    ``layer, head``, one column per metric (the dataset mean) and ``retrieval_ci_low/high``.

    Raises:
        ValueError: the table lacks ``retrieval_score`` or ``streaming_mass``.
    """
    rows = frame[frame["probe"].isin(["retrieval", "sparsity"])]
    missing = {"retrieval_score", "streaming_mass"} - set(rows["metric"])
    if missing:
        raise ValueError(f"the table has no {', '.join(sorted(missing))}: run the retrieval and sparsity probes")
    wide = rows.pivot_table(index=["layer", "head"], columns="metric", values="value", aggfunc="mean", dropna=False)
    score = rows[rows["metric"] == "retrieval_score"].set_index(["layer", "head"])
    wide["retrieval_ci_low"], wide["retrieval_ci_high"] = score["ci_low"], score["ci_high"]
    wide.columns.name = None
    return wide.reset_index()


def kv_saliency_line(kv: dict) -> str:
    """``"KV saliency: 49.4% of tokens hold 90% of the received mass"`` from a run's ``kv_saliency``
    (``SparsityProfile.kv_saliency_``: ``mean`` share, ``keep`` target); "" when either is missing."""
    if not {"mean", "keep"} <= set(kv or {}):
        return ""
    return f"KV saliency: {kv['mean']:.1%} of tokens hold {kv['keep']:.0%} of the received mass"


def taxonomy_scatter(table: pd.DataFrame, *, title: str) -> go.Figure:
    """Every head at (``streaming_mass``, ``retrieval_score``), coloured by ``block_density_90`` when
    present; ``customdata = (layer, head, density, ci_low, ci_high, xattn_recall)`` so a click can
    select the head. ``table``: :func:`taxonomy_table`."""
    t = table.copy()
    for col in ("block_density_90", "retrieval_ci_low", "retrieval_ci_high", "xattn_recall"):
        if col not in t:
            t[col] = np.nan
    cols = ["layer", "head", "block_density_90", "retrieval_ci_low", "retrieval_ci_high", "xattn_recall"]
    hover = ("L%{customdata[0]}H%{customdata[1]}<br>retrieval %{y:.2f} [%{customdata[3]:.2f}, %{customdata[4]:.2f}]"
             "<br>streaming mass %{x:.3f}<br>block density 90 %{customdata[2]:.3f}"
             "<br>XAttention recall %{customdata[5]:.3f}<extra></extra>")
    fig = go.Figure(go.Scatter(
        x=t["streaming_mass"], y=t["retrieval_score"], mode="markers", customdata=t[cols].to_numpy().tolist(),
        hovertemplate=hover, marker=dict(size=10, color=t["block_density_90"], colorscale="Viridis", showscale=True,
                                         colorbar=dict(title="block density 90"), line=dict(width=0.5, color="#333"))))
    fig.add_vline(x=STREAMING_THRESHOLD, line_dash="dot", annotation_text="sink + window enough",
                  annotation_position="top left")
    fig.update_layout(title=title, xaxis_title="streaming_mass (first 4 + last 256 keys)",
                      yaxis_title="retrieval_score", height=600, clickmode="event", margin=dict(l=60, r=20, t=80, b=50))
    return fig
