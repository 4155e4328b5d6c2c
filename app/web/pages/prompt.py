"""Page 1 — Model & prompt: pick a model, type or load a prompt, run; the tokens as a strip."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, job_panel, message, number_input, page_title
from app.web.services.analysis import dataset_options, model_options

dash.register_page(__name__, path="/", name="Model & prompt", order=0, title="Model & prompt")

layout = html.Div([
    page_title("Model & prompt", "Choose a model, give a prompt, run: every head is captured and scored."),
    dcc.Store(id=ids.PROMPT_INIT, data=0),
    html.Div([
        field("Model", dcc.Dropdown(id=ids.PROMPT_MODEL, options=model_options(), clearable=False)),
        field("…or a local Hugging Face folder", dcc.Input(id=ids.PROMPT_FOLDER, type="text", debounce=True,
                                                           placeholder="/path/to/model (overrides the list)")),
    ], className="row"),
    html.Div([
        field("Dataset example", dcc.Dropdown(id=ids.PROMPT_DATASET, options=dataset_options(), value="factual",
                                              clearable=False)),
        field("Index", number_input(ids.PROMPT_EXAMPLE, 0), error_id=ids.PROMPT_EXAMPLE_ERROR),
        html.Button("Load example", id=ids.PROMPT_LOAD_EXAMPLE, n_clicks=0, className="button secondary"),
    ], className="row align-end"),
    field("Prompt", dcc.Textarea(id=ids.PROMPT_TEXT, placeholder="Type a prompt…", className="prompt-box"),
          hint="Up to 512 tokens: full patterns kept; up to 8192: stats mode (exact tiles recomputed on zoom)."),
    html.Div([html.Button("Run", id=ids.PROMPT_RUN, n_clicks=0, className="button primary"),
              job_panel(ids.PROMPT_JOB)], className="row align-center"),
    message(ids.PROMPT_MESSAGE),
    html.Div(id=ids.PROMPT_SUMMARY, className="summary"),
    html.Div(id=ids.PROMPT_TOKENS),
])
