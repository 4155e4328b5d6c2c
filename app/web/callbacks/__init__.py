"""Callbacks, one module per page plus the shared shell and job panels.

Each module has ``register(app, ws)``; :func:`register_all` wires them onto an app made by
:func:`app.web.factory.create_app` (nothing is registered globally, so several apps can
live in one process, e.g. in tests).
"""

from __future__ import annotations

from dash import Dash

from app.web.services.workspace import Workspace


def register_all(app: Dash, ws: Workspace) -> None:
    from app.web.callbacks import atlas, heads, intervene, jobs, long_context, pattern, prompt, runs, shell

    for module in (jobs, shell, prompt, heads, pattern, atlas, intervene, runs, long_context):
        module.register(app, ws)
    from app.web.callbacks import head_card, patching, share_url

    for module in (head_card, patching, share_url):
        module.register(app, ws)
