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
