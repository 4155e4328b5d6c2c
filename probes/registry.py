"""Probe names for the CLI/app -> probe classes. Add a probe by adding one entry."""

from __future__ import annotations

from probes.attribution import LogitAttribution
from probes.base import Probe
from probes.detectors import Detectors
from probes.hess import HeSS
from probes.importance import HeadImportance
from probes.pattern_stats import PatternStats
from probes.retrieval import Retrieval
from probes.sinks import Sinks
from probes.sparsity_profile import SparsityProfile
from probes.vhd import VHD
from workbench.errors import InputError

PROBES: dict[str, type[Probe]] = {
    PatternStats.name: PatternStats,
    Detectors.name: Detectors,
    HeadImportance.name: HeadImportance,
    Sinks.name: Sinks,
    VHD.name: VHD,
    HeSS.name: HeSS,
    LogitAttribution.name: LogitAttribution,
    Retrieval.name: Retrieval,
    SparsityProfile.name: SparsityProfile,
}


def parse_probes(spec: str | list[str]) -> list[type[Probe]]:
    """``"stats,detectors"`` -> probe classes; unknown names raise a clear error."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise InputError(f"no probe given: use --probes with one or more of {', '.join(PROBES)}")
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise InputError(f"unknown probe '{unknown[0]}': use one of {', '.join(PROBES)}")
    return [PROBES[n] for n in dict.fromkeys(names)]


def split_metrics(probe_classes: list[type[Probe]], metrics: str | list[str] | None) -> dict[str, list[str] | None]:
    """Assign a ``--metrics`` list to the chosen probes; a name no chosen probe has is an error."""
    if metrics is None:
        return {cls.name: None for cls in probe_classes}
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    chosen: dict[str, list[str] | None] = {cls.name: [] for cls in probe_classes}
    for name in names:
        owners = [cls for cls in probe_classes if name in cls.metrics]
        if not owners:
            valid = sorted({m for cls in probe_classes for m in cls.metrics})
            raise InputError(f"unknown metric '{name}' for probes {', '.join(c.name for c in probe_classes)}: "
                             f"use one of {', '.join(valid)}")
        for cls in owners:
            chosen[cls.name].append(name)
    return {k: (v or None) if v else None for k, v in chosen.items() if v}
