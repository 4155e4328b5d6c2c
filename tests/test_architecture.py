"""The layering contract (kernels <- workbench <- probes <- app) holds, checked by import-linter."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contract_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_datasets_is_data_only():
    assert not list((ROOT / "datasets").glob("*.py")), "datasets/ must hold data only"
