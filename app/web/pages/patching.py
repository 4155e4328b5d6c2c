"""Page — Activation patching: clean vs corrupted prompt, recovery per head and per layer × position."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, job_panel, message, page_title

dash.register_page(__name__, path="/patching", name="Patching", order=8, title="Patching")

layout = html.Div([
    page_title("Activation patching", "Run the corrupted prompt with one activation taken from the clean prompt; "
                                      "1 = that activation restores the clean behaviour, 0 = no effect "
                                      "(docs/metrics.md §11). Click a head cell to open that head."),
    dcc.Store(id=ids.PATCH_RESULT, storage_type="session"),
    html.Div([
        field("Clean prompt", dcc.Textarea(id=ids.PATCH_CLEAN, className="prompt-box", rows=2)),
        field("Corrupted prompt (same number of tokens)", dcc.Textarea(id=ids.PATCH_CORRUPT, className="prompt-box",
                                                                       rows=2)),
    ], className="row"),
    html.Div([
        field("Answer", dcc.Input(id=ids.PATCH_ANSWER, type="text", className="text-input")),
        field("Distractor", dcc.Input(id=ids.PATCH_DISTRACTOR, type="text", className="text-input")),
        field("Metric", dcc.Dropdown(id=ids.PATCH_METRIC, value="logit_diff", clearable=False, options=[
            {"label": "logit(answer) − logit(distractor)", "value": "logit_diff"},
            {"label": "log p(answer)", "value": "logprob"}])),
        html.Button("IOI example", id=ids.PATCH_EXAMPLE, n_clicks=0, className="button secondary"),
        html.Button("Patch", id=ids.PATCH_RUN, n_clicks=0, className="button primary"),
        job_panel(ids.PATCH_JOB),
    ], className="row align-end"),
    message(ids.PATCH_MESSAGE),
    html.Div(id=ids.PATCH_SUMMARY, className="summary"),
    dcc.Graph(id=ids.PATCH_HEADS_GRAPH, config={"displaylogo": False}),
    dcc.Graph(id=ids.PATCH_RESID_GRAPH, config={"displaylogo": False}),
])
