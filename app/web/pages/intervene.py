"""Page 5 — Intervene: ablate / reinforce / SoftPAG heads; compare outputs and head scores."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, job_panel, message, page_title
from app.web.services.intervene import KINDS

dash.register_page(__name__, path="/intervene", name="Intervene", order=4, title="Intervene")

layout = html.Div([
    page_title("Intervene", "Build a list of head interventions (kept in this browser session only), then "
                            "compare the model before and after on the current prompt."),
    dcc.Store(id=ids.INTERVENE_INIT, data=0),
    dcc.Store(id=ids.INTERVENE_RESULT, storage_type="session"),
    html.Div([
        field("Layer", dcc.Dropdown(id=ids.INTERVENE_LAYER, clearable=False)),
        field("Head", dcc.Dropdown(id=ids.INTERVENE_HEAD, clearable=False)),
        field("Intervention", dcc.Dropdown(id=ids.INTERVENE_KIND, value="zero", clearable=False,
                                           options=[{"label": f"{k} — {v}", "value": k} for k, v in KINDS.items()])),
    ], className="row align-end"),
    html.Div([
        field("α (reinforce > 1, dampen < 1)", dcc.Slider(id=ids.INTERVENE_ALPHA, min=0, max=5, step=0.1, value=2,
                                                          marks={0: "0", 1: "1", 2: "2", 5: "5"})),
        field("u (SoftPAG)", dcc.Slider(id=ids.INTERVENE_U, min=0, max=1, step=0.05, value=0.5,
                                        marks={0: "0", 0.5: "0.5", 1: "1"})),
        html.Button("Add to list", id=ids.INTERVENE_ADD, n_clicks=0, className="button secondary"),
        html.Button("Clear list", id=ids.INTERVENE_CLEAR, n_clicks=0, className="button secondary"),
    ], className="row align-end"),
    html.Div(id=ids.INTERVENE_LIST, className="intervention-list"),
    html.Div([html.Button("Compare before / after", id=ids.INTERVENE_RUN, n_clicks=0, className="button primary"),
              job_panel(ids.INTERVENE_JOB)], className="row align-center"),
    message(ids.INTERVENE_MESSAGE),
    html.Div([
        html.Div([html.H4("Next-token top-k"), html.Div(id=ids.INTERVENE_TOPK)], className="col"),
        html.Div([html.H4("Loss on the prompt"), html.Div(id=ids.INTERVENE_LOSS),
                  html.H4("Greedy continuation"), html.Div(id=ids.INTERVENE_CONTINUATION)], className="col"),
    ], className="row align-start"),
    html.H4("How the heads' scores moved"),
    field("Metric", dcc.Dropdown(id=ids.INTERVENE_METRIC, clearable=False)),
    dcc.Graph(id=ids.INTERVENE_DELTA, config={"displaylogo": False}),
])
