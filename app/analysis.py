"""The analysis service shared by the CLI and the app: model + dataset + probes -> head table."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata

import pandas as pd
import torch

from probes.base import concat_frames
from probes.registry import parse_probes, split_metrics
from workbench.capture import Capture, capture
from workbench.data import load_dataset
from workbench.model import load_model


@dataclass
class AnalysisRequest:
    """Everything one analysis needs (validated by :func:`run_analysis` before any work)."""

    model: str
    dataset: str
    probes: str = "stats,detectors"
    metrics: str | None = None
    mode: str = "patterns"
    layers: list[int] | None = None
    heads: list[int] | None = None
    n: int | None = None
    seq_len: int | None = None
    seed: int = 0
    batch_size: int = 8
    progress: bool = True


@dataclass
class AnalysisResult:
    heads: pd.DataFrame
    manifest: dict
    probes: dict = field(default_factory=dict)
    capture: Capture | None = None


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("attention-workbench", "torch", "transformers", "transformer-lens", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_analysis(req: AnalysisRequest) -> AnalysisResult:
    """Run the requested probes; every input is checked before the expensive work."""
    probe_classes = parse_probes(req.probes)
    metric_split = split_metrics(probe_classes, req.metrics)
    probes = {cls.name: cls(metric_split.get(cls.name)) for cls in probe_classes
              if req.metrics is None or cls.name in metric_split}
    timings: dict[str, float] = {}
    torch.manual_seed(req.seed)
    start = time.perf_counter()
    model = load_model(req.model)
    timings["load_model_s"] = time.perf_counter() - start
    layers, heads = model.check_heads(req.layers, req.heads)
    start = time.perf_counter()
    batch = load_dataset(req.dataset, model, n=req.n, seq_len=req.seq_len, seed=req.seed)
    timings["load_dataset_s"] = time.perf_counter() - start
    cap = None
    if any(p.needs_capture for p in probes.values()):
        start = time.perf_counter()
        cap = capture(model, batch, layers=layers, heads=heads, mode=req.mode, batch_size=req.batch_size,
                      progress=req.progress, detectors="detectors" in probes)
        timings["capture_s"] = time.perf_counter() - start
    for name, probe in probes.items():
        start = time.perf_counter()
        probe.fit_run(model, batch, cap)
        timings[f"probe_{name}_s"] = time.perf_counter() - start
    frame = concat_frames([p.to_frame() for p in probes.values()])
    frame = frame[frame["layer"].isin(layers) & frame["head"].isin(heads)].reset_index(drop=True)
    manifest = {
        "model": req.model, "model_folder": str(model.folder), "dataset": req.dataset,
        "probes": list(probes), "metrics": sorted(frame["metric"].unique().tolist()),
        "mode": req.mode, "seed": req.seed, "n_samples": len(batch),
        "seq_lengths": batch.lengths.tolist(), "layers": layers, "heads": heads,
        "versions": versions(), "timings": {k: round(v, 3) for k, v in timings.items()},
        "command": " ".join(sys.argv),
    }
    return AnalysisResult(frame, manifest, probes, cap)
