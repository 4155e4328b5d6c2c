"""The shareable address: the session is mirrored into ``?prompt=&head=&metric=`` and read back from it.

Reading (:func:`app.web.services.share_url.restore`) runs whenever the ``URL`` Location's
``search`` changes: a fresh tab, a reload, a link inside the app (``/heads?head=L0H1``), Back.
Writing is clientside with ``history.replaceState`` (no navigation, so neither the Pages router
nor any page re-renders), and only once the current query has been read (``SHARE_READ``), so a
pasted link is never overwritten by the tab's old state before it is applied. The new query is
also set on the Location's ``search`` prop with ``set_props`` (not an Output: that would close a
callback cycle, which Dash does not follow); it already matches the address bar, so the Location
pushes nothing, and its echo through the reader changes nothing.
"""

from __future__ import annotations

import json

from dash import Dash, Input, Output, State, no_update

from app.web import ids
from app.web.services import safe
from app.web.services.share_url import restore
from app.web.services.workspace import Workspace

WRITE_ADDRESS = """
function (session, pathname, read, search) {
    if (search === undefined || search === null || read !== search) { return; }  // not read back yet
    if (!session || !session.analysis) { return; }
    const params = new URLSearchParams({prompt: session.analysis});
    const head = session.selected;
    if (Array.isArray(head) && head.length === 2) { params.set("head", "L" + head[0] + "H" + head[1]); }
    if (session.metric) { params.set("metric", session.metric); }
    const query = "?" + params.toString();
    const here = window.location;
    if (here.search !== query) {
        window.history.replaceState(window.history.state, "", here.pathname + query + here.hash);
    }
    if (search !== query) { window.dash_clientside.set_props(URL_ID, {search: query}); }
}
"""

KEPT = ("analysis", "selected")  # a message about a link goes once either of these changes


def register(app: Dash, ws: Workspace) -> None:
    app.clientside_callback(
        WRITE_ADDRESS.replace("URL_ID", json.dumps(ids.URL)),
        Input(ids.SESSION, "data"), Input(ids.URL, "pathname"), Input(ids.SHARE_READ, "data"),
        State(ids.URL, "search"),
    )

    @app.callback(
        Output(ids.SESSION, "data", allow_duplicate=True), Output(ids.SHARE_MESSAGE, "children"),
        Output(ids.SHARE_NOTE, "data"), Output(ids.SHARE_ADOPTED, "data"), Output(ids.SHARE_READ, "data"),
        Input(ids.URL, "search"), State(ids.SESSION, "data"), State(ids.SHARE_ADOPTED, "data"),
        prevent_initial_call=True,
    )
    def read(search, session, adopted):
        """Apply the address to the session; always records ``search`` as read (the writer waits for it)."""
        restored, error = safe(restore, ws, session, search)
        if restored is None:
            return no_update, error, {"session": session}, no_update, search
        if not restored.changed and not restored.problems:
            return no_update, no_update, no_update, no_update, search
        return (restored.session if restored.changed else no_update, "; ".join(restored.problems),
                {"session": restored.session}, (adopted or 0) + 1 if restored.adopted else no_update, search)

    @app.callback(
        Output(ids.SHARE_MESSAGE, "children", allow_duplicate=True),
        Input(ids.SESSION, "data"), State(ids.SHARE_NOTE, "data"),
        prevent_initial_call=True,
    )
    def forget(session, note):
        """The link's message goes once the session has moved on (another prompt or head)."""
        about = (note or {}).get("session")
        if about is None or all((session or {}).get(k) == about.get(k) for k in KEPT):
            return no_update
        return ""
