"""Page 3 callbacks: head choice, zoomable pattern, row view.

Zoom events (``relayoutData``) are read by their own small callbacks that only write a region
store: the graph's autosize event on first render must never re-trigger (and so supersede) the
pending figure request, which left long-input maps blank.
"""

from __future__ import annotations

import re

import pandas as pd
from dash import Dash, Input, Output, State, ctx, dcc, no_update

from app.web import ids
from app.web.components import table
from app.web.services import patterns, placeholder_figure, safe
from app.web.services.analysis import get_analysis
from app.web.services.inputs import parse_int
from app.web.services.workspace import Workspace

_POSITION = re.compile(r"^(\d+):")


def clicked_query(click: dict | None) -> int | None:
    """Query position of a click on the pattern (``"12:'tok'"`` labels or numeric positions)."""
    if not click or not click.get("points"):
        return None
    y = click["points"][0].get("y")
    if isinstance(y, (int, float)):
        return int(y)
    match = _POSITION.match(str(y))
    return int(match.group(1)) if match else None


def head_links(layer, head) -> list:
    """Links from the shown head to the other pages (the head travels in the session)."""
    if layer is None or head is None:
        return []
    return [dcc.Link(f"Intervene on L{layer}H{head}", href="/intervene"),
            dcc.Link("Head map", href="/heads")]


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        Output(ids.PATTERN_LAYER, "options"), Output(ids.PATTERN_LAYER, "value"),
        Output(ids.PATTERN_HEAD, "options"), Output(ids.PATTERN_HEAD, "value"),
        Output(ids.PATTERN_MESSAGE, "children"),
        Input(ids.PATTERN_INIT, "data"), Input(ids.SHARE_ADOPTED, "data"), State(ids.SESSION, "data"),
    )
    def init(_, _adopted, session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return [], None, [], None, error
        cap = analysis.capture
        layer, head = (session or {}).get("selected") or (cap.layers[0], cap.heads[0])
        return ([{"label": str(v), "value": v} for v in cap.layers], layer,
                [{"label": str(v), "value": v} for v in cap.heads], head, "")

    @app.callback(
        Output(ids.SESSION, "data", allow_duplicate=True), Output(ids.PATTERN_LINKS, "children"),
        Input(ids.PATTERN_LAYER, "value"), Input(ids.PATTERN_HEAD, "value"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def remember(layer, head, session):
        if layer is None or head is None or (session or {}).get("selected") == [layer, head]:
            return no_update, head_links(layer, head)
        return dict(session or ws.session_defaults(), selected=[int(layer), int(head)]), head_links(layer, head)

    @app.callback(
        Output(ids.PATTERN_REGION, "data"),
        Input(ids.PATTERN_GRAPH, "relayoutData"),
        State(ids.PATTERN_VIEW, "data"), State(ids.PATTERN_LAYER, "value"), State(ids.PATTERN_HEAD, "value"),
        State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def zoom(relayout, view, layer, head, session):
        """A zoom or reset of the map becomes a region request; anything else (autosize) is ignored."""
        analysis, _ = safe(get_analysis, ws, session)
        if analysis is None:
            return no_update
        region = patterns.region_from_relayout(view, relayout, analysis.n_tokens)
        if region is None or (view and list(region) == [view["q0"], view["q1"], view["k0"], view["k1"]]):
            return no_update
        return {"layer": layer, "head": head, "region": list(region)}

    @app.callback(
        Output(ids.PATTERN_QUERY, "value"), Output(ids.PATTERN_QUERY_ERROR, "children"),
        Input(ids.PATTERN_GRAPH, "clickData"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def click_row(click, session):
        query = clicked_query(click)
        return (no_update, no_update) if query is None else (str(query), "")

    @app.callback(
        Output(ids.PATTERN_GRAPH, "figure"), Output(ids.PATTERN_VIEW, "data"), Output(ids.PATTERN_INFO, "children"),
        Output(ids.PATTERN_MESSAGE, "children", allow_duplicate=True),
        Input(ids.PATTERN_LAYER, "value"), Input(ids.PATTERN_HEAD, "value"), Input(ids.PATTERN_REGION, "data"),
        Input(ids.PATTERN_OPTIONS, "value"), Input(ids.PATTERN_QUERY, "value"),
        State(ids.PATTERN_VIEW, "data"), State(ids.SESSION, "data"),
        prevent_initial_call="initial_duplicate",
    )
    def show(layer, head, zoomed, options, query_text, view, session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return placeholder_figure(error), None, "", error
        region = None
        if zoomed and zoomed.get("layer") == layer and zoomed.get("head") == head:
            region = tuple(zoomed["region"])
        elif view and ctx.triggered_id in (ids.PATTERN_OPTIONS, ids.PATTERN_QUERY) and \
                view.get("layer") == layer and view.get("head") == head:
            region = (view["q0"], view["q1"], view["k0"], view["k1"])  # keep the zoom when only options change
        query, _ = safe(parse_int, query_text, "query token", 0, analysis.n_tokens - 1, analysis.n_tokens - 1)
        options = options or []
        result, error = safe(patterns.pattern_view, analysis, layer, head, region, log="log" in options,
                             hide_bos="hide_bos" in options, query=query)
        if result is None:
            return placeholder_figure(error), None, "", error
        fig, new_view, info = result
        return fig, dict(new_view, layer=layer, head=head), info, ""

    @app.callback(
        Output(ids.PATTERN_ROW_RANGE, "data"),
        Input(ids.PATTERN_ROW, "relayoutData"), State(ids.PATTERN_QUERY, "value"), State(ids.SESSION, "data"),
        prevent_initial_call=True,
    )
    def zoom_row(relayout, query_text, session):
        analysis, _ = safe(get_analysis, ws, session)
        if analysis is None:
            return no_update
        rng = patterns.row_range_from_relayout(relayout, analysis.n_tokens)
        if rng is None:
            return no_update
        return {"query": query_text, "range": None if rng is False else list(rng)}

    @app.callback(
        Output(ids.PATTERN_ROW, "figure"), Output(ids.PATTERN_TOPK, "children"),
        Output(ids.PATTERN_QUERY_ERROR, "children", allow_duplicate=True),
        Input(ids.PATTERN_QUERY, "value"), Input(ids.PATTERN_LAYER, "value"), Input(ids.PATTERN_HEAD, "value"),
        Input(ids.PATTERN_OPTIONS, "value"), Input(ids.PATTERN_ROW_RANGE, "data"),
        State(ids.SESSION, "data"),
        prevent_initial_call="initial_duplicate",
    )
    def row(query_text, layer, head, options, row_range, session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return placeholder_figure(error, 300), None, ""
        n = analysis.n_tokens
        query, error = safe(parse_int, query_text, "query token", 0, n - 1, n - 1)
        if error:
            return placeholder_figure(error, 300), None, error
        k_range = None
        if ctx.triggered_id == ids.PATTERN_ROW_RANGE and row_range and row_range.get("query") == query_text:
            k_range = row_range.get("range")
        options = options or []
        fig, error = safe(patterns.row_view, analysis, layer, head, query, k_range, log="log" in options,
                          hide_bos="hide_bos" in options)
        if fig is None:
            return placeholder_figure(error, 300), None, ""
        top, _ = safe(patterns.top_keys, analysis, layer, head, query, patterns.ROW_TOPK)
        frame = pd.DataFrame(top or [], columns=["key", "token", "weight"])
        frame["token"] = frame["token"].map(repr)
        return fig, table(frame, {"weight": ".4f"}), ""
