"""Page 5 — Intervene: ablate / reinforce / SoftPAG heads; compare outputs and head scores."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, job_panel, message, number_input, page_title
from app.web.services.intervene import ALPHA_RANGE, KINDS

dash.register_page(__name__, path="/intervene", name="Intervene", order=4, title="Intervene")

layout = html.Div([
    page_title("Intervene", "Build a list of head interventions (kept in this browser session only), then "
                            "compare the model before and after on the current prompt."),
    dcc.Store(id=ids.INTERVENE_INIT, data=0),
    dcc.Store(id=ids.INTERVENE_RESULT, storage_type="session"),
    dcc.Store(id=ids.INTERVENE_FOLLOWUP, storage_type="session"),
    html.Div([
        field("Layer", dcc.Dropdown(id=ids.INTERVENE_LAYER, clearable=False)),
        field("Head", dcc.Dropdown(id=ids.INTERVENE_HEAD, clearable=False)),
        field("Intervention", dcc.Dropdown(id=ids.INTERVENE_KIND, value="zero", clearable=False,
                                           options=[{"label": f"{k} — {v}", "value": k} for k, v in KINDS.items()])),
    ], className="row align-end"),
    html.Div([
        html.Div(field(f"α (reinforce > 1, dampen < 1; {ALPHA_RANGE[0]:g}–{ALPHA_RANGE[1]:g})",
                       number_input(ids.INTERVENE_ALPHA, 2), error_id=ids.INTERVENE_ALPHA_ERROR),
                 id=ids.INTERVENE_ALPHA_BOX, style={"display": "none"}),
        html.Div(field("u (SoftPAG, 0–1)", number_input(ids.INTERVENE_U, 0.5), error_id=ids.INTERVENE_U_ERROR),
                 id=ids.INTERVENE_U_BOX, style={"display": "none"}),
        html.Button("Add to list", id=ids.INTERVENE_ADD, n_clicks=0, className="button secondary"),
        html.Button("Clear list", id=ids.INTERVENE_CLEAR, n_clicks=0, className="button secondary"),
    ], className="row align-end"),
    html.Div(id=ids.INTERVENE_LIST, className="intervention-list"),
    html.Div([
        field("Target token (optional)", dcc.Input(id=ids.INTERVENE_TARGET_TEXT, type="text", placeholder="' Paris'"),
              hint="one token, with its leading space; its logit and probability are compared"),
        field("Distractor (optional)", dcc.Input(id=ids.INTERVENE_DISTRACTOR, type="text", placeholder="' Rome'"),
              hint="gives the logit difference target − distractor"),
    ], className="row align-end"),
    html.Div([html.Button("Compare before / after", id=ids.INTERVENE_RUN, n_clicks=0, className="button primary"),
              job_panel(ids.INTERVENE_JOB)], className="row align-center"),
    message(ids.INTERVENE_MESSAGE),
    html.Div(id=ids.INTERVENE_STALE),
    html.Div([
        html.Div([html.H4("Next-token top-k"), html.Div(id=ids.INTERVENE_TOPK),
                  html.H4("Target token"), html.Div(id=ids.INTERVENE_TARGET)], className="col"),
        html.Div([html.H4("Loss on the prompt"), html.Div(id=ids.INTERVENE_LOSS),
                  html.H4("Greedy continuation"), html.Div(id=ids.INTERVENE_CONTINUATION)], className="col"),
    ], className="row align-start"),
    html.H4("How the heads' scores moved"),
    field("Metric", dcc.Dropdown(id=ids.INTERVENE_METRIC, clearable=False)),
    dcc.Graph(id=ids.INTERVENE_DELTA, config={"displaylogo": False}),
])
