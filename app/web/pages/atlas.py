"""Page 4 — Head atlas: heads embedded by their statistics profile over a dataset."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, job_panel, message, number_input, page_title
from app.web.services.analysis import dataset_options
from app.web.services.atlas import METHODS, MAX_SAMPLES

dash.register_page(__name__, path="/atlas", name="Head atlas", order=3, title="Head atlas")

layout = html.Div([
    page_title("Head atlas", "Each point is a head, placed by its pattern statistics and detector scores over a "
                             "dataset; click one to open its pattern."),
    dcc.Store(id=ids.ATLAS_RESULT, storage_type="session"),
    html.Div([
        field("Dataset", dcc.Dropdown(id=ids.ATLAS_DATASET, options=dataset_options(), value="induction",
                                      clearable=False)),
        field(f"Samples (1–{MAX_SAMPLES})", number_input(ids.ATLAS_N, 8), error_id=ids.ATLAS_N_ERROR),
        field("Embedding", dcc.Dropdown(id=ids.ATLAS_METHOD, clearable=False, value="umap",
                                        options=[{"label": v, "value": k} for k, v in METHODS.items()])),
        html.Button("Embed heads", id=ids.ATLAS_RUN, n_clicks=0, className="button primary"),
        job_panel(ids.ATLAS_JOB),
    ], className="row align-end"),
    html.Div([
        field("Colour by", dcc.RadioItems(id=ids.ATLAS_COLOR, value="class", inline=True,
                                          options=[{"label": "detector class", "value": "class"},
                                                   {"label": "layer", "value": "layer"}])),
        field("Class threshold", dcc.Slider(id=ids.ATLAS_THRESHOLD, min=0.0, max=1.0, step=0.05, value=0.3,
                                            marks={0: "0", 0.5: "0.5", 1: "1"})),
    ], className="row align-end"),
    message(ids.ATLAS_MESSAGE),
    dcc.Graph(id=ids.ATLAS_GRAPH, config={"displaylogo": False}),
])
