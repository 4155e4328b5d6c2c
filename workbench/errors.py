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
