"""Page 1 callbacks: load an example, run the analysis, show the tokens."""

from __future__ import annotations

from dash import Dash, Input, Output, State, html, no_update

from app.web import ids
from app.web.callbacks.jobs import cancel_previous, not_started, start_outputs, started
from app.web.components import ok, token_strip
from app.web.services import safe
from app.web.services.analysis import (MAX_EXAMPLE_INDEX, dataset_options, get_analysis, model_options,
                                       resolve_model_name, start_analysis, start_example, summary,
                                       token_strip as token_pairs)
from app.web.services.inputs import parse_int
from app.web.services.workspace import Workspace

JOB = ids.PROMPT_JOB


def register(app: Dash, ws: Workspace) -> None:
    registry_names = {o["value"] for o in model_options()}

    @app.callback(
        Output(ids.PROMPT_MODEL, "value"), Output(ids.PROMPT_FOLDER, "value"), Output(ids.PROMPT_TEXT, "value"),
        Output(ids.PROMPT_DATASET, "options"),
        Input(ids.PROMPT_INIT, "data"), Input(ids.SHARE_ADOPTED, "data"), State(ids.SESSION, "data"),
    )
    def init(_, _adopted, session):
        session = session or ws.session_defaults()
        model = session.get("model") or ws.default_model
        datasets = dataset_options(ws)
        if model in registry_names:
            return model, "", session.get("prompt") or "", datasets
        return (ws.default_model if ws.default_model in registry_names else None, model, session.get("prompt") or "",
                datasets)

    @app.callback(
        *start_outputs(JOB), Output(ids.PROMPT_MESSAGE, "children"),
        Input(ids.PROMPT_RUN, "n_clicks"),
        State(ids.PROMPT_MODEL, "value"), State(ids.PROMPT_FOLDER, "value"), State(ids.PROMPT_TEXT, "value"),
        State(JOB.store, "data"),
        prevent_initial_call=True,
    )
    def run(n_clicks, model, folder, text, store):
        if not n_clicks:
            return *not_started(), no_update
        name, error = safe(resolve_model_name, model, folder)
        if not error:
            cancel_previous(ws, store)
            job_id, error = safe(start_analysis, ws, name, text)
        if error:
            return *not_started(), error
        return *started(job_id), ""

    @app.callback(
        *start_outputs(JOB), Output(ids.PROMPT_MESSAGE, "children", allow_duplicate=True),
        Output(ids.PROMPT_EXAMPLE_ERROR, "children"),
        Input(ids.PROMPT_LOAD_EXAMPLE, "n_clicks"),
        State(ids.PROMPT_MODEL, "value"), State(ids.PROMPT_FOLDER, "value"),
        State(ids.PROMPT_DATASET, "value"), State(ids.PROMPT_EXAMPLE, "value"), State(JOB.store, "data"),
        prevent_initial_call=True,
    )
    def load_example(n_clicks, model, folder, dataset, index, store):
        if not n_clicks:
            return *not_started(), no_update, no_update
        _, error = safe(parse_int, index, "example index", 0, MAX_EXAMPLE_INDEX)
        if error:  # beside the field, and nothing is loaded
            return *not_started(), "", error
        name, error = safe(resolve_model_name, model, folder)
        if not error:
            cancel_previous(ws, store)
            job_id, error = safe(start_example, ws, name, dataset, index)
        if error:
            return *not_started(), error, ""
        return *started(job_id), "", ""

    @app.callback(
        Output(ids.SESSION, "data"), Output(ids.PROMPT_TEXT, "value", allow_duplicate=True),
        Output(ids.PROMPT_MESSAGE, "children", allow_duplicate=True),
        Input(JOB.done, "data"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def finished(done, session):
        if not done or done.get("state") != "done":
            message = (done or {}).get("error") or (done or {}).get("message") or no_update
            return no_update, no_update, message
        result, error = safe(ws.jobs.result, done["id"])
        if error:
            return no_update, no_update, error
        if result["kind"] == "example":
            return no_update, result["text"], ok("example loaded: press Run")
        session = dict(session or ws.session_defaults())
        session.update(model=result["model"], analysis=result["key"], prompt=result["prompt"], selected=None)
        return session, no_update, ""

    @app.callback(
        Output(ids.PROMPT_SUMMARY, "children"), Output(ids.PROMPT_TOKENS, "children"),
        Input(ids.SESSION, "data"),
    )
    def show_tokens(session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return html.Span(error, className="hint"), None
        return summary(analysis), token_strip(token_pairs(analysis))
