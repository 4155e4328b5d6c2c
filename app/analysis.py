"""The batch job behind ``workbench analyze``: check every cheap input, load, run the one pipeline.

Everything that needs no model (probe and metric names, probe parameters, the dataset source,
numbers, the intervention text, device, dtype, the output folder) is checked before the model
loads; the analysis itself is :func:`probes.pipeline.analyze`, the same call the app and the
notebook make.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd

from workbench.errors import InputError, check_int


@dataclass
class AnalysisRequest:
    """Everything one analysis needs (validated by :func:`check_request` before any work)."""

    model: str
    dataset: str
    probes: str = "stats,detectors"
    metrics: str | None = None
    mode: str = "auto"
    layers: list[int] | None = None
    heads: list[int] | None = None
    n: int | None = None
    seq_len: int | None = None
    seed: int = 0
    batch_size: int = 8
    progress: bool = True
    interventions: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    out: Path | None = None
    force: bool = False
    engine: str = "local"
    workers: int | None = None
    address: str | None = None
    resume: bool = False
    generate: bool = False


@dataclass
class AnalysisResult:
    heads: pd.DataFrame
    manifest: dict
    probes: dict = field(default_factory=dict)
    capture: object | None = None


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("attention-workbench", "torch", "transformers", "transformer-lens", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def check_output(out: Path, force: bool = False) -> None:
    """The run folder may be written (:func:`workbench.runstore.check_run_target`) and can be:
    its parent exists (or can be made) and is writable."""
    from workbench.runstore import check_run_target

    check_run_target(out, force)
    existing = out.resolve().parent
    while not existing.exists():
        existing = existing.parent
    try:  # a real write test: permissions alone do not tell (read-only mounts, /proc)
        probe = tempfile.mkdtemp(prefix=".workbench-write-test-", dir=existing)
        os.rmdir(probe)
    except OSError as err:
        raise InputError(f"cannot write the run folder {out}: {existing} is not writable ({err.strerror}); "
                         "pass --out somewhere you can write") from None


def check_request(req: AnalysisRequest):
    """Validate every input that needs no model; returns ``(probes, interventions, device, dtype)``."""
    from probes.pipeline import build_probes
    from workbench.data import dataset_source
    from workbench.devices import parse_device, parse_dtype
    from workbench.interventions import as_intervention_set

    if req.mode not in ("auto", "patterns", "stats"):
        raise InputError(f"unknown mode '{req.mode}': use auto, patterns or stats")
    if req.engine not in ("local", "ray"):
        raise InputError(f"unknown engine '{req.engine}': use local or ray")
    if req.engine == "local" and (req.workers is not None or req.address or req.resume):
        raise InputError("--workers, --address and --resume apply to --engine ray: add --engine ray")
    if req.workers is not None:
        check_int("--workers", req.workers)
    for name, value in (("--n", req.n), ("--seq-len", req.seq_len), ("--batch-size", req.batch_size)):
        if value is not None:
            check_int(name, value)
    for name, values in (("--layers", req.layers), ("--heads", req.heads)):
        if values is not None and any(v < 0 for v in values):
            raise InputError(f"{name} takes indices >= 0, got {values}")
    probes = build_probes(req.probes, req.metrics, layers=req.layers, heads=req.heads)
    if req.generate:
        if "retrieval" not in probes:
            raise InputError("--generate scores the model's greedy answers with the retrieval probe: "
                             "add retrieval to --probes")
        probes["retrieval"].set_params(generate=True)
    dataset_source(req.dataset)
    spec = as_intervention_set(req.interventions)
    # on Ray the workers' machines hold the GPUs, not necessarily this one (probes.engine_ray checks)
    device = parse_device(req.device) if req.engine == "local" else req.device
    dtype = parse_dtype(req.dtype)
    if req.out is not None:
        check_output(req.out, req.force)
    return probes, spec, device, dtype


def run_analysis(req: AnalysisRequest) -> AnalysisResult:
    """Run the requested probes through the one pipeline; every cheap input is checked first."""
    import torch

    from probes.pipeline import analyze
    from workbench.data import load_dataset
    from workbench.model import load_model

    probes, spec, device, dtype = check_request(req)
    timings: dict[str, float] = {}
    torch.manual_seed(req.seed)
    if req.engine == "ray":
        from app.scaleout import analyze_on_ray

        result = analyze_on_ray(req, list(probes.values()), spec)
        return _finish(req, result, result.engine.pop("model_folder"), result.batch, spec, device, dtype,
                       result.timings)
    start = time.perf_counter()
    model = load_model(req.model, device=device, dtype=dtype)
    timings["load_model_s"] = time.perf_counter() - start
    layers, heads = model.check_heads(req.layers, req.heads)
    start = time.perf_counter()
    batch = load_dataset(req.dataset, model, n=req.n, seq_len=req.seq_len, seed=req.seed)
    timings["load_dataset_s"] = time.perf_counter() - start
    if spec.reference is None and any(i.kind in ("mean", "resample") for i in spec):
        spec = spec.with_reference(batch)  # mean / resample ablations use the dataset itself
    result = analyze(model, batch, probes=list(probes.values()), mode=req.mode, layers=layers, heads=heads,
                     interventions=spec if len(spec) else None, batch_size=req.batch_size, progress=req.progress)
    return _finish(req, result, model.folder, batch, spec, device, dtype, timings | result.timings)


def _finish(req: AnalysisRequest, result, model_folder, batch, spec, device, dtype, timings) -> AnalysisResult:
    """The run's table and manifest (the same for every engine)."""
    frame = result.table
    layers, heads = result.layers, result.heads
    manifest = {
        "model": req.model, "model_folder": str(model_folder), "dataset": req.dataset,
        "probes": list(result.probes), "metrics": sorted(frame["metric"].unique().tolist()),
        "mode": result.mode or req.mode, "seed": req.seed, "n_samples": len(batch),
        "seq_lengths": batch.lengths.tolist(), "layers": layers, "heads": heads,
        "interventions": spec.text, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "versions": versions(), "timings": {k: round(v, 3) for k, v in timings.items()},
        "command": " ".join(sys.argv), "engine": result.engine,
    }
    from probes.long_context_rows import manifest_facts

    manifest |= manifest_facts(result.probes)
    return AnalysisResult(frame, manifest, result.probes, result.capture)
