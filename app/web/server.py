"""``workbench app``: serve the Dash app (127.0.0.1 unless a host is given deliberately)."""

from __future__ import annotations

import logging

from app.web.factory import create_app
from workbench.registry import DEFAULT_MODEL


def serve(model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8050, debug: bool = False) -> None:
    """Start the app's development server (threaded; blocks until interrupted).

    The model is loaded by the first job that needs it, once per process; jobs run in the
    app's thread pool, so a long capture never blocks other requests.
    """
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING)
    app = create_app(model_name=model)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("serving on %s: the app is reachable from other machines", host)
    print(f"workbench app: http://{host}:{port}/  (default model: {model}; Ctrl+C to stop)")
    try:
        app.run(host=host, port=port, debug=debug, use_reloader=False)
    finally:
        app.workspace.jobs.shutdown()
