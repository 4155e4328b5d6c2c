"""The app's service layer: UI state -> workbench / probes -> figures and tables.

Callbacks stay thin: they call these functions through :func:`safe`, which turns a
:class:`workbench.errors.WorkbenchError` (bad prompt, unknown model, malformed run folder...)
into the one-line message the page shows, so the app keeps running. Long work is submitted to
the workspace's :class:`app.web.jobs.JobManager` and returns a job id.

Modules: :mod:`.workspace` (process-wide caches and limits), :mod:`.analysis` (model & prompt),
:mod:`.headmap`, :mod:`.patterns`, :mod:`.atlas`, :mod:`.intervene`, :mod:`.runs`,
:mod:`.metric_help`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import plotly.graph_objects as go

from workbench.errors import WorkbenchError

T = TypeVar("T")
log = logging.getLogger(__name__)


def safe(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T | None, str | None]:
    """``(fn(*args, **kwargs), None)``, or ``(None, message)`` when it raises.

    A :class:`WorkbenchError` gives its own one-line message; any other exception is logged
    with its traceback and reported as an internal error (the app keeps serving).
    """
    try:
        return fn(*args, **kwargs), None
    except WorkbenchError as err:
        return None, str(err)
    except Exception as err:  # a bug in one view must not take the page down
        log.exception("service call %s failed", getattr(fn, "__name__", fn))
        return None, f"internal error ({type(err).__name__}: {str(err)[:300]}); see the server log"


def placeholder_figure(text: str, height: int = 360) -> go.Figure:
    """An empty figure that shows ``text`` in the middle (nothing to plot yet / an error)."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#666"))
    fig.update_layout(height=height, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      margin=dict(l=20, r=20, t=20, b=20), plot_bgcolor="white")
    return fig
