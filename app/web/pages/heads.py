"""Page 2 — Head map: a layer × head heatmap of any computed metric; click selects a head."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, job_panel, message, number_input, page_title
from app.web.components_head_card import head_card
from app.web.services.analysis import dataset_options
from app.web.services.headmap import DATASET_SAMPLES, MAX_DATASET_SAMPLES

dash.register_page(__name__, path="/heads", name="Head map", order=1, title="Head map")

layout = html.Div([
    page_title("Head map", "Every head of the current prompt; hover explains the number, click selects the head."),
    dcc.Store(id=ids.HEADMAP_REFRESH, data=0),
    html.Div([
        field("Metric", dcc.Dropdown(id=ids.HEADMAP_METRIC, clearable=False, placeholder="run a prompt first")),
        field("Compute a probe", dcc.Dropdown(id=ids.HEADMAP_PROBE, clearable=False,
                                              placeholder="registered probes")),
        field("on", dcc.Dropdown(id=ids.HEADMAP_SOURCE, value="", clearable=False,
                                 options=[{"label": "this prompt", "value": ""}] + dataset_options())),
        field(f"samples (1–{MAX_DATASET_SAMPLES})", number_input(ids.HEADMAP_SOURCE_N, DATASET_SAMPLES),
              error_id=ids.HEADMAP_SOURCE_N_ERROR),
        html.Button("Compute", id=ids.HEADMAP_COMPUTE, n_clicks=0, className="button secondary"),
        job_panel(ids.HEADMAP_JOB),
    ], className="row align-end"),
    message(ids.HEADMAP_MESSAGE),
    html.Div(id=ids.HEADMAP_HELP, className="help"),
    dcc.Graph(id=ids.HEADMAP_GRAPH, config={"displaylogo": False}),
    html.Div(id=ids.HEADMAP_SELECTED, className="summary"),
    html.Div(id=ids.HEADMAP_LINKS, className="links"),
    head_card(),
    html.H4("Registered probes"),
    html.Div(id=ids.HEADMAP_PROBE_LIST),
])
