"""Head card callbacks: fill the card for the session's selected head.

``?head=LxHy`` in the address selects a head: :mod:`app.web.callbacks.share_url` reads it."""

from __future__ import annotations

from dash import Dash, Input, Output, html

from app.web import ids
from app.web.components_head_card import card_body
from app.web.services import safe
from app.web.services.analysis import get_analysis
from app.web.services.head_card import head_card, thumbnail
from app.web.services.workspace import Workspace


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        Output(ids.HEADCARD_BODY, "children"),
        Input(ids.SESSION, "data"), Input(ids.HEADCARD_TARGET, "value"),
    )
    def fill(session, target):
        selected = (session or {}).get("selected")
        if not selected:
            return html.Div("select a head to see what it writes", className="note")
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return html.Div(error or "run a prompt first", className="message")
        layer, head = selected
        card, error = safe(head_card, analysis, layer, head, target)
        if card is None:
            return html.Div(error, className="message", role="status")
        thumb, _ = safe(thumbnail, analysis, layer, head)
        return card_body(card, thumb)
