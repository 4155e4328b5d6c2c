"""Page 2 callbacks: metric list, heatmap, head selection, on-demand probes."""

from __future__ import annotations

from dash import Dash, Input, Output, State, dcc, html, no_update

from app.web import ids
from app.web.callbacks.clicks import head_from_click
from app.web.callbacks.jobs import cancel_previous, not_started, start_outputs, started
from app.web.services import placeholder_figure, safe
from app.web.services.analysis import get_analysis
from app.web.services.headmap import (check_probe_request, default_metric, head_summary,
                                      headmap_figure, metric_options, probe_catalog, probe_cost_note, split_metric_value,
                                      start_probe)
from app.web.services.metric_help import describe
from app.web.services.workspace import Workspace

JOB = ids.HEADMAP_JOB


def _probe_list(catalog: list[dict]) -> html.Ul:
    items = []
    for p in catalog:
        state = f"computed on {p['source']}" if p["computed"] else (
            "runs the model: press Compute" if p["needs_model"] else "not available")
        if p["note"]:
            state += f" ({p['note']})"
        items.append(html.Li([html.B(p["name"]), f": {', '.join(p['metrics'])} — {state}"]))
    return html.Ul(items, className="probe-list")


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        Output(ids.HEADMAP_METRIC, "options"), Output(ids.HEADMAP_METRIC, "value"),
        Output(ids.HEADMAP_GRAPH, "figure"), Output(ids.HEADMAP_HELP, "children"),
        Output(ids.HEADMAP_SELECTED, "children"), Output(ids.HEADMAP_PROBE, "options"),
        Output(ids.HEADMAP_PROBE_LIST, "children"), Output(ids.HEADMAP_MESSAGE, "children"),
        Input(ids.SESSION, "data"), Input(ids.HEADMAP_METRIC, "value"), Input(ids.HEADMAP_REFRESH, "data"),
    )
    def show(session, metric, _refresh):
        analysis, error = safe(get_analysis, ws, session)
        catalog = probe_catalog(analysis)
        probe_options = [{"label": f"{p['name']}{' (computed)' if p['computed'] else ''}", "value": p["name"]}
                         for p in catalog]
        if analysis is None:
            return ([], None, placeholder_figure("no prompt analysed yet"), "", "", probe_options,
                    _probe_list(catalog), error)
        options = metric_options(analysis)
        metric = default_metric(options, metric or (session or {}).get("metric"))
        selected = (session or {}).get("selected")
        fig, error = safe(headmap_figure, analysis, metric, selected)
        help_text = ""
        if metric:
            probe, name = split_metric_value(metric)
            help_text = [html.B(f"{probe} / {name}: "), describe(probe, name)]
        return (options, metric, fig if fig is not None else placeholder_figure(error or ""), help_text,
                head_summary(analysis, selected), probe_options, _probe_list(catalog), error or "")

    @app.callback(
        Output(ids.SESSION, "data", allow_duplicate=True),
        Input(ids.HEADMAP_METRIC, "value"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def remember_metric(metric, session):
        """The chosen metric travels in the session (and so in the share link)."""
        if not metric or (session or {}).get("metric") == metric:
            return no_update
        return dict(session or ws.session_defaults(), metric=metric)

    @app.callback(Output(ids.HEADMAP_LINKS, "children"), Input(ids.SESSION, "data"))
    def links(session):
        selected = (session or {}).get("selected")
        if not selected:
            return []
        layer, head = selected
        return [dcc.Link(f"Open pattern of L{layer}H{head}", href="/pattern"),
                dcc.Link(f"Intervene on L{layer}H{head}", href="/intervene")]

    @app.callback(
        Output(ids.SESSION, "data", allow_duplicate=True),
        Input(ids.HEADMAP_GRAPH, "clickData"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def select(click, session):
        head = head_from_click(click, heatmap=True)
        if head is None:
            return no_update
        return dict(session or ws.session_defaults(), selected=list(head))

    @app.callback(
        *start_outputs(JOB), Output(ids.HEADMAP_MESSAGE, "children", allow_duplicate=True),
        Output(ids.HEADMAP_SOURCE_N_ERROR, "children"),
        Input(ids.HEADMAP_COMPUTE, "n_clicks"), State(ids.HEADMAP_PROBE, "value"),
        State(ids.HEADMAP_SOURCE, "value"), State(ids.HEADMAP_SOURCE_N, "value"), State(ids.SESSION, "data"),
        State(JOB.store, "data"),
        prevent_initial_call=True,
    )
    def compute(n_clicks, probe, dataset, n, session, store):
        """Pre-checks first (probe requirements, sample count); then the job, with a cost estimate."""
        if not n_clicks:
            return *not_started(), no_update, no_update
        analysis, error = safe(get_analysis, ws, session)
        if error:
            return *not_started(), error, ""
        checked, error = safe(check_probe_request, ws, analysis, probe, dataset or None, n)
        if error:
            beside = error.startswith("samples")
            return *not_started(), ("" if beside else error), (error if beside else "")
        cancel_previous(ws, store)
        job_id, error = safe(start_probe, ws, analysis, probe, dataset or None, n)
        if error:
            return *not_started(), error, ""
        name, checked_dataset, samples = checked
        text, _ = safe(probe_cost_note, ws, analysis, name, checked_dataset, samples)
        return *started(job_id), (html.Span(text, className="note") if text else ""), ""

    @app.callback(
        Output(ids.HEADMAP_REFRESH, "data"), Output(ids.HEADMAP_METRIC, "value", allow_duplicate=True),
        Input(JOB.done, "data"), State(ids.HEADMAP_REFRESH, "data"),
        prevent_initial_call=True,
    )
    def finished(done, count):
        if not done or done.get("state") != "done":
            return no_update, no_update
        result, error = safe(ws.jobs.result, done["id"])
        if error or not result.get("metrics"):
            return (count or 0) + 1, no_update
        return (count or 0) + 1, f"{result['probe']}|{result['metrics'][0]}"
