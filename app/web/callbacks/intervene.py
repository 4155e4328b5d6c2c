"""Page 5 callbacks: the session's intervention list, the comparison job, its views."""

from __future__ import annotations

from dash import ALL, Dash, Input, Output, State, ctx, html, no_update

from app.web import ids
from app.web.callbacks.jobs import cancel_previous, not_started, start_outputs, started
from app.web.components import table
from app.web.services import placeholder_figure, safe
from app.web.services.analysis import get_analysis
from app.web.services.headmap import default_metric
from app.web.services.intervene import (add_item, delta_figure, delta_metric_options, describe_item, make_item,
                                        start_comparison, topk_table)
from app.web.services.workspace import Workspace

JOB = ids.INTERVENE_JOB


def _fmt_loss(value: float | None, note: str | None) -> str:
    return f"{value:.4f}" if value is not None else f"n/a ({note})"


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        Output(ids.INTERVENE_LAYER, "options"), Output(ids.INTERVENE_LAYER, "value"),
        Output(ids.INTERVENE_HEAD, "options"), Output(ids.INTERVENE_HEAD, "value"),
        Output(ids.INTERVENE_MESSAGE, "children"),
        Input(ids.INTERVENE_INIT, "data"), State(ids.SESSION, "data"),
    )
    def init(_, session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return [], None, [], None, error
        cap = analysis.capture
        layer, head = (session or {}).get("selected") or (cap.layers[0], cap.heads[0])
        return ([{"label": str(v), "value": v} for v in cap.layers], layer,
                [{"label": str(v), "value": v} for v in cap.heads], head, "")

    @app.callback(
        Output(ids.INTERVENTIONS, "data"), Output(ids.INTERVENE_MESSAGE, "children", allow_duplicate=True),
        Input(ids.INTERVENE_ADD, "n_clicks"),
        State(ids.INTERVENE_LAYER, "value"), State(ids.INTERVENE_HEAD, "value"), State(ids.INTERVENE_KIND, "value"),
        State(ids.INTERVENE_ALPHA, "value"), State(ids.INTERVENE_U, "value"), State(ids.INTERVENTIONS, "data"),
        prevent_initial_call=True,
    )
    def add(n_clicks, layer, head, kind, alpha, u, items):
        if not n_clicks:
            return no_update, no_update
        item, error = safe(make_item, layer, head, kind, alpha, u)
        if error:
            return no_update, error
        return add_item(items, item), ""

    @app.callback(
        Output(ids.INTERVENTIONS, "data", allow_duplicate=True),
        Input({"type": ids.INTERVENE_REMOVE, "index": ALL}, "n_clicks"), Input(ids.INTERVENE_CLEAR, "n_clicks"),
        State(ids.INTERVENTIONS, "data"),
        prevent_initial_call=True,
    )
    def remove(_removes, clear, items):
        trigger = ctx.triggered_id
        if trigger == ids.INTERVENE_CLEAR:
            return [] if clear else no_update
        if not isinstance(trigger, dict) or not ctx.triggered or not ctx.triggered[0]["value"]:
            return no_update  # buttons re-rendered with n_clicks=0
        index = trigger["index"]
        return [item for i, item in enumerate(items or []) if i != index]

    @app.callback(Output(ids.INTERVENE_LIST, "children"), Input(ids.INTERVENTIONS, "data"))
    def show_list(items):
        if not items:
            return html.Span("no interventions yet: pick a head and press 'Add to list'", className="hint")
        return html.Ul([html.Li([describe_item(item), " ",
                                 html.Button("remove", id={"type": ids.INTERVENE_REMOVE, "index": i}, n_clicks=0,
                                             className="button small")])
                        for i, item in enumerate(items)])

    @app.callback(
        *start_outputs(JOB), Output(ids.INTERVENE_MESSAGE, "children", allow_duplicate=True),
        Input(ids.INTERVENE_RUN, "n_clicks"), State(ids.INTERVENTIONS, "data"), State(ids.SESSION, "data"),
        State(JOB.store, "data"),
        prevent_initial_call=True,
    )
    def run(n_clicks, items, session, store):
        if not n_clicks:
            return *not_started(), no_update
        analysis, error = safe(get_analysis, ws, session)
        if not error:
            cancel_previous(ws, store)
            job_id, error = safe(start_comparison, ws, analysis, items)
        if error:
            return *not_started(), error
        return *started(job_id), ""

    @app.callback(Output(ids.INTERVENE_RESULT, "data"), Input(JOB.done, "data"), prevent_initial_call=True)
    def finished(done):
        if not done or done.get("state") != "done":
            return no_update
        result, error = safe(ws.jobs.result, done["id"])
        return no_update if error else result["key"]

    @app.callback(
        Output(ids.INTERVENE_TOPK, "children"), Output(ids.INTERVENE_LOSS, "children"),
        Output(ids.INTERVENE_CONTINUATION, "children"), Output(ids.INTERVENE_METRIC, "options"),
        Output(ids.INTERVENE_METRIC, "value"), Output(ids.INTERVENE_DELTA, "figure"),
        Output(ids.INTERVENE_MESSAGE, "children", allow_duplicate=True),
        Input(ids.INTERVENE_RESULT, "data"), Input(ids.INTERVENE_METRIC, "value"),
        prevent_initial_call="initial_duplicate",
    )
    def show(key, metric):
        empty = placeholder_figure("press 'Compare before / after'")
        if not key:
            return None, None, None, [], None, empty, no_update
        comparison, error = safe(ws.comparisons.get, key)
        if comparison is None:
            return None, None, None, [], None, placeholder_figure(error), error
        before, after = comparison.before, comparison.after
        applied = html.Div("with: " + ", ".join(describe_item(i) for i in comparison.items), className="hint")
        topk = [applied, table(topk_table(comparison), {"p_before": ".4g", "p_after": ".4g"})] \
            if before.topk is not None else f"n/a ({before.notes.get('top-k')})"
        loss = html.Div([html.Div(f"before: {_fmt_loss(before.loss, before.notes.get('loss'))}"),
                         html.Div(f"after: {_fmt_loss(after.loss, after.notes.get('loss'))}")])
        continuation = html.Div([
            html.Div([html.B("before: "), html.Span(before.continuation or f"n/a ({before.notes.get('continuation')})",
                                                    className="continuation")]),
            html.Div([html.B("after: "), html.Span(after.continuation or f"n/a ({after.notes.get('continuation')})",
                                                   className="continuation")]),
        ])
        options = delta_metric_options(comparison)
        metric = default_metric(options, metric)
        fig, error = safe(delta_figure, comparison, metric)
        return (topk, loss, continuation, options, metric, fig if fig is not None else placeholder_figure(error or ""),
                error or "")
