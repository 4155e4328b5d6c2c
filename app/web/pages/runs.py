"""Page 6 — Runs: open batch run folders (``workbench analyze``), browse, compare two."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, message, page_title

dash.register_page(__name__, path="/runs", name="Runs", order=5, title="Runs")

layout = html.Div([
    page_title("Runs", "Open a run folder written by 'workbench analyze'; give a second one to compare."),
    dcc.Store(id=ids.RUNS_INIT, data=0),
    dcc.Store(id=ids.RUNS_STATE, storage_type="session"),
    html.Div([
        field("Run folder", dcc.Input(id=ids.RUNS_PATH, type="text", placeholder="runs/smollm2-135m-induction")),
        field("found under runs/", dcc.Dropdown(id=ids.RUNS_PICK, placeholder="pick a run")),
    ], className="row align-end"),
    html.Div([
        field("Compare with (optional)", dcc.Input(id=ids.RUNS_COMPARE_PATH, type="text", placeholder="second run")),
        field("found under runs/", dcc.Dropdown(id=ids.RUNS_COMPARE_PICK, placeholder="pick a run")),
        html.Button("Open", id=ids.RUNS_OPEN, n_clicks=0, className="button primary"),
    ], className="row align-end"),
    message(ids.RUNS_MESSAGE),
    field("Metric", dcc.Dropdown(id=ids.RUNS_METRIC, clearable=False)),
    html.Div(id=ids.RUNS_MANIFEST, className="manifest"),
    dcc.Graph(id=ids.RUNS_GRAPH, config={"displaylogo": False}),
    dcc.Graph(id=ids.RUNS_DELTA, config={"displaylogo": False}),
    html.H4("Heads, highest value first"),
    html.Div(id=ids.RUNS_TABLE),
])
