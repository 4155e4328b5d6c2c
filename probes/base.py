"""Probe base class (scikit-learn style) and the tidy-table helpers every probe shares.

One protocol for every probe::

    probe = Cls(metrics=None, *, layers=None, heads=None, **settings)   # stores its arguments
    probe.fit(capture=None, *, model=None, batch=None) -> probe          # computes
    probe.to_frame()                                                     # tidy per-head table

- ``__init__`` only stores its arguments, each under its own name (:meth:`Probe.get_params`
  returns exactly them); it validates nothing and derives nothing.
- ``fit`` first calls :meth:`Probe.check_inputs` (the class attributes ``needs_capture``,
  ``needs_model``, ``needs_batch`` say what it needs), then :meth:`Probe.check_params`
  (the settings; a pipeline may call it early to fail before any expensive work). It returns
  ``self``; fitted results live in attributes ending in ``_``.
- ``to_frame()`` returns the tidy table with columns :data:`FRAME_COLUMNS`
  (``layer, head, probe, metric, value, ci_low, ci_high``; one row per layer, head, metric);
  before ``fit`` it raises :class:`WorkbenchError`.
- ``layers``/``heads`` restrict what a model-based probe computes or reports; a capture-based
  probe stores them but reads the subset the capture already holds.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, stdtrit  # Student t quantile; scipy.stats costs ~1 s of start-up

from workbench.errors import InputError, WorkbenchError

FRAME_COLUMNS = ["layer", "head", "probe", "metric", "value", "ci_low", "ci_high"]


class Probe(ABC):
    """A per-head analyser (see the module docstring for the protocol).

    Class attributes:
        name: the probe's name on the command line (``--probes NAME``).
        metrics: every metric name it can produce (an instance's ``metrics`` is its constructor
            argument, the requested subset or None; ``metrics_`` after ``fit`` is what it computed).
        needs_capture: ``fit`` reads a :class:`workbench.capture.Capture` (``fit(capture)``).
        needs_model: ``fit`` needs the :class:`workbench.model.HookedModel` (``model=``).
        needs_batch: ``fit`` needs the :class:`workbench.batch.TokenBatch` (``batch=``).
        bounds: metric -> ``(low, high)`` range its per-sample values can take (``high`` may be
            ``inf``); the interval of such a metric stays inside it (:func:`mean_and_ci`).
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    bounds: ClassVar[dict[str, tuple[float, float]]] = {}
    needs_capture: ClassVar[bool] = True
    needs_model: ClassVar[bool] = False
    needs_batch: ClassVar[bool] = False

    @abstractmethod
    def fit(self, capture=None, *, model=None, batch=None) -> "Probe":
        """Compute the scores; returns ``self``."""

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name != "self"
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments, as given (scikit-learn's ``get_params``)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "Probe":
        """Change constructor arguments (validated by the next ``fit``); returns ``self``."""
        valid = self._param_names()
        for key, value in params.items():
            if key not in valid:
                raise InputError(f"{type(self).__name__} has no parameter '{key}': use one of {', '.join(valid)}")
            setattr(self, key, value)
        return self

    def check_params(self) -> None:
        """Validate the constructor arguments (``fit`` calls it; so may a pipeline, early).

        Raises:
            InputError: a bad setting, naming it and the fix.
        """
        self.check_metrics(self.metrics)

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, capture=None, model=None, batch=None) -> None:
        """Check that ``fit`` got what this probe needs (``needs_*``); one-line errors.

        Raises:
            InputError: a needed input is missing, or the model was passed where the capture goes,
                or the capture was made with another model.
        """
        from workbench.capture import Capture
        from workbench.model import HookedModel

        who = f"the {self.name} probe"
        if isinstance(capture, HookedModel):
            raise InputError(f"{who} got the model as its first argument, which is the capture: "
                             f"call fit(capture, model=model, batch=batch) (or fit(model=model, batch=batch))")
        if capture is not None and not isinstance(capture, Capture):
            raise InputError(f"{who} got a {type(capture).__name__} as its capture: pass a "
                             "workbench.capture.Capture (capture = workbench.capture(model, batch))")
        if self.needs_capture and capture is None:
            raise InputError(f"{who} needs a capture: call fit(capture) with capture = workbench.capture(model, batch)")
        if self.needs_model and model is None:
            raise InputError(f"{who} needs the model: call fit(..., model=model)")
        if self.needs_batch and batch is None:
            raise InputError(f"{who} needs the batch: call fit(..., batch=batch) with the TokenBatch to analyse")
        if capture is not None and model is not None and getattr(model, "name", None) != capture.model_name:
            raise InputError(f"the capture comes from '{capture.model_name}', not '{model.name}': "
                             "pass the model the capture was made with")

    # ------------------------------------------------------------------ output
    def to_frame(self) -> pd.DataFrame:
        """The tidy per-head table (see module docstring): one block per computed metric."""
        self._check_fitted("mean_")
        return concat_frames([
            head_table(self.name, m, self.layers_, self.heads_, self.mean_[m], self.ci_low_[m], self.ci_high_[m])
            for m in self.metrics_ if m in self.mean_
        ])

    def _summarise(self) -> None:
        """``mean_`` / ``ci_low_`` / ``ci_high_`` of every metric from ``per_sample_`` (:func:`mean_and_ci`)."""
        self.mean_, self.ci_low_, self.ci_high_ = {}, {}, {}
        for metric, values in self.per_sample_.items():
            self.mean_[metric], self.ci_low_[metric], self.ci_high_[metric] = mean_and_ci(
                values, bounds=self.bounds.get(metric))

    def check_run(self, model, batch) -> None:
        """Cheap checks of what a run on ``model`` and ``batch`` needs, before any forward
        (the pipeline calls it for every probe first). Override to add a probe's own needs.

        Raises:
            InputError: the run cannot succeed (names the problem and the fix).
        """
        self.check_params()

    def cost_forwards(self, n_layers: int, n_heads: int, n_tokens: int, samples: int) -> float | None:
        """How many forward-equivalents ``fit`` runs beyond the shared capture, on ``samples`` inputs
        of ``n_tokens`` tokens and a model of ``n_layers`` × ``n_heads`` heads (1 = one forward of one
        such input; a backward counts 2). Counted one copy per forward, so batching many copies per
        forward makes the run faster. None (the default): about one capture, nothing extra.
        Override in a probe that runs the model itself."""
        return None

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


def mean_and_ci(per_sample: torch.Tensor, level: float = 0.95,
                bounds: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and ``level`` interval over the first axis, ignoring NaN samples (docs/metrics.md,
    "Aggregation and intervals").

    Without ``bounds`` the interval is Student-t, ``mean ± t·sd/√n``. With ``bounds = (a, b)``
    (the range every per-sample value lies in) the same t interval is built on the logit of
    ``(mean − a)/(b − a)`` (on ``log(mean − a)`` when ``b = inf``), with the delta-method
    standard error, and mapped back: it never leaves ``[a, b]``; a mean on a bound (every sample
    there) gives the one-point interval.

    Args:
        per_sample: ``[S, ...]`` per-sample values (NaN = undefined for that sample).
        bounds: ``(low, high)`` of a bounded metric, or None.
    Returns:
        ``(mean, ci_low, ci_high)``, each shaped like ``per_sample[0]``; the interval is NaN
        where fewer than two samples are defined.
    """
    values = per_sample.double().cpu().numpy()
    finite = np.isfinite(values)
    count = finite.sum(0)
    safe = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = np.where(count > 0, safe.sum(0) / np.maximum(count, 1), np.nan)
        var = np.where(count > 1, ((safe - mean) ** 2 * finite).sum(0) / np.maximum(count - 1, 1), np.nan)
    return interval_from_moments(count, mean, var, level, bounds)


def interval_from_moments(count: np.ndarray, mean: np.ndarray, var: np.ndarray, level: float = 0.95,
                          bounds: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interval of :func:`mean_and_ci` from per-element ``count``, ``mean`` and unbiased
    ``var`` (NaN where ``count < 2``); a run merged from shards (:mod:`probes.aggregate`) calls it."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        t = stdtrit(np.maximum(count - 1, 1), 0.5 + level / 2)
        se = np.sqrt(var / np.maximum(count, 1))
        if bounds is None:
            return mean, mean - t * se, mean + t * se
        low, high = float(bounds[0]), float(bounds[1])
        if np.isinf(high):  # log scale: d log(m - a) = dm / (m - a)
            shifted = np.clip(mean - low, 0.0, None)
            half = t * se / shifted
            ci_low, ci_high = low + shifted * np.exp(-half), low + shifted * np.exp(half)
            on_bound = shifted <= 0
        else:  # logit scale: d logit(p) = dp / (p (1 - p)), p = (m - a) / (b - a)
            p = np.clip((mean - low) / (high - low), 0.0, 1.0)
            centre = np.log(p) - np.log1p(-p)
            half = t * se / (high - low) / (p * (1 - p))
            ci_low = low + (high - low) * expit(centre - half)
            ci_high = low + (high - low) * expit(centre + half)
            on_bound = (p <= 0) | (p >= 1)
    undefined = np.isnan(var)
    ci_low = np.where(undefined, np.nan, np.where(on_bound, mean, ci_low))
    ci_high = np.where(undefined, np.nan, np.where(on_bound, mean, ci_high))
    return mean, ci_low, ci_high


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
