"""``workbench app``: serve the Dash app (127.0.0.1 unless a host is given deliberately)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from app.web.factory import create_app
from workbench.registry import DEFAULT_MODEL


DEBUG_WARNING = ("WARNING: --debug serves Werkzeug's interactive debugger: anyone who can open the app and "
                 "trigger an error can run Python code as you. Use it only on a machine you alone can reach.")


def serve(model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8050, debug: bool = False, *,
          models_root: str | Path | None = None, allow_any_model: bool = False, runs_dir: str | Path = "runs",
          data_dir: str | Path | None = None) -> None:
    """Start the app's development server (threaded; blocks until interrupted).

    The model is loaded by the first job that needs it, once per process; jobs run in the
    app's thread pool, so a long capture never blocks other requests. Clients may load registry
    models, ``model`` and folders under ``models_root``; anything else only with ``allow_any_model``.
    They open run folders only under ``runs_dir``, and datasets only by bundled name or as
    ``.txt``/``.jsonl`` files under ``data_dir``.
    """
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING)
    app = create_app(model_name=model, runs_dir=Path(runs_dir).expanduser())
    app.workspace.data_dir = Path(data_dir).expanduser() if data_dir else None
    app.workspace.models_root = Path(models_root).expanduser() if models_root else None
    app.workspace.allow_any_model = allow_any_model
    if debug:
        print(DEBUG_WARNING, file=sys.stderr)
        logging.getLogger(__name__).warning(DEBUG_WARNING)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger(__name__).warning("serving on %s: the app is reachable from other machines", host)
    print(f"workbench app: http://{host}:{port}/  (default model: {model}; Ctrl+C to stop)")
    try:
        app.run(host=host, port=port, debug=debug, use_reloader=False)
    finally:
        app.workspace.jobs.shutdown()
