"""Pattern statistics per head (METRICS §1), averaged over real query rows, then samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import pandas as pd

from probes.base import Probe, concat_frames, head_table, masked_row_mean, mean_and_ci
from workbench.capture import Capture
from workbench.pattern_rows import STAT_NAMES

StatName = Literal["entropy", "entropy_normalized", "max_weight", "first1_mass", "first4_mass",
                   "prev_token_mass", "self_mass", "local_mass", "mean_distance"]


class PatternStats(Probe):
    """Per-head means of the per-row pattern statistics, with a 95% interval over samples.

    Works on captures of either mode (patterns or stats): both carry the same per-row values.

    Attributes (after ``fit``):
        per_sample_: metric -> ``[S, L, H]`` per-sample head means over real query rows.
        mean_, ci_low_, ci_high_: metric -> ``[L, H]`` numpy arrays.
        layers_, heads_: the captured layer/head indices.
    """

    name: ClassVar[str] = "stats"
    metrics: ClassVar[tuple[str, ...]] = STAT_NAMES

    def __init__(self, metrics: Sequence[StatName] | None = None) -> None:
        self.metrics_selected = self.check_metrics(metrics)

    def fit(self, capture: Capture) -> "PatternStats":
        valid = capture.mask[:, None, None, :]
        self.per_sample_ = {m: masked_row_mean(capture.row_stats[m], valid) for m in self.metrics_selected}
        self.mean_, self.ci_low_, self.ci_high_ = {}, {}, {}
        for metric, values in self.per_sample_.items():
            self.mean_[metric], self.ci_low_[metric], self.ci_high_[metric] = mean_and_ci(values)
        self.layers_, self.heads_ = list(capture.layers), list(capture.heads)
        return self

    def to_frame(self) -> pd.DataFrame:
        self._check_fitted("mean_")
        return concat_frames([
            head_table(self.name, m, self.layers_, self.heads_, self.mean_[m], self.ci_low_[m], self.ci_high_[m])
            for m in self.metrics_selected
        ])
