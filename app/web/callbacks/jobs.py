"""Job panels: poll a page's background job, show progress, cancel it, announce the end."""

from __future__ import annotations

from dash import Dash, Input, Output, State, no_update

from app.web import ids
from app.web.ids import JobIds
from app.web.jobs import FINISHED
from app.web.services import safe
from app.web.services.workspace import Workspace

PANELS: tuple[JobIds, ...] = (ids.PROMPT_JOB, ids.HEADMAP_JOB, ids.ATLAS_JOB, ids.INTERVENE_JOB, ids.LC_JOB,
                              ids.PATCH_JOB)


def started(job_id: str) -> tuple:
    """Values for ``(store, interval.disabled, cancel.disabled, status)`` when a job starts."""
    return {"id": job_id}, False, False, "queued…"


def start_outputs(panel: JobIds) -> list[Output]:
    """The outputs a page's start callback sets through :func:`started` (duplicates allowed)."""
    return [Output(panel.store, "data", allow_duplicate=True),
            Output(panel.interval, "disabled", allow_duplicate=True),
            Output(panel.cancel, "disabled", allow_duplicate=True),
            Output(panel.status, "children", allow_duplicate=True)]


def not_started() -> tuple:
    return no_update, no_update, no_update, no_update


def cancel_previous(ws: Workspace, store: dict | None) -> None:
    """A page runs one job at a time: starting a new one cancels the previous one."""
    if store and store.get("id"):
        safe(ws.jobs.cancel, store["id"])


def status_text(status: dict) -> str:
    state = status["state"]
    if state in ("waiting", "cancelling"):
        return f"{status['message']} ({status['elapsed_s']:.0f} s)"
    if state == "running":
        return f"{status['message']} ({100 * status['progress']:.0f}%, {status['elapsed_s']:.0f} s)"
    if state == "done":
        return f"done in {status['elapsed_s']:.1f} s"
    if state == "error":
        return f"error: {status['error']}"
    return status["message"]


def finished_key(ws: Workspace, done: dict | None):
    """The cache key a finished job returned (``result["key"]``), or ``no_update`` while the job
    has not finished well or its result is gone."""
    if not done or done.get("state") != "done":
        return no_update
    result, error = safe(ws.jobs.result, done["id"])
    return no_update if error else result["key"]


def register_panel(app: Dash, ws: Workspace, panel: JobIds) -> None:
    @app.callback(
        Output(panel.progress, "value"), Output(panel.status, "children"), Output(panel.status, "className"),
        Output(panel.interval, "disabled"), Output(panel.cancel, "disabled"), Output(panel.done, "data"),
        Output(panel.store, "data"),
        Input(panel.interval, "n_intervals"), State(panel.store, "data"),
        prevent_initial_call=True,
    )
    def poll(_n, store):
        if not store or not store.get("id"):
            return no_update, no_update, no_update, True, True, no_update, no_update
        status, error = safe(ws.jobs.status, store["id"])
        if error:
            return "0", error, "job-status error", True, True, no_update, None
        css = f"job-status {status['state']}"
        if status["state"] in FINISHED:
            return str(status["progress"]), status_text(status), css, True, True, status, None
        cancel_disabled = status["state"] == "cancelling"
        return str(status["progress"]), status_text(status), css, False, cancel_disabled, no_update, no_update

    @app.callback(
        Output(panel.status, "children", allow_duplicate=True), Output(panel.cancel, "disabled", allow_duplicate=True),
        Input(panel.cancel, "n_clicks"), State(panel.store, "data"),
        prevent_initial_call=True,
    )
    def cancel(n_clicks, store):
        if not n_clicks or not store or not store.get("id"):
            return no_update, no_update
        asked, error = safe(ws.jobs.cancel, store["id"])
        return error or ("cancelling… (stops at the next check)" if asked else "already finished"), True


def register(app: Dash, ws: Workspace) -> None:
    for panel in PANELS:
        register_panel(app, ws, panel)
