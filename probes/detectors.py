"""Head detectors (docs/metrics.md §2, TransformerLens conventions).

- ``previous_token``: mean over real rows i >= 1 of ``A[i, i-1]``.
- ``induction``: mean over rows that have a target of the mass on positions j whose previous
  token equals token i (on a random block repeated twice: the second copy, ``A[i, i-L+1]``).
- ``duplicate_token``: mean over rows that have one of the mass on earlier occurrences of
  the same token.
TransformerLens' ``detect_head`` ("mul") divides the same sums by all rows of the sequence;
the tests check ours against it with that factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import torch

from probes.base import Probe, masked_row_mean
from workbench.batch import TokenBatch
from workbench.capture import Capture
from workbench.errors import InputError
from workbench.model import HookedModel

DetectorName = Literal["previous_token", "induction", "duplicate_token"]
_ROW_SOURCE = {"previous_token": "prev_token_mass", "induction": "induction_mass",
               "duplicate_token": "duplicate_mass"}


class Detectors(Probe):
    """Previous-token, induction and duplicate-token scores per head, 95% interval over samples.

    Args:
        metrics: subset of :attr:`metrics` (default all).
        layers, heads: stored only (the capture holds the subset).

    Attributes (after ``fit``):
        metrics_: the detectors computed.
        per_sample_: detector -> ``[S, L, H]`` (NaN for samples where it is undefined).
        mean_, ci_low_, ci_high_: detector -> ``[L, H]``.
        layers_, heads_: captured indices.
    """

    name: ClassVar[str] = "detectors"
    metrics: ClassVar[tuple[str, ...]] = tuple(_ROW_SOURCE)
    bounds: ClassVar[dict[str, tuple[float, float]]] = {m: (0.0, 1.0) for m in _ROW_SOURCE}  # attention mass

    def __init__(self, metrics: Sequence[DetectorName] | None = None, *, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None) -> None:
        self.metrics = metrics
        self.layers, self.heads = layers, heads

    def fit(self, capture: Capture | None = None, *, model: HookedModel | None = None,
            batch: TokenBatch | None = None) -> "Detectors":
        """Scores from ``capture`` (``model``, ``batch`` and ``layers``/``heads`` are not used:
        the capture holds the layer/head subset)."""
        self.check_inputs(capture, model, batch)
        self.check_params()
        self.metrics_ = self.check_metrics(self.metrics)
        positions = torch.arange(capture.tokens.shape[1])
        self.per_sample_ = {}
        for metric in self.metrics_:
            if _ROW_SOURCE[metric] not in capture.row_stats:
                raise InputError(f"this capture has no {_ROW_SOURCE[metric]} rows (it was made with detectors=False): "
                                 f"capture again with detectors=True, or score only ['previous_token']")
            rows = capture.row_stats[_ROW_SOURCE[metric]]
            valid = capture.mask.clone()
            if metric == "previous_token":
                valid &= positions[None, :] >= 1
            self.per_sample_[metric] = masked_row_mean(rows, valid[:, None, None, :])
        self._summarise()
        self.layers_, self.heads_ = list(capture.layers), list(capture.heads)
        return self

    def top_heads(self, detector: DetectorName, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``."""
        self._check_fitted("mean_")
        self.check_metrics([detector])
        scores = np.nan_to_num(self.mean_[detector], nan=-np.inf)
        order = np.argsort(scores.ravel())[::-1][:k]
        n_heads = len(self.heads_)
        return [(self.layers_[i // n_heads], self.heads_[i % n_heads], float(scores.ravel()[i])) for i in order]
