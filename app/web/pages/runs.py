"""Page 6 — Runs: open batch run folders (``workbench analyze``) under the runs root, browse, compare two."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, message, page_title

dash.register_page(__name__, path="/runs", name="Runs", order=5, title="Runs")

layout = html.Div([
    page_title("Runs", "Open a run written by 'workbench analyze' under the runs root; pick a second one to compare."),
    dcc.Store(id=ids.RUNS_INIT, data=0),
    dcc.Store(id=ids.RUNS_STATE, storage_type="session"),
    html.Div(id=ids.RUNS_ROOT, className="hint"),
    html.Div([
        field("Run", dcc.Dropdown(id=ids.RUNS_PICK, placeholder="pick a run")),
        field("…or its name under the runs root", dcc.Input(id=ids.RUNS_PATH, type="text",
                                                             placeholder="smollm2-135m-induction")),
    ], className="row align-end"),
    html.Div([
        field("Compare with (optional)", dcc.Dropdown(id=ids.RUNS_COMPARE_PICK, placeholder="pick a run")),
        field("…or its name", dcc.Input(id=ids.RUNS_COMPARE_PATH, type="text", placeholder="second run")),
        html.Button("Open", id=ids.RUNS_OPEN, n_clicks=0, className="button primary"),
    ], className="row align-end"),
    message(ids.RUNS_MESSAGE),
    dcc.Loading(html.Div([
        html.Div(id=ids.RUNS_WARNING),
        field("Metric", dcc.Dropdown(id=ids.RUNS_METRIC, clearable=False)),
        html.Div(id=ids.RUNS_MANIFEST, className="manifest row align-start"),
        dcc.Graph(id=ids.RUNS_GRAPH, config={"displaylogo": False}),
        dcc.Graph(id=ids.RUNS_DELTA, config={"displaylogo": False}),
        html.H4("Heads, highest value first"),
        html.Div(id=ids.RUNS_TABLE),
    ]), type="default"),
])
