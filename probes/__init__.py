"""Per-head analysers (scikit-learn style) and pure plotly figure builders.

Every registered probe is listed in :data:`probes.registry.PROBES`.
"""

from probes.detectors import Detectors
from probes.figures import curves, head_heatmap, pattern_heatmap, row_bar
from probes.pattern_stats import PatternStats
from probes.pipeline import AnalysisResult, analyze
from probes.registry import PROBES

__all__ = ["AnalysisResult", "Detectors", "PROBES", "PatternStats", "analyze", "curves", "head_heatmap",
           "pattern_heatmap", "row_bar"]
