"""Patching page callbacks: example, run (a job), heatmaps, click a head cell to open it."""

from __future__ import annotations

from dash import Dash, Input, Output, State, html, no_update

from app.web import ids
from app.web.callbacks.jobs import cancel_previous, not_started, start_outputs, started
from app.web.services import placeholder_figure, safe
from app.web.services.patching import (estimate_note, figures, head_of_click, ioi_example, results, start_patching,
                                       summary)
from app.web.services.workspace import Workspace

JOB = ids.PATCH_JOB


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        Output(ids.PATCH_CLEAN, "value"), Output(ids.PATCH_CORRUPT, "value"), Output(ids.PATCH_ANSWER, "value"),
        Output(ids.PATCH_DISTRACTOR, "value"),
        Input(ids.PATCH_EXAMPLE, "n_clicks"),
        prevent_initial_call=True,
    )
    def example(n_clicks):
        item = ioi_example((n_clicks or 1) - 1)
        return item["prompt"], item["corrupt_prompt"], item["answer"], item["distractor"]

    @app.callback(
        *start_outputs(JOB), Output(ids.PATCH_MESSAGE, "children"),
        Input(ids.PATCH_RUN, "n_clicks"),
        State(ids.PATCH_CLEAN, "value"), State(ids.PATCH_CORRUPT, "value"), State(ids.PATCH_ANSWER, "value"),
        State(ids.PATCH_DISTRACTOR, "value"), State(ids.PATCH_METRIC, "value"),
        State(ids.SESSION, "data"), State(JOB.store, "data"),
        prevent_initial_call=True,
    )
    def run(n_clicks, clean, corrupt, answer, distractor, metric, session, store):
        if not n_clicks:
            return *not_started(), no_update
        model = (session or {}).get("model") or ws.default_model
        job_id, error = safe(start_patching, ws, model, clean, corrupt, answer, distractor, metric)
        if error:
            return *not_started(), error
        cancel_previous(ws, store)
        note, _ = safe(estimate_note, ws, session, model, clean)
        return *started(job_id), (html.Span(note, className="note") if note else "")

    @app.callback(
        Output(ids.PATCH_RESULT, "data"), Output(ids.PATCH_MESSAGE, "children", allow_duplicate=True),
        Input(JOB.done, "data"),
        prevent_initial_call=True,
    )
    def finished(done):
        if not done:
            return no_update, no_update
        if done.get("state") == "error":
            return no_update, done.get("error") or "patching failed"
        if done.get("state") != "done":
            return no_update, no_update
        result, error = safe(ws.jobs.result, done["id"])
        return (no_update, error) if error else (result["key"], "")

    @app.callback(
        Output(ids.PATCH_HEADS_GRAPH, "figure"), Output(ids.PATCH_RESID_GRAPH, "figure"),
        Output(ids.PATCH_SUMMARY, "children"),
        Input(ids.PATCH_RESULT, "data"),
    )
    def show(key):
        if not key:
            blank = placeholder_figure("fill in a clean and a corrupted prompt (or press 'IOI example'), then Patch")
            return blank, placeholder_figure(""), ""
        result, error = safe(results(ws).get, key)
        if result is None:
            return placeholder_figure(error), placeholder_figure(""), ""
        figs, error = safe(figures, result)
        if figs is None:
            return placeholder_figure(error), placeholder_figure(""), ""
        return figs[0], figs[1], summary(result)

    @app.callback(
        Output(ids.SESSION, "data", allow_duplicate=True), Output(ids.URL, "pathname", allow_duplicate=True),
        Input(ids.PATCH_HEADS_GRAPH, "clickData"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def open_head(click, session):
        head = head_of_click(click)
        if head is None:
            return no_update, no_update
        return dict(session or ws.session_defaults(), selected=list(head)), "/heads"
