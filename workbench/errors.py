"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class WorkbenchError(Exception):
    """An error caused by the user's input or environment, with a fix in its message.

    Front ends print ``str(err)`` as a single line instead of a traceback.
    """


class ModelNotFoundError(WorkbenchError):
    """Unknown model name or missing model folder."""


class CorruptModelError(WorkbenchError):
    """A cached or given checkpoint cannot be read (truncated, corrupt, missing files)."""


class InputError(WorkbenchError):
    """Bad prompt, dataset, head index, probe or metric name, or parameter."""


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (bools refused), else :class:`InputError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {bound}, got {value!r}")
    return value
