"""Page 3 callbacks: head choice, zoomable pattern, row view."""

from __future__ import annotations

import re

from dash import Dash, Input, Output, State, ctx, no_update

from app.web import ids
from app.web.services import placeholder_figure, safe
from app.web.services.analysis import get_analysis
from app.web.services.patterns import pattern_view, region_from_relayout, row_view
from app.web.services.workspace import Workspace

_POSITION = re.compile(r"^(\d+):")


def clicked_query(click: dict | None) -> int | None:
    """Query position of a click on the pattern (``"12:'tok'"`` labels or numeric positions)."""
    if not click or not click.get("points"):
        return None
    y = click["points"][0].get("y")
    if isinstance(y, (int, float)):
        return int(round(y))
    match = _POSITION.match(str(y))
    return int(match.group(1)) if match else None


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        Output(ids.PATTERN_LAYER, "options"), Output(ids.PATTERN_LAYER, "value"),
        Output(ids.PATTERN_HEAD, "options"), Output(ids.PATTERN_HEAD, "value"),
        Output(ids.PATTERN_QUERY, "max"), Output(ids.PATTERN_MESSAGE, "children"),
        Input(ids.PATTERN_INIT, "data"), State(ids.SESSION, "data"),
    )
    def init(_, session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return [], None, [], None, None, error
        cap = analysis.capture
        layer, head = (session or {}).get("selected") or (cap.layers[0], cap.heads[0])
        return ([{"label": str(v), "value": v} for v in cap.layers], layer,
                [{"label": str(v), "value": v} for v in cap.heads], head, analysis.n_tokens - 1, "")

    @app.callback(
        Output(ids.SESSION, "data", allow_duplicate=True),
        Input(ids.PATTERN_LAYER, "value"), Input(ids.PATTERN_HEAD, "value"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def remember(layer, head, session):
        if layer is None or head is None or (session or {}).get("selected") == [layer, head]:
            return no_update
        return dict(session or ws.session_defaults(), selected=[int(layer), int(head)])

    @app.callback(
        Output(ids.PATTERN_GRAPH, "figure"), Output(ids.PATTERN_VIEW, "data"), Output(ids.PATTERN_INFO, "children"),
        Output(ids.PATTERN_MESSAGE, "children", allow_duplicate=True),
        Input(ids.PATTERN_LAYER, "value"), Input(ids.PATTERN_HEAD, "value"),
        Input(ids.PATTERN_GRAPH, "relayoutData"),
        State(ids.PATTERN_VIEW, "data"), State(ids.SESSION, "data"),
        prevent_initial_call="initial_duplicate",
    )
    def show(layer, head, relayout, view, session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return placeholder_figure(error), None, "", error
        region = None
        if ctx.triggered_id == ids.PATTERN_GRAPH:
            region = region_from_relayout(view, relayout, analysis.n_tokens)
            if region is None or (view and region == (view["q0"], view["q1"], view["k0"], view["k1"])):
                return no_update, no_update, no_update, no_update
        result, error = safe(pattern_view, analysis, layer, head, region)
        if result is None:
            return placeholder_figure(error), None, "", error
        fig, new_view, info = result
        return fig, new_view, info, ""

    @app.callback(
        Output(ids.PATTERN_ROW, "figure"), Output(ids.PATTERN_QUERY, "value"),
        Input(ids.PATTERN_QUERY, "value"), Input(ids.PATTERN_GRAPH, "clickData"),
        Input(ids.PATTERN_LAYER, "value"), Input(ids.PATTERN_HEAD, "value"),
        State(ids.SESSION, "data"),
    )
    def row(query, click, layer, head, session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return placeholder_figure(error, 300), no_update
        if ctx.triggered_id == ids.PATTERN_GRAPH:
            query = clicked_query(click) if clicked_query(click) is not None else query
        if query is None:
            query = analysis.n_tokens - 1
        fig, error = safe(row_view, analysis, layer, head, query)
        return (fig if fig is not None else placeholder_figure(error, 300)), query
