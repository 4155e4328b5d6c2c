"""Page 4 callbacks: embed the heads (a job), draw the atlas, click to open a head."""

from __future__ import annotations

from dash import Dash, Input, Output, State, no_update

from app.web import ids
from app.web.callbacks.clicks import head_from_click
from app.web.callbacks.jobs import cancel_previous, finished_key, not_started, start_outputs, started
from app.web.services import placeholder_figure, safe
from app.web.services.atlas import atlas_figure, start_atlas
from app.web.services.workspace import Workspace

JOB = ids.ATLAS_JOB


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        *start_outputs(JOB), Output(ids.ATLAS_MESSAGE, "children"), Output(ids.ATLAS_N_ERROR, "children"),
        Input(ids.ATLAS_RUN, "n_clicks"),
        State(ids.ATLAS_DATASET, "value"), State(ids.ATLAS_N, "value"), State(ids.ATLAS_METHOD, "value"),
        State(ids.SESSION, "data"), State(JOB.store, "data"),
        prevent_initial_call=True,
    )
    def run(n_clicks, dataset, n, method, session, store):
        if not n_clicks:
            return *not_started(), no_update, no_update
        model = (session or {}).get("model") or ws.default_model
        job_id, error = safe(start_atlas, ws, model, dataset, n, method)
        if error:
            beside = error.startswith("samples")
            return *not_started(), ("" if beside else error), (error if beside else "")
        cancel_previous(ws, store)
        return *started(job_id), "", ""

    @app.callback(
        Output(ids.ATLAS_RESULT, "data"),
        Input(JOB.done, "data"),
        prevent_initial_call=True,
    )
    def finished(done):
        return finished_key(ws, done)

    @app.callback(
        Output(ids.ATLAS_GRAPH, "figure"), Output(ids.ATLAS_MESSAGE, "children", allow_duplicate=True),
        Input(ids.ATLAS_RESULT, "data"), Input(ids.ATLAS_COLOR, "value"), Input(ids.ATLAS_THRESHOLD, "value"),
        State(ids.SESSION, "data"),
        prevent_initial_call="initial_duplicate",
    )
    def show(key, color, threshold, session):
        if not key:
            return placeholder_figure("press 'Embed heads' to place every head of the session's model"), ""
        atlas, error = safe(ws.atlases.get, key)
        if atlas is None:
            return placeholder_figure(error), error
        selected = (session or {}).get("selected")
        fig, error = safe(atlas_figure, atlas, color, threshold, tuple(selected) if selected else None)
        return (fig if fig is not None else placeholder_figure(error)), error or ""

    @app.callback(
        Output(ids.SESSION, "data", allow_duplicate=True), Output(ids.URL, "pathname"),
        Input(ids.ATLAS_GRAPH, "clickData"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def open_head(click, session):
        head = head_from_click(click, heatmap=False)
        if head is None:
            return no_update, no_update
        return dict(session or ws.session_defaults(), selected=list(head)), "/pattern"
