"""Pattern statistics per head (docs/metrics.md §1), averaged over real query rows, then samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal


from probes.base import Probe, masked_row_mean
from workbench.batch import TokenBatch
from workbench.capture import Capture
from workbench.model import HookedModel
from workbench.pattern_rows import STAT_NAMES

StatName = Literal["entropy", "entropy_normalized", "max_weight", "first1_mass", "first4_mass",
                   "prev_token_mass", "self_mass", "local_mass", "mean_distance"]


class PatternStats(Probe):
    """Per-head means of the per-row pattern statistics, with a 95% interval over samples.

    Works on captures of either mode (patterns or stats): both carry the same per-row values.

    Args:
        metrics: subset of :attr:`metrics` (default all).
        layers, heads: stored only (the capture holds the subset).

    Attributes (after ``fit``):
        metrics_: the metrics computed.
        per_sample_: metric -> ``[S, L, H]`` per-sample head means over real query rows.
        mean_, ci_low_, ci_high_: metric -> ``[L, H]`` numpy arrays.
        layers_, heads_: the captured layer/head indices.
    """

    name: ClassVar[str] = "stats"
    metrics: ClassVar[tuple[str, ...]] = STAT_NAMES
    bounds: ClassVar[dict[str, tuple[float, float]]] = {
        **{m: (0.0, 1.0) for m in ("entropy_normalized", "max_weight", "first1_mass", "first4_mass",
                                   "prev_token_mass", "self_mass", "local_mass")},
        "entropy": (0.0, float("inf")), "mean_distance": (0.0, float("inf"))}

    def __init__(self, metrics: Sequence[StatName] | None = None, *, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None) -> None:
        self.metrics = metrics
        self.layers, self.heads = layers, heads

    def fit(self, capture: Capture | None = None, *, model: HookedModel | None = None,
            batch: TokenBatch | None = None) -> "PatternStats":
        """Scores from ``capture`` (``model``, ``batch`` and ``layers``/``heads`` are not used:
        the capture holds the layer/head subset)."""
        self.check_inputs(capture, model, batch)
        self.check_params()
        self.metrics_ = self.check_metrics(self.metrics)
        valid = capture.mask[:, None, None, :]
        self.per_sample_ = {m: masked_row_mean(capture.row_stats[m], valid) for m in self.metrics_}
        self._summarise()
        self.layers_, self.heads_ = list(capture.layers), list(capture.heads)
        return self
