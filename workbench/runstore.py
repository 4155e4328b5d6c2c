"""Run folders: ``heads.parquet`` + ``manifest.json`` + ``report.html``, written atomically."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from workbench.atomic import atomic_dir, is_leftover, recover
from workbench.errors import InputError

HEAD_COLUMNS = ["layer", "head", "probe", "metric", "value", "ci_low", "ci_high"]


@dataclass
class Run:
    """A batch run read back from disk."""

    path: Path
    heads: pd.DataFrame
    manifest: dict

    @property
    def label(self) -> str:
        m = self.manifest
        return f"{self.path.name} ({m.get('model', '?')}, {m.get('dataset', '?')})"


def check_run_target(out: Path, force: bool = False) -> None:
    """Raise :class:`InputError` unless ``out`` may receive a run: new, an empty folder, or (with
    ``force``) an existing workbench run. Any other file or folder is never replaced.
    """
    out = Path(out).expanduser()
    recover(out)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise InputError(f"--out {out} is an existing file, not a run folder: pass a new folder")
    here, target = Path.cwd().resolve(), out.resolve()
    if here == target or target in here.parents:
        raise InputError(f"--out {out} is the folder you are working in (or holds it): pass a new folder")
    if (out / "manifest.json").is_file() and (out / "heads.parquet").is_file():
        if not force:
            raise InputError(f"--out {out} already holds a workbench run: pass --force to replace it, "
                             "or another --out")
        return
    if any(not is_leftover(p) for p in out.iterdir()):
        raise InputError(f"--out {out} is a folder that is not a workbench run (no manifest.json and "
                         "heads.parquet): it is never replaced; pass a new folder")


def write_run(out: Path, heads: pd.DataFrame, manifest: dict, report_html: str | None = None,
              extra_files: dict[str, str] | None = None, *, force: bool = False) -> Path:
    """Write a run folder; a killed run leaves no half-written folder under ``out`` and an earlier
    run stays at ``out`` until the new one is complete (see :func:`check_run_target` for what may
    be replaced)."""
    missing = [c for c in HEAD_COLUMNS if c not in heads.columns]
    if missing:
        raise ValueError(f"head table lacks columns {missing}")
    check_run_target(out, force)
    with atomic_dir(Path(out)) as tmp:
        heads.to_parquet(tmp / "heads.parquet", index=False)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        if report_html is not None:
            (tmp / "report.html").write_text(report_html, encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


def read_run(path: str | Path) -> Run:
    """Read a run folder written by :func:`write_run`.

    Raises:
        InputError: not a folder, missing/corrupt ``heads.parquet`` or ``manifest.json``,
            or a table without the expected columns.
    """
    path = Path(path).expanduser()
    recover(path)  # a writer killed between its two renames: the previous run goes back to its path
    if not path.is_dir():
        raise InputError(f"run folder {path} does not exist: give a folder written by 'workbench analyze --out'")
    try:
        heads = pd.read_parquet(path / "heads.parquet")
    except Exception as err:  # pyarrow raises several types for a bad file
        raise InputError(f"{path}/heads.parquet is missing or unreadable ({type(err).__name__}): "
                         "re-run 'workbench analyze' to recreate the folder") from None
    missing = [c for c in HEAD_COLUMNS if c not in heads.columns]
    if missing:
        raise InputError(f"{path}/heads.parquet lacks columns {missing}: it was not written by the workbench")
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}/manifest.json is missing or invalid ({err}): re-run the analysis") from None
    check_manifest(manifest, path)
    check_heads(heads, path)
    return Run(path, heads, manifest)


_MANIFEST_TYPES = {"model": str, "dataset": str, "mode": str, "model_folder": str, "interventions": str,
                   "device": str, "dtype": str, "command": str, "probes": list, "metrics": list,
                   "layers": list, "heads": list, "seq_lengths": list, "versions": dict, "timings": dict,
                   "n_samples": int, "seed": int}


def check_manifest(manifest, path: Path) -> None:
    """Raise :class:`InputError` unless ``manifest`` is a JSON object whose known fields have
    their types (a list, a string or a wrong-typed field would break every reader)."""
    if not isinstance(manifest, dict):
        raise InputError(f"{path}/manifest.json holds a JSON {type(manifest).__name__}, not an object: "
                         "it was not written by the workbench; re-run the analysis")
    for key, kind in _MANIFEST_TYPES.items():
        value = manifest.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise InputError(f"{path}/manifest.json field '{key}' must be a {kind.__name__}, got "
                             f"{type(value).__name__}: re-run the analysis")


def check_heads(heads: pd.DataFrame, path: Path) -> None:
    """Raise :class:`InputError` unless the head table's columns have their types: integer
    ``layer``/``head``, numeric ``value``/``ci_low``/``ci_high``, text ``probe``/``metric``."""
    from pandas.api import types

    for column in ("layer", "head"):
        if not types.is_integer_dtype(heads[column]):
            raise InputError(f"{path}/heads.parquet column '{column}' must hold integers, got "
                             f"{heads[column].dtype}: re-run the analysis")
    for column in ("value", "ci_low", "ci_high"):
        if not types.is_numeric_dtype(heads[column]) or types.is_bool_dtype(heads[column]):
            raise InputError(f"{path}/heads.parquet column '{column}' must hold numbers, got "
                             f"{heads[column].dtype}: re-run the analysis")
    for column in ("probe", "metric"):
        if not heads[column].map(lambda v: isinstance(v, str)).all():
            raise InputError(f"{path}/heads.parquet column '{column}' must hold text: re-run the analysis")


def is_listable(path: Path) -> bool:
    """Whether a Runs listing should show ``path``: not a hidden entry, in particular not a
    temporary or moved-aside leftover of an interrupted write (``.tmp-*``, ``.old-*``)."""
    return not Path(path).name.startswith(".") and not is_leftover(path)
