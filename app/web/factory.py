"""The app factory: ``create_app(model_name=...)`` builds a Dash Pages app around a workspace.

Nothing is loaded at import time: the model is loaded lazily by the first job that needs it
(:func:`workbench.model.load_model` keeps it once per process). All assets are served locally
(Dash's own bundles plus ``app/web/assets``); no CDN and no external stylesheet.
"""

from __future__ import annotations

from pathlib import Path

import dash
from dash import Dash, dcc, html

from app.web import ids
from app.web.callbacks import register_all
from app.web.services.workspace import Limits, Workspace
from workbench.registry import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent


def shell(ws: Workspace) -> html.Div:
    """The layout around every page: header with navigation, per-session stores, the page."""
    pages = sorted(dash.page_registry.values(), key=lambda p: p.get("order") or 0)
    return html.Div([
        dcc.Location(id=ids.URL, refresh="callback-nav"),
        dcc.Store(id=ids.SESSION, storage_type="session", data=ws.session_defaults()),
        dcc.Store(id=ids.INTERVENTIONS, storage_type="session", data=[]),
        dcc.Store(id=ids.SHARE_NOTE, data=None),
        dcc.Store(id=ids.SHARE_ADOPTED, data=0),
        dcc.Store(id=ids.SHARE_READ, data=None),
        html.Header([
            html.Div([html.Span("Attention workbench", className="brand"),
                      html.Span(id=ids.SESSION_BADGE, className="badge")], className="header-top"),
            html.Nav([dcc.Link(p["name"], href=p["relative_path"], className="nav-link") for p in pages],
                     id=ids.NAV, className="nav"),
        ]),
        html.Main([html.Div(id=ids.SHARE_MESSAGE, className="message", role="status", style={"minHeight": 0}),
                   dash.page_container], className="content"),
    ], className="app")


def create_app(model_name: str = DEFAULT_MODEL, *, runs_dir: str | Path = "runs",
               limits: Limits | None = None, max_workers: int = 2) -> Dash:
    """Build the app.

    Args:
        model_name: the default model of new browser sessions (registry name or local folder);
            it is not loaded until a job needs it.
        runs_dir: folder searched for run folders on the Runs page.
        limits: token limits (patterns / stats mode); defaults 512 / 8192.
        max_workers: background job threads.
    Returns:
        the Dash app; ``app.workspace`` is its :class:`Workspace` (jobs, caches).
    """
    from app.web.jobs import JobManager

    ws = Workspace(default_model=model_name, runs_dir=Path(runs_dir), limits=limits or Limits(),
                   jobs=JobManager(max_workers=max_workers))
    app = Dash(
        "app.web", use_pages=True, pages_folder=str(HERE / "pages"), assets_folder=str(HERE / "assets"),
        serve_locally=True, suppress_callback_exceptions=True, title="Attention workbench",
        update_title=None,
    )
    app.layout = lambda: shell(ws)
    register_all(app, ws)
    app.workspace = ws
    return app
