"""Page 3 — Pattern viewer: the selected head's token × token map, zoomable, and one row."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, message, page_title

dash.register_page(__name__, path="/pattern", name="Pattern viewer", order=2, title="Pattern viewer")

layout = html.Div([
    page_title("Pattern viewer", "Drag to zoom (exact tiles are recomputed on the server), double-click to reset; "
                                 "click a row to see what that token attends to."),
    dcc.Store(id=ids.PATTERN_INIT, data=0),
    dcc.Store(id=ids.PATTERN_VIEW),
    html.Div([
        field("Layer", dcc.Dropdown(id=ids.PATTERN_LAYER, clearable=False)),
        field("Head", dcc.Dropdown(id=ids.PATTERN_HEAD, clearable=False)),
        field("Query token", dcc.Input(id=ids.PATTERN_QUERY, type="number", min=0, step=1)),
    ], className="row align-end"),
    message(ids.PATTERN_MESSAGE),
    html.Div(id=ids.PATTERN_INFO, className="help"),
    dcc.Graph(id=ids.PATTERN_GRAPH, config={"displaylogo": False}),
    dcc.Graph(id=ids.PATTERN_ROW, config={"displaylogo": False}),
])
