"""The exact pass's fused CPU epilogue (``csrc/tile_stats.c``), compiled at first use.

One C loop per tile forms ``p = exp(t)`` once and accumulates the row max, ``Σ p t``, the distance
moment, the row mass and the per-key column sums, instead of six torch ops that each stream the
tile through memory (about 4x less time per logit on the CPU; ``docs/performance.md``). It is
built with the system C compiler (``$CC`` or ``cc``/``gcc``) into a per-user cache keyed by the
source, the flags, the compiler and the CPU's features (``$WORKBENCH_HOME/kernels``, else
``$XDG_CACHE_HOME`` or ``~/.cache`` + ``/attention-workbench/kernels``; the folder is made mode 0700
and the folder and library must belong to this user and be writable by nobody else, or nothing is
loaded: no other user can plant code there), and called through ``ctypes`` (which releases the GIL, so the
query-block thread pool runs it in parallel). Without a compiler, or with
``WORKBENCH_CPU_FUSED=0``, :func:`tile_stats` returns None and the exact pass uses torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "tile_stats.c"
ROW_SOURCE = Path(__file__).parent / "csrc" / "row_softmax.c"
_X86 = platform.machine().lower() in ("x86_64", "amd64")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC") + (("-mprefer-vector-width=512",) if _X86 else ())
# Linked in a second step without -ffast-math: linked with it, gcc adds crtfastmath.o, whose constructor
# turns on flush-to-zero / denormals-are-zero for the whole process as soon as the library loads.
LINK_FLAGS = ("-shared", "-fPIC")
LIBS = (("-lmvec",) if _X86 and platform.system() == "Linux" else ()) + ("-lm",)  # glibc's vector expf
DISABLE_ENV = "WORKBENCH_CPU_FUSED"

_P, _I = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_P, _I, _I, _I, _P, _P, ctypes.c_int32, _I, _P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P]
_ROW_ARGTYPES = [_P, _I, _I, _I, _I, _P, _I, _I, _P, _P, ctypes.c_float, ctypes.c_int32,
                 _P, _P, _P, _P, _P, _P, _I, _P, _P, _I, _I, _P, _I, _I, _I, _I]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class UnsafeCacheError(OSError):
    """The kernel cache folder or library is not owned by this user alone."""


def _cache_dir() -> Path:
    """The per-user build cache (made mode 0700; see the module docstring)."""
    home = os.environ.get("WORKBENCH_HOME")
    if home:
        root = Path(home).expanduser() / "kernels"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base).expanduser() / "attention-workbench" / "kernels"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def _check_private(path: Path) -> None:
    """Raise :class:`UnsafeCacheError` unless ``path`` (a folder or file, not a link) belongs to this
    user and no one else may write it."""
    info = os.lstat(path)
    uid = os.getuid() if hasattr(os, "getuid") else info.st_uid
    if stat.S_ISLNK(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
        raise UnsafeCacheError(f"{path} is a link, not owned by you, or writable by others: not loading code from it; "
                               "remove it, or set WORKBENCH_HOME to a folder of your own")


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a ``-march=native`` build is never reused on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str, source: Path = SOURCE) -> Path:
    """Compile ``source`` once per (source, flags, compiler, CPU); the library is written atomically."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [source.read_text(), *FLAGS, *LINK_FLAGS, *LIBS, cc, version, _cpu_flags()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    folder = _cache_dir()
    _check_private(folder)
    target = folder / f"{source.stem}-{key}.so"
    if os.path.lexists(target):
        _check_private(target)
        return target
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / target.name
        obj = Path(tmp) / f"{source.stem}.o"
        subprocess.run([cc, *FLAGS, "-c", str(source), "-o", str(obj)], capture_output=True, text=True, check=True)
        subprocess.run([cc, *LINK_FLAGS, str(obj), "-o", str(built), *LIBS], capture_output=True, text=True, check=True)
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


@functools.cache
def tile_stats():
    """The compiled ``tile_stats`` C function (ctypes), or None when it cannot be used here."""
    return _load(SOURCE, "tile_stats", _ARGTYPES)


@functools.cache
def row_softmax():
    """The compiled ``row_softmax`` C function (``csrc/row_softmax.c``), or None when it cannot be used here."""
    return _load(ROW_SOURCE, "row_softmax", _ROW_ARGTYPES)


def _load(source: Path, symbol: str, argtypes: list):
    """Build (once) and load ``symbol`` from ``source``; None (with a warning) when that fails."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn(f"no C compiler found: the exact attention pass runs in torch ops (slower); "
                      f"install gcc to build kernels/csrc/{source.name}", RuntimeWarning, stacklevel=3)
        return None
    try:
        fn = getattr(ctypes.CDLL(str(_build(cc, source))), symbol)
    except UnsafeCacheError as err:
        return _fallback(str(err))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        return _fallback(f"could not build kernels/csrc/{source.name} ({detail.strip()[:300]})")
    fn.argtypes, fn.restype = argtypes, None
    return fn


def _fallback(reason: str) -> None:
    warnings.warn(f"{reason}; the exact attention pass runs in torch ops (slower)", RuntimeWarning, stacklevel=3)
    return None


def ptr(x: torch.Tensor | None) -> int | None:
    """Data pointer of a contiguous fp32/uint8 CPU tensor (None for None)."""
    if x is None:
        return None
    assert x.device.type == "cpu" and x.is_contiguous(), "tile_stats needs contiguous CPU tensors"
    return x.data_ptr()
