"""Atomic writes: build in a temporary sibling, then swap it into place.

A run that is killed midway leaves at most a hidden ``.tmp-<name>-<pid>-*`` sibling, never a
half-written result under the final name, and an existing result stays reachable at its path
until the new one is complete: on Linux the two folders are exchanged in one
``renameat2(RENAME_EXCHANGE)`` call; elsewhere the old folder is moved aside to
``.old-<name>-<pid>`` for the instant between two renames, and the next write to the same path
puts it back if the process died there. Leftovers of dead processes (for any name in the same
folder) are removed by the next write there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a libc without the wrapper
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


_RANDOM = r"[a-z0-9_]{8}"  # the random part tempfile.mkdtemp / mkstemp put after the prefix


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(final: Path) -> None:
    """Put back a result moved aside by a process that died between its two renames, and remove
    the temporary and moved-aside siblings of ``final`` left by dead processes."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    # .old-<name>-<pid> and .tmp-<name>-<pid>-<random> (the random part of mkdtemp/mkstemp has no '-')
    name = re.escape(final.name)
    pattern = re.compile(rf"^\.(?:(?P<kind>old)-{name}-(?P<pid>\d+)|tmp-{name}-(?P<tmp_pid>\d+)-{_RANDOM})$")
    for sibling in sorted(final.parent.iterdir()):
        match = pattern.match(sibling.name)
        if match is None or process_alive(int(match.group("pid") or match.group("tmp_pid"))):
            continue
        try:
            if sibling.lstat().st_uid != os.getuid():  # another user's: never touched
                continue
        except FileNotFoundError:
            continue
        if match.group("kind") == "old" and not os.path.lexists(final):
            os.replace(sibling, final)  # the last complete result, back at its path
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                sibling.unlink()


_LEFTOVER = re.compile(rf"^\.(?:old-(?P<old>.+)-(?P<old_pid>\d+)|tmp-(?P<tmp>.+)-(?P<tmp_pid>\d+)-{_RANDOM})$")


def is_leftover(path: Path) -> bool:
    """True for the hidden temporary / moved-aside siblings this module writes."""
    return Path(path).name.startswith((".tmp-", ".old-"))


def recover_all(folder: Path) -> None:
    """:func:`recover` every result in ``folder`` that has a leftover of a dead process beside it:
    moved-aside results go back to their paths, temporary folders and files are removed."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:  # missing or unreadable: nothing of ours to clean
        return
    names = set()
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match is not None:
            names.add(match.group("old") or match.group("tmp"))
    for name in sorted(names):
        recover(folder / name)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_all(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o755)
    backup = None
    try:
        yield tmp
        if not os.path.lexists(final):
            os.replace(tmp, final)
        elif exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old result
        else:
            backup = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, backup)
            os.replace(tmp, final)
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        if backup is not None and os.path.lexists(backup) and not os.path.lexists(final):
            os.replace(backup, final)  # interrupted between the two renames: the old result goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator:
    """Open a temporary file next to ``final``; rename it over ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
