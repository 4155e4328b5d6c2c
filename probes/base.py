"""Probe base class (scikit-learn style) and the tidy-table helpers every probe shares.

Configuration goes in ``__init__``; ``fit(...)`` returns ``self``; fitted results live in
attributes ending in ``_``; ``to_frame()`` returns the tidy table with columns
``layer, head, probe, metric, value, ci_low, ci_high`` (one row per layer, head, metric).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from scipy import stats as scipy_stats

from workbench.errors import InputError, WorkbenchError

FRAME_COLUMNS = ["layer", "head", "probe", "metric", "value", "ci_low", "ci_high"]


class Probe(ABC):
    """A per-head analyser.

    Class attributes:
        name: the probe's name on the command line (``--probes NAME``).
        metrics: every metric name it can produce.
        needs_capture: True when ``fit`` reads a :class:`workbench.capture.Capture`; False when
            it runs the model itself (importance, VHD, HeSS).
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    needs_capture: ClassVar[bool] = True

    @abstractmethod
    def fit(self, *args, **kwargs) -> "Probe":
        """Compute the scores; returns ``self``."""

    def fit_run(self, model, batch, capture) -> "Probe":
        """Entry point used by the batch CLI and the app: fit from what a run has."""
        return self.fit(capture)

    @abstractmethod
    def to_frame(self) -> pd.DataFrame:
        """The tidy per-head table (see module docstring)."""

    def _check_fitted(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            raise WorkbenchError(f"{type(self).__name__} is not fitted yet: call fit(...) first")

    @classmethod
    def check_metrics(cls, metrics: Sequence[str] | None) -> tuple[str, ...]:
        """Validate a metric subset (default: all of this probe's metrics)."""
        if metrics is None:
            return cls.metrics
        unknown = [m for m in metrics if m not in cls.metrics]
        if unknown:
            raise InputError(f"unknown metric '{unknown[0]}' for probe '{cls.name}': "
                             f"use one of {', '.join(cls.metrics)}")
        if not metrics:
            raise InputError(f"empty metric list for probe '{cls.name}': give at least one metric")
        return tuple(metrics)


def mean_and_ci(per_sample: torch.Tensor, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and Student-t ``level`` interval over the first axis, ignoring NaN samples.

    Args:
        per_sample: ``[S, ...]`` per-sample values (NaN = undefined for that sample).
    Returns:
        ``(mean, ci_low, ci_high)``, each shaped like ``per_sample[0]``; the interval is NaN
        where fewer than two samples are defined.
    """
    values = per_sample.double().cpu().numpy()
    finite = np.isfinite(values)
    count = finite.sum(0)
    safe = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, safe.sum(0) / np.maximum(count, 1), np.nan)
        var = np.where(count > 1, ((safe - mean) ** 2 * finite).sum(0) / np.maximum(count - 1, 1), np.nan)
        half = scipy_stats.t.ppf(0.5 + level / 2, np.maximum(count - 1, 1)) * np.sqrt(var / np.maximum(count, 1))
    return mean, mean - half, mean + half


def head_table(probe: str, metric: str, layers: Sequence[int], heads: Sequence[int],
               mean: np.ndarray, ci_low: np.ndarray, ci_high: np.ndarray) -> pd.DataFrame:
    """Tidy rows for one metric from ``[L, H]`` arrays."""
    grid_l, grid_h = np.meshgrid(np.asarray(layers), np.asarray(heads), indexing="ij")
    return pd.DataFrame({
        "layer": grid_l.ravel().astype(int), "head": grid_h.ravel().astype(int),
        "probe": probe, "metric": metric, "value": np.asarray(mean, dtype=float).ravel(),
        "ci_low": np.asarray(ci_low, dtype=float).ravel(), "ci_high": np.asarray(ci_high, dtype=float).ravel(),
    })


def concat_frames(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tidy tables (an empty table with the right columns when none)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=FRAME_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def masked_row_mean(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis of ``rows [B, L, H, N]`` where ``valid [B, 1|L, 1|H, N]`` and
    the value is finite; NaN where nothing is valid. Returns ``[B, L, H]``."""
    valid = valid & torch.isfinite(rows)
    total = torch.where(valid, rows, torch.zeros_like(rows)).sum(-1)
    count = valid.sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
