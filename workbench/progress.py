"""Progress and cancellation for long work, the same object in the CLI, the app and the notebook.

A :class:`Progress` reports ``(fraction, message)`` to a callback (the app's job status), or draws
a terminal bar, and its :meth:`Progress.check` raises :class:`Cancelled` once the cancel check
says so. Long steps call :meth:`check` at least once per layer or per item, so a cancel lands
within seconds in every phase. Stages (:meth:`Progress.stage`) map a sub-task onto a slice of
the overall fraction.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar


ProgressCallback = Callable[[float, str], None]


class Cancelled(Exception):
    """The work was cancelled by the user (not an input error: nothing was written or published)."""


class Progress:
    """Progress over ``total`` items of one stage, inside ``[lo, hi]`` of the whole job.

    Args:
        callback: ``(fraction in [0, 1], message)``, or None.
        cancel: returns True once the work should stop, or None.
        bar: draw a tqdm bar in the terminal.
        desc, total: stage name and item count.
    """

    def __init__(self, callback: ProgressCallback | None = None, cancel: Callable[[], bool] | None = None, *,
                 bar: bool = False, desc: str = "", total: int = 1, lo: float = 0.0, hi: float = 1.0) -> None:
        self.callback, self.cancel, self.bar_enabled = callback, cancel, bar
        self.lo, self.hi = lo, hi
        self._bar = None
        self._reset(desc, total)

    def _reset(self, desc: str, total: int) -> None:
        self.close()
        self.desc, self.total, self.done = desc, max(1, int(total)), 0
        if self.bar_enabled and desc:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="item")

    def stage(self, desc: str, total: int = 1, lo: float | None = None, hi: float | None = None) -> "Progress":
        """Start a new stage (optionally on the slice ``[lo, hi]`` of the job); returns self."""
        if lo is not None:
            self.lo = lo
        if hi is not None:
            self.hi = hi
        self._reset(desc, total)
        self._emit(self.desc)
        return self

    def check(self) -> None:
        """Raise :class:`Cancelled` when cancellation was asked for."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled: nothing was written")

    def advance(self, n: int = 1, info: str = "") -> None:
        """Mark ``n`` more items done (and check for cancellation)."""
        self.check()
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            self._bar.update(n)
        self._emit(f"{self.desc} {self.done}/{self.total}" + (f" ({info})" if info else ""))

    def step_info(self, info: str) -> None:
        """Sub-progress inside the current item (checks for cancellation)."""
        self.check()
        if self._bar is not None:
            self._bar.set_postfix_str(info, refresh=False)
        self._emit(f"{self.desc} {self.done}/{self.total}: {info}")

    def fraction(self) -> float:
        return self.lo + (self.hi - self.lo) * self.done / self.total

    def _emit(self, message: str) -> None:
        if self.callback is not None:
            self.callback(self.fraction(), message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def as_progress(progress, *, desc: str, total: int) -> Progress:
    """``True`` (terminal bar) / ``False`` / a callback / a :class:`Progress` -> a Progress at a new stage."""
    if isinstance(progress, Progress):
        return progress.stage(desc, total)
    if callable(progress):
        return Progress(progress, desc=desc, total=total)
    return Progress(bar=bool(progress), desc=desc, total=total)


_CURRENT: ContextVar[Progress | None] = ContextVar("workbench_progress", default=None)


@contextlib.contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    """Make ``progress`` the current one for this call: every attention call of every forward
    inside checks it (:func:`check_cancelled`), so a cancel lands within one layer in any phase."""
    token = _CURRENT.set(progress)
    try:
        yield progress
    finally:
        _CURRENT.reset(token)


def current() -> Progress | None:
    """The progress set by :func:`reporting` in this context, if any."""
    return _CURRENT.get()


class Estimate:
    """Sub-progress of a long loop inside one stage: ``done/total what, ~N s left`` on the current
    progress (:func:`reporting`), from the mean time per item so far; a no-op without one."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = max(1, int(total)), what, 0
        self.start = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        progress = _CURRENT.get()
        if progress is None:
            return
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        progress.step_info(f"{self.done}/{self.total} {self.what}, ~{left:.0f} s left")


def check_cancelled() -> None:
    """Raise :class:`Cancelled` when the current progress was cancelled (no-op outside :func:`reporting`)."""
    progress = _CURRENT.get()
    if progress is not None:
        progress.check()
