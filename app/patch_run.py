"""``workbench patch``: activation patching on a dataset, written as a table and an HTML figure.

The output folder holds ``patching.parquet``, ``patching.csv``, ``patching.html`` (the plotly
heatmap) and ``manifest.json``; it is built in a temporary sibling and swapped into place
(:func:`workbench.atomic.atomic_dir`), so a killed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workbench.atomic import atomic_dir, is_leftover, recover
from workbench.errors import InputError

FILES = ("patching.parquet", "manifest.json")


@dataclass
class PatchRequest:
    model: str = "smollm2-135m"
    dataset: str = "ioi"
    site: str = "z"
    metric: str = "logit_diff"
    position: int | None = None
    layers: list[int] | None = None
    heads: list[int] | None = None
    n: int | None = None
    out: Path | None = None
    force: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True


def check_target(out: Path, force: bool) -> None:
    """Refuse to replace anything but an earlier patching folder (with ``force``)."""
    out = Path(out).expanduser()
    recover(out)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise InputError(f"--out {out} is an existing file: pass a new folder")
    if all((out / f).is_file() for f in FILES):
        if not force:
            raise InputError(f"--out {out} already holds a patching run: pass --force to replace it, or another --out")
        return
    if any(not is_leftover(p) for p in out.iterdir()):
        raise InputError(f"--out {out} is a folder that is not a patching run: it is never replaced; pass a new folder")


def run_patch(req: PatchRequest) -> tuple[Path, pd.DataFrame]:
    """Load, patch, write; returns ``(out folder, table)``."""
    from workbench.data import load_dataset
    from workbench.model import load_model
    from workbench.patching import heatmap, patch_table, setup_from_batch

    if req.site not in ("z", "resid"):
        raise InputError(f"unknown --site '{req.site}': use z or resid")
    out = Path(req.out or Path("runs") / f"patch-{Path(req.model).name}-{Path(req.dataset).stem}-{req.site}")
    check_target(out, req.force)
    model = load_model(req.model, device=req.device, dtype=req.dtype)
    batch = load_dataset(req.dataset, model, n=req.n)
    setup = setup_from_batch(model, batch, req.metric)
    positions = None if req.position is None else [req.position]
    total = {"n": 0}

    def report(done: int) -> None:
        if req.progress and done - total["n"] >= 1:
            total["n"] = done
            print(f"\rpatched {done}", end="", flush=True)
    table = patch_table(model, setup, req.site, layers=req.layers, heads=req.heads if req.site == "z" else None,
                        positions=positions, progress=report)
    if req.progress:
        print()
    figure = heatmap(table, title=f"activation patching ({req.site}) — {model.name}, {req.dataset}, "
                                  f"{len(setup.kept)} samples, metric {req.metric}")
    manifest = {"kind": "patching", "model": model.name, "dataset": req.dataset, "site": req.site,
                "metric": req.metric, "position": req.position, "n_samples": len(setup.kept),
                "samples_dropped": len(batch) - len(setup.kept),
                "metric_clean": float(table["metric_clean"].iloc[0]),
                "metric_corrupt": float(table["metric_corrupt"].iloc[0])}
    with atomic_dir(out) as tmp:
        table.to_parquet(tmp / "patching.parquet", index=False)
        table.to_csv(tmp / "patching.csv", index=False)
        (tmp / "patching.html").write_text(figure.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out, table
