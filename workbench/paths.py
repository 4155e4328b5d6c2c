"""Where the workbench keeps its cache (converted models); ``WORKBENCH_HOME`` moves it."""

from __future__ import annotations

import os
from pathlib import Path


def workbench_home() -> Path:
    """The cache root: ``$WORKBENCH_HOME`` or ``~/.cache/attention-workbench``."""
    env = os.environ.get("WORKBENCH_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "attention-workbench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Folder holding one sub-folder per converted model."""
    path = workbench_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
