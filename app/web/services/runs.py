"""Runs: browse batch run folders written by ``workbench analyze`` and compare two of them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from app.web.services.headmap import metric_value, split_metric_value
from probes.figures import head_heatmap
from workbench.errors import InputError
from workbench.runstore import Run, is_listable, read_run

TABLE_ROWS = 200


def discover_runs(root: Path) -> list[dict]:
    """Dropdown options: sub-folders of the runs root holding a ``manifest.json`` (values are the
    folder names; hidden folders, such as a writer's ``.tmp-*``/``.old-*``, are never listed)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir()
                   if is_listable(p) and p.is_dir() and (p / "manifest.json").is_file())
    return [{"label": p.name, "value": p.name} for p in found]


def resolve_run(root: Path, name: str | None) -> Path:
    """The folder of run ``name`` under the runs root; anything that leaves the root is refused
    before the disk is looked at (so the answer never says whether an outside path exists).

    Raises:
        InputError: empty, outside the runs root, or no run of that name.
    """
    if not name or not str(name).strip():
        raise InputError("no run chosen: pick one from the list of runs")
    root = Path(root).expanduser().resolve()
    text = str(name).strip()
    candidate = Path(text).expanduser()
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if path == root or not path.is_relative_to(root) or any(part.startswith(".") for part in path.relative_to(root).parts):
        raise InputError(f"'{text}' is not a run under the runs root {root}: the app opens only run folders "
                         "there (start it with --runs-dir FOLDER for another root); pick one from the list")
    if not (path / "manifest.json").is_file():
        raise InputError(f"no run named '{path.relative_to(root)}' under the runs root: pick one from the list")
    return path


def open_run(root: Path, name: str | None) -> Run:
    """Read run ``name`` under the runs root (clear :class:`InputError` when refused, missing or malformed)."""
    return read_run(resolve_run(root, name))


MATCH_FIELDS = ("model", "dataset", "seq_lengths", "n", "mode")


def run_differences(a: Run, b: Run) -> list[str]:
    """The manifest fields in which two runs differ (model, dataset, lengths...), as readable lines."""
    lines = []
    for key in MATCH_FIELDS:
        left, right = a.manifest.get(key), b.manifest.get(key)
        if left != right and (left is not None or right is not None):
            shown = [_short(v) for v in (left, right)]
            lines.append(f"{key}: {shown[0]} vs {shown[1]}")
    return lines


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} values, {min(value)}..{max(value)}" if all(isinstance(v, (int, float)) for v in value) \
            else f"{len(value)} values"
    return str(value)


def run_metric_options(run: Run, other: Run | None = None) -> list[dict]:
    """``probe / metric`` options of ``run`` (only the shared ones when comparing with ``other``)."""
    pairs = run.heads[["probe", "metric"]].drop_duplicates()
    if other is not None:
        theirs = set(map(tuple, other.heads[["probe", "metric"]].drop_duplicates().to_numpy()))
        pairs = pairs[[tuple(p) in theirs for p in pairs.to_numpy()]]
    return [{"label": f"{p} / {m}", "value": metric_value(p, m)} for p, m in pairs.itertuples(index=False)]


def manifest_lines(run: Run) -> list[str]:
    """Readable facts of a run (scalar manifest entries)."""
    return [f"{k}: {v}" for k, v in run.manifest.items() if not isinstance(v, (dict, list))]


def _rows(run: Run, value: str) -> pd.DataFrame:
    probe, metric = split_metric_value(value)
    rows = run.heads[(run.heads["probe"] == probe) & (run.heads["metric"] == metric)]
    if rows.empty:
        raise InputError(f"run {run.path.name} has no metric {probe}/{metric}: pick one it has")
    return rows


def run_figure(run: Run, value: str | None) -> go.Figure:
    probe, metric = split_metric_value(value)
    fig = head_heatmap(_rows(run, value), metric, probe=probe, title=f"{run.label}: {probe} / {metric}")
    fig.update_layout(height=max(360, 22 * run.heads["layer"].nunique() + 140))
    return fig


def top_table(run: Run, value: str | None, limit: int = TABLE_ROWS) -> pd.DataFrame:
    """The run's rows of one metric, highest value first (at most ``limit``)."""
    return _rows(run, value).sort_values("value", ascending=False).head(limit).reset_index(drop=True)


def compare_figure(a: Run, b: Run, value: str | None) -> go.Figure:
    """Δ = b − a heatmap of a metric both runs have, on the heads both have.

    Raises:
        InputError: the metric is missing from one run, or the runs share no head.
    """
    probe, metric = split_metric_value(value)
    shared = {tuple(p) for p in a.heads[["probe", "metric"]].to_numpy()} & \
             {tuple(p) for p in b.heads[["probe", "metric"]].to_numpy()}
    if (probe, metric) not in shared:
        listed = ", ".join(f"{p}/{m}" for p, m in sorted(shared)) or "none"
        raise InputError(f"runs {a.path.name} and {b.path.name} do not share metric {probe}/{metric} "
                         f"(shared: {listed})")
    left = _rows(a, value).set_index(["layer", "head"])["value"]
    right = _rows(b, value).set_index(["layer", "head"])["value"]
    delta = (right - left).dropna()
    if delta.empty:
        raise InputError(f"runs {a.path.name} and {b.path.name} have no head in common for {probe}/{metric}")
    frame = delta.rename("value").reset_index().assign(probe=probe, metric=metric, ci_low=float("nan"),
                                                         ci_high=float("nan"))
    fig = head_heatmap(frame, metric, probe=probe, title=f"Δ {probe}/{metric}: {b.path.name} − {a.path.name}")
    bound = float(delta.abs().max()) or 1.0
    fig.update_traces(colorscale="RdBu_r", zmin=-bound, zmax=bound,
                      hovertemplate="layer %{customdata[0]} head %{customdata[1]}<br>Δ = %{z:.4g}<extra></extra>")
    fig.update_layout(height=max(360, 22 * frame["layer"].nunique() + 140))
    return fig
