"""Head atlas: every head embedded in 2-D by its statistics profile over a dataset.

Feature vector of a head = the dataset means of every :class:`probes.PatternStats` metric and
every :class:`probes.Detectors` score (standardised per feature); embedding by UMAP
(umap-learn), t-SNE or PCA (scikit-learn). A head's class is the detector with the highest
score when that score is above a threshold, else ``"other"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from app.web.jobs import JobContext
from app.web.services.analysis import run_pipeline
from app.web.services.workspace import Workspace
from probes.detectors import Detectors
from workbench.capture import resolve_mode
from workbench.data import load_dataset
from workbench.errors import InputError
from workbench.model import load_model

Method = Literal["umap", "tsne", "pca"]
METHODS: dict[str, str] = {"umap": "UMAP (umap-learn)", "tsne": "t-SNE (scikit-learn)", "pca": "PCA (scikit-learn)"}
DETECTORS = Detectors.metrics
MAX_SAMPLES = 64


@dataclass
class Atlas:
    """A finished embedding.

    Attributes:
        table: one row per head: ``layer, head, x, y`` plus one column per feature.
        features: the feature column names.
        description: what was embedded (model, dataset, samples, method).
    """

    table: pd.DataFrame
    features: list[str]
    description: str


def start_atlas(ws: Workspace, model_name: str, dataset: str | None, n: int | None, method: str | None,
                batch_size: int = 4) -> str:
    """Validate, then queue the atlas job; returns the job id."""
    model_name = ws.check_model(model_name)
    from app.web.services.analysis import check_dataset
    from app.web.services.inputs import parse_int

    dataset = check_dataset(ws, dataset)
    if method not in METHODS:
        raise InputError(f"unknown embedding '{method}': use one of {', '.join(METHODS)}")
    n = parse_int(n, "samples", 1, MAX_SAMPLES, 16)

    def job(ctx: JobContext) -> dict:
        return {"kind": "atlas", "key": ws.atlases.put(build_atlas(ws, model_name, dataset, n, method, ctx, batch_size))}

    return ws.jobs.submit("atlas", job)


def head_features(ws: Workspace, model_name: str, dataset: str, n: int, ctx: JobContext,
                  batch_size: int = 4) -> tuple[pd.DataFrame, list[str]]:
    """Per-head dataset means of every stats metric and detector: ``layer, head, <features>``."""
    ctx.progress(0.02, f"loading {model_name}")
    model = load_model(model_name)
    batch = load_dataset(dataset, model, n=n)
    width = int(batch.lengths.max())
    if width > ws.limits.stats:
        raise InputError(f"{dataset} has sequences of {width} tokens, above the app's limit of {ws.limits.stats}")
    mode = resolve_mode("auto", width, ws.limits.patterns)
    per_sample: dict[str, list[torch.Tensor]] = {}
    chunks = batch.chunks(batch_size)
    layers = heads = None
    for i, chunk in enumerate(chunks):
        result = run_pipeline(model, chunk, ["stats", "detectors"], mode, ctx, 0.05 + 0.75 * i / len(chunks),
                              0.75 / len(chunks))
        layers, heads = result.layers, result.heads
        for probe in result.probes.values():
            for metric, values in probe.per_sample_.items():
                per_sample.setdefault(metric, []).append(values)
    ctx.check()
    grid_l, grid_h = np.meshgrid(layers, heads, indexing="ij")
    table = pd.DataFrame({"layer": grid_l.ravel(), "head": grid_h.ravel()})
    for metric, parts in per_sample.items():
        values = torch.cat(parts).double().numpy()  # [S, L, H]
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(values)
            mean = np.where(finite.any(0), np.where(finite, values, 0).sum(0) / np.maximum(finite.sum(0), 1), np.nan)
        table[metric] = mean.ravel()
    return table, list(per_sample)


def embed(features: np.ndarray, method: Method, seed: int = 0) -> np.ndarray:
    """2-D embedding ``[n_heads, 2]`` of standardised features ``[n_heads, F]`` (NaN -> feature mean)."""
    from sklearn.preprocessing import StandardScaler

    n = features.shape[0]
    if n < 3:
        raise InputError(f"only {n} heads: an embedding needs at least 3")
    column_mean = np.nanmean(np.where(np.isfinite(features), features, np.nan), axis=0)
    filled = np.where(np.isfinite(features), features, np.nan_to_num(column_mean)[None, :])
    scaled = StandardScaler().fit_transform(filled)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(scaled)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(scaled)
    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, n - 1)), random_state=seed,
                        init="spectral" if n > 10 else "random")
    return reducer.fit_transform(scaled)


def build_atlas(ws: Workspace, model_name: str, dataset: str, n: int, method: Method, ctx: JobContext,
                batch_size: int = 4) -> Atlas:
    table, features = head_features(ws, model_name, dataset, n, ctx, batch_size)
    ctx.progress(0.85, f"embedding {len(table)} heads with {METHODS[method]}")
    xy = embed(table[features].to_numpy(dtype=float), method)
    ctx.check()
    table["x"], table["y"] = xy[:, 0], xy[:, 1]
    return Atlas(table, features, f"{model_name} on {Path(dataset).name} ({n} samples), {METHODS[method]}")


def head_class(table: pd.DataFrame, threshold: float) -> pd.Series:
    """The detector with the highest score when above ``threshold``, else ``"other"``."""
    scores = table[list(DETECTORS)].fillna(-np.inf)
    best = scores.idxmax(axis=1)
    return best.where(scores.max(axis=1) > threshold, "other")


OTHER_COLOUR = "#c7c9cf"  # the catch-all class, greyed so the detector classes stand out


def atlas_figure(atlas: Atlas, color_by: str | None, threshold: float | None,
                 selected: tuple[int, int] | None = None) -> go.Figure:
    """Scatter of the heads; ``customdata = (layer, head)`` so a click selects the head.

    The catch-all class ``other`` is grey; the session's selected head is ringed."""
    table = atlas.table.copy()
    table["class"] = head_class(table, 0.3 if threshold is None else float(threshold))
    hover = ("L%{customdata[0]}H%{customdata[1]} — %{customdata[2]}<br>"
             + "<br>".join(f"{d} %{{customdata[{3 + i}]:.3f}}" for i, d in enumerate(DETECTORS))
             + "<extra></extra>")
    custom_cols = ["layer", "head", "class", *DETECTORS]
    fig = go.Figure()
    if color_by == "class":
        for name, rows in table.groupby("class", sort=True):
            marker = dict(size=11, line=dict(width=0.5, color="#333"))
            if name == "other":
                marker.update(color=OTHER_COLOUR, opacity=0.7)
            fig.add_trace(go.Scatter(x=rows["x"], y=rows["y"], mode="markers", name=str(name),
                                     customdata=rows[custom_cols].to_numpy().tolist(), hovertemplate=hover,
                                     marker=marker))
    else:
        fig.add_trace(go.Scatter(
            x=table["x"], y=table["y"], mode="markers", name="heads", customdata=table[custom_cols].to_numpy().tolist(),
            hovertemplate=hover,
            marker=dict(size=11, color=table["layer"], colorscale="Viridis", showscale=True,
                        colorbar=dict(title="layer"), line=dict(width=0.5, color="#333"))))
    if selected is not None:
        row = table[(table["layer"] == selected[0]) & (table["head"] == selected[1])]
        if not row.empty:
            fig.add_trace(go.Scatter(x=row["x"], y=row["y"], mode="markers+text", name="selected",
                                     text=[f"L{selected[0]}H{selected[1]}"], textposition="top center",
                                     hoverinfo="skip", marker=dict(size=22, color="rgba(0,0,0,0)",
                                                                   line=dict(width=3, color="#d62728"))))
    fig.update_layout(title=atlas.description, height=620, xaxis_title="dim 1", yaxis_title="dim 2",
                      clickmode="event", margin=dict(l=50, r=20, t=50, b=40))
    return fig
