"""Page 7 — Long context: needle samples at a chosen length, every head placed by streaming mass
and retrieval score; click a head for its map thumbnail and the rows that predict the answer."""

import dash
from dash import dcc, html

from app.web import ids
from app.web.components import field, job_panel, message, page_title
from app.web.services.long_context import DEPTHS, LENGTHS

dash.register_page(__name__, path="/long-context", name="Long context", order=6, title="Long context")

layout = html.Div([
    page_title("Long context", "Which heads retrieve from far away, which only need a sink and a local window "
                               "(docs/metrics.md §10). Stats mode: no attention map is stored."),
    dcc.Store(id=ids.LC_RESULT, storage_type="session"),
    dcc.Store(id=ids.LC_HEAD),
    html.Div([
        field("Length (tokens)", dcc.Dropdown(id=ids.LC_LENGTH, value=1024, clearable=False,
                                              options=[{"label": str(n), "value": n} for n in LENGTHS])),
        field("Needle depths", dcc.Checklist(id=ids.LC_DEPTHS, value=list(DEPTHS), inline=True,
                                             options=[{"label": f"{d:.0%}", "value": d} for d in DEPTHS])),
        html.Button("Run", id=ids.LC_RUN, n_clicks=0, className="button primary"),
        job_panel(ids.LC_JOB),
    ], className="row align-end"),
    message(ids.LC_MESSAGE),
    dcc.Graph(id=ids.LC_GRAPH, config={"displaylogo": False}),
    field("Needle sample", dcc.Dropdown(id=ids.LC_SAMPLE, clearable=False, placeholder="run first")),
    html.Div([
        dcc.Graph(id=ids.LC_THUMB, config={"displaylogo": False}),
        dcc.Graph(id=ids.LC_ROW, config={"displaylogo": False}),
    ]),
])
