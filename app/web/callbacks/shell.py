"""The shell: the session badge in the header."""

from __future__ import annotations

from dash import Dash, Input, Output

from app.web import ids
from app.web.services import safe
from app.web.services.analysis import get_analysis
from app.web.services.workspace import Workspace


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(Output(ids.SESSION_BADGE, "children"), Input(ids.SESSION, "data"))
    def badge(session):
        session = session or ws.session_defaults()
        analysis, _ = safe(get_analysis, ws, session)
        parts = [f"model: {session.get('model')}"]
        if analysis is not None:
            parts.append(f"prompt: {analysis.n_tokens} tokens ({analysis.mode} mode)")
        if session.get("selected"):
            layer, head = session["selected"]
            parts.append(f"head: L{layer}H{head}")
        return " · ".join(parts)
