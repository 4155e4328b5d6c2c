"""``workbench analyze --engine ray``: the request's run on Ray (:mod:`probes.engine_ray`).

The driver never loads the model: the first worker loads the dataset; the run folder is written
by the CLI exactly as for a local run. With ``--resume`` finished shards live in the hidden
folder :func:`resume_folder` next to ``--out`` (removed once the run folder is written).
"""

from __future__ import annotations

import shutil
from pathlib import Path


def resume_folder(out: Path) -> Path:
    """``<parent>/.tmp-<name>.resume``: the finished shards of a resumable run into ``out``.

    (Not of the ``.tmp-<name>-<pid>-*`` form that :func:`workbench.atomic.recover` clears.)"""
    out = Path(out).expanduser()
    return out.parent / f".tmp-{out.name}.resume"


def discard_resume(out: Path) -> None:
    """Remove the finished shards once the run folder is complete."""
    shutil.rmtree(resume_folder(out), ignore_errors=True)


def analyze_on_ray(req, probes: list, spec):
    """Run ``req`` (an :class:`app.analysis.AnalysisRequest`) on Ray; returns the pipeline's result."""
    from probes.engine_ray import DatasetSpec, RayEngine
    from probes.pipeline import analyze

    if req.resume and req.out is None:
        from workbench.errors import InputError

        raise InputError("--resume keeps finished shards next to the run folder: give --out")
    engine = RayEngine(workers=req.workers, address=req.address, device=req.device, dtype=req.dtype,
                       resume_dir=resume_folder(req.out) if req.resume else None)
    data = DatasetSpec(req.dataset, n=req.n, seq_len=req.seq_len, seed=req.seed)
    return analyze(req.model, data, probes=probes, mode=req.mode, layers=req.layers, heads=req.heads,
                   interventions=spec if len(spec) else None, batch_size=req.batch_size,
                   progress=req.progress, engine=engine)
