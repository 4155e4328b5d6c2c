"""Page 3 — Pattern viewer: the selected head's token × token map, zoomable, and one row."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, message, number_input, page_title
from app.web.components_head_card import head_card

dash.register_page(__name__, path="/pattern", name="Pattern viewer", order=2, title="Pattern viewer")

layout = html.Div([
    page_title("Pattern viewer", "Drag to zoom (exact tiles are recomputed on the server), double-click to reset; "
                                 "click a row to see what that token attends to."),
    dcc.Store(id=ids.PATTERN_INIT, data=0),
    dcc.Store(id=ids.PATTERN_VIEW),
    dcc.Store(id=ids.PATTERN_REGION),
    dcc.Store(id=ids.PATTERN_ROW_RANGE),
    html.Div([
        field("Layer", dcc.Dropdown(id=ids.PATTERN_LAYER, clearable=False)),
        field("Head", dcc.Dropdown(id=ids.PATTERN_HEAD, clearable=False)),
        field("Query token", number_input(ids.PATTERN_QUERY, placeholder="last token"),
              error_id=ids.PATTERN_QUERY_ERROR),
        field("View", dcc.Checklist(id=ids.PATTERN_OPTIONS, value=[], className="toggles", inline=True,
                                    options=[{"label": "log scale", "value": "log"},
                                             {"label": "hide BOS (key 0)", "value": "hide_bos"}])),
    ], className="row align-end"),
    html.Div(id=ids.PATTERN_LINKS, className="links"),
    message(ids.PATTERN_MESSAGE),
    html.Div(id=ids.PATTERN_INFO, className="help"),
    dcc.Graph(id=ids.PATTERN_GRAPH, config={"displaylogo": False}),
    dcc.Graph(id=ids.PATTERN_ROW, config={"displaylogo": False}),
    html.H4("Strongest keys of this row"),
    html.Div(id=ids.PATTERN_TOPK),
    head_card(),
])
