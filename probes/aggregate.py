"""Mergeable per-head moments: the sufficient statistics behind every mean and 95 % interval.

A probe's dataset-level value of a metric is the mean over samples of a per-sample value
``x [S, L, H]`` (NaN = undefined for that sample), with a Student-t interval
(:func:`probes.base.mean_and_ci`). Both depend on the samples only through
three numbers per head: the count ``n`` of defined samples, their mean ``m`` and the sum of squared
deviations ``M2 = Σ (x − m)²``. :class:`MomentSums` holds them in float64 and merges two disjoint
parts exactly in any order (Chan, Golub and LeVeque's parallel update)::

    n = na + nb,   δ = mb − ma,   m = ma + δ·nb/n,   M2 = M2a + M2b + δ²·na·nb/n

so the interval of a merged run equals the single-process one up to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MomentSums", "merge_all"]


@dataclass
class MomentSums:
    """Per-element count, mean and sum of squared deviations over samples (float64).

    Attributes:
        count: ``[...]`` number of defined (finite) samples.
        mean: ``[...]`` their mean (NaN where ``count == 0``).
        m2: ``[...]`` ``Σ (x − mean)²`` over them (0 where ``count == 0``).
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def from_samples(cls, per_sample: torch.Tensor | np.ndarray) -> "MomentSums":
        """Moments of ``per_sample [S, ...]`` over the first axis, ignoring NaN/inf samples."""
        values = per_sample.double().cpu().numpy() if isinstance(per_sample, torch.Tensor) else \
            np.asarray(per_sample, dtype=np.float64)
        finite = np.isfinite(values)
        count = finite.sum(0)
        safe = np.where(finite, values, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, safe.sum(0) / np.maximum(count, 1), np.nan)
            m2 = np.where(count > 0, ((safe - np.where(count > 0, mean, 0.0)) ** 2 * finite).sum(0), 0.0)
        return cls(count.astype(np.int64), mean, m2)

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> "MomentSums":
        """The moments of no sample (the identity of :meth:`merge`)."""
        return cls(np.zeros(shape, np.int64), np.full(shape, np.nan), np.zeros(shape))

    def merge(self, other: "MomentSums") -> "MomentSums":
        """Moments of the union of two disjoint sample sets (Chan et al.'s update)."""
        if self.count.shape != other.count.shape:
            raise ValueError(f"cannot merge moments of shapes {self.count.shape} and {other.count.shape}")
        na, nb = self.count.astype(np.float64), other.count.astype(np.float64)
        n = na + nb
        ma, mb = np.nan_to_num(self.mean), np.nan_to_num(other.mean)
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = mb - ma
            mean = np.where(n > 0, ma + delta * nb / np.maximum(n, 1), np.nan)
            m2 = self.m2 + other.m2 + np.where(n > 0, delta ** 2 * na * nb / np.maximum(n, 1), 0.0)
        return MomentSums(self.count + other.count, mean, m2)

    def scaled(self, factor: np.ndarray) -> "MomentSums":
        """Moments of ``x · factor`` (``factor`` broadcast over the elements)."""
        factor = np.asarray(factor, dtype=np.float64)
        return MomentSums(self.count.copy(), self.mean * factor, self.m2 * factor ** 2)

    def mean_ci(self, level: float = 0.95, bounds: tuple[float, float] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean, ci_low, ci_high)`` exactly as :func:`probes.base.mean_and_ci` computes them
        (Student-t, or on the logit/log scale of a bounded metric); NaN interval where ``count < 2``."""
        from probes.base import interval_from_moments

        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1), np.nan)
        return interval_from_moments(self.count, self.mean, var, level, bounds)

    # ------------------------------------------------------------------ files (safetensors, never pickle)
    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix/count|mean|m2: tensor}`` for :func:`safetensors.torch.save_file`."""
        return {f"{prefix}/count": torch.from_numpy(np.array(self.count, copy=True)),
                f"{prefix}/mean": torch.from_numpy(np.array(self.mean, copy=True)),
                f"{prefix}/m2": torch.from_numpy(np.array(self.m2, copy=True))}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "MomentSums":
        return cls(tensors[f"{prefix}/count"].numpy().astype(np.int64), tensors[f"{prefix}/mean"].numpy(),
                   tensors[f"{prefix}/m2"].numpy())


def merge_all(parts: Iterable[MomentSums]) -> MomentSums:
    """Merge any number of parts (order does not matter up to rounding)."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    return total
