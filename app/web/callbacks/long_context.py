"""Page 7 callbacks: run the long-context job, draw the taxonomy, show a clicked head."""

from __future__ import annotations

from dash import Dash, Input, Output, State, html, no_update

from app.web import ids
from app.web.callbacks.clicks import head_from_click
from app.web.callbacks.jobs import cancel_previous, finished_key, not_started, start_outputs, started
from app.web.services import placeholder_figure, safe
from app.web.services.long_context import estimate_note, head_view, sample_options, start_taxonomy, taxonomy_figure
from app.web.services.workspace import Workspace

JOB = ids.LC_JOB


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        *start_outputs(JOB), Output(ids.LC_MESSAGE, "children"),
        Input(ids.LC_RUN, "n_clicks"),
        State(ids.LC_LENGTH, "value"), State(ids.LC_DEPTHS, "value"), State(ids.SESSION, "data"),
        State(JOB.store, "data"),
        prevent_initial_call=True,
    )
    def run(n_clicks, length, depths, session, store):
        if not n_clicks:
            return *not_started(), no_update
        model = (session or {}).get("model") or ws.default_model
        cancel_previous(ws, store)
        job_id, error = safe(start_taxonomy, ws, model, length, depths)
        if error:
            return *not_started(), error
        note, _ = safe(estimate_note, ws, session, model, length, depths)
        return *started(job_id), (html.Span(note, className="note") if note else "")

    @app.callback(Output(ids.LC_RESULT, "data"), Input(JOB.done, "data"), prevent_initial_call=True)
    def finished(done):
        return finished_key(ws, done)

    @app.callback(
        Output(ids.LC_GRAPH, "figure"), Output(ids.LC_SAMPLE, "options"), Output(ids.LC_SAMPLE, "value"),
        Output(ids.LC_MESSAGE, "children", allow_duplicate=True),
        Input(ids.LC_RESULT, "data"),
        prevent_initial_call="initial_duplicate",
    )
    def show(key):
        if not key:
            return placeholder_figure("pick a length and depths, then press Run"), [], None, ""
        tax, error = safe(ws.taxonomies.get, key)
        if tax is None:
            return placeholder_figure(error), [], None, error
        fig, error = safe(taxonomy_figure, tax)
        return (fig if fig is not None else placeholder_figure(error)), sample_options(tax), 0, error or ""

    @app.callback(Output(ids.LC_HEAD, "data"), Input(ids.LC_GRAPH, "clickData"), prevent_initial_call=True)
    def select(click):
        head = head_from_click(click, heatmap=False)
        return no_update if head is None else list(head)

    @app.callback(
        Output(ids.LC_THUMB, "figure"), Output(ids.LC_ROW, "figure"),
        Output(ids.LC_MESSAGE, "children", allow_duplicate=True),
        Input(ids.LC_HEAD, "data"), Input(ids.LC_SAMPLE, "value"), State(ids.LC_RESULT, "data"),
        prevent_initial_call="initial_duplicate",
    )
    def head(selected, sample, key):
        empty = placeholder_figure("click a head in the scatter")
        if not selected or not key:
            return empty, placeholder_figure(""), ""
        tax, error = safe(ws.taxonomies.get, key)
        if tax is None:
            return empty, placeholder_figure(""), error
        figs, error = safe(head_view, tax, int(selected[0]), int(selected[1]), sample)
        if figs is None:
            return placeholder_figure(error), placeholder_figure(""), error
        return figs[0], figs[1], ""
