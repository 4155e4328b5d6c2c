"""Page 6 callbacks: pick and open runs under the runs root, show one, compare two.

Only run folders under the workspace's runs root are opened (:func:`app.web.services.runs.resolve_run`);
a bad second run never hides the first one.
"""

from __future__ import annotations

from dash import Dash, Input, Output, State, html, no_update

from app.web import ids
from app.web.components import table
from app.web.services import placeholder_figure, safe
from app.web.services.headmap import default_metric
from app.web.services.runs import (compare_figure, discover_runs, manifest_lines, open_run, run_differences,
                                   run_figure, run_metric_options, top_table)
from app.web.services.workspace import Workspace


def _manifest(title: str, run) -> html.Div:
    return html.Div([html.H4(title), html.Ul([html.Li(line) for line in manifest_lines(run)])], className="col")


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        Output(ids.RUNS_PICK, "options"), Output(ids.RUNS_COMPARE_PICK, "options"), Output(ids.RUNS_ROOT, "children"),
        Input(ids.RUNS_INIT, "data"),
    )
    def discover(_):
        options = discover_runs(ws.runs_dir)
        note = f"runs root: {ws.runs_dir} ({len(options)} runs; start the app with --runs-dir for another)"
        return options, options, note

    @app.callback(Output(ids.RUNS_PATH, "value"), Input(ids.RUNS_PICK, "value"), prevent_initial_call=True)
    def pick(value):
        return value or no_update

    @app.callback(Output(ids.RUNS_COMPARE_PATH, "value"), Input(ids.RUNS_COMPARE_PICK, "value"),
                  prevent_initial_call=True)
    def pick_other(value):
        return value or no_update

    @app.callback(
        Output(ids.RUNS_STATE, "data"), Output(ids.RUNS_MESSAGE, "children"),
        Input(ids.RUNS_OPEN, "n_clicks"), State(ids.RUNS_PATH, "value"), State(ids.RUNS_COMPARE_PATH, "value"),
        prevent_initial_call=True,
    )
    def open_folders(n_clicks, name, other):
        if not n_clicks:
            return no_update, no_update
        _, error = safe(open_run, ws.runs_dir, name)
        if error:
            return None, error
        state = {"a": name.strip(), "b": None, "b_error": None}
        if other and other.strip():
            _, other_error = safe(open_run, ws.runs_dir, other)
            if other_error:  # keep showing the first run; show() repeats the message (it rewrites the line)
                state["b_error"] = f"second run not opened: {other_error}"
                return state, state["b_error"]
            state["b"] = other.strip()
        return state, ""

    @app.callback(
        Output(ids.RUNS_METRIC, "options"), Output(ids.RUNS_METRIC, "value"), Output(ids.RUNS_MANIFEST, "children"),
        Output(ids.RUNS_GRAPH, "figure"), Output(ids.RUNS_DELTA, "figure"), Output(ids.RUNS_TABLE, "children"),
        Output(ids.RUNS_WARNING, "children"), Output(ids.RUNS_MESSAGE, "children", allow_duplicate=True),
        Input(ids.RUNS_STATE, "data"), Input(ids.RUNS_METRIC, "value"),
        prevent_initial_call="initial_duplicate",
    )
    def show(state, metric):
        if not state or not state.get("a"):
            empty = placeholder_figure("open a run", 240)
            return [], None, None, empty, empty, None, None, no_update
        run, error = safe(open_run, ws.runs_dir, state["a"])
        if run is None:
            return [], None, None, placeholder_figure(error), placeholder_figure(""), None, None, error
        other, other_error = (safe(open_run, ws.runs_dir, state["b"]) if state.get("b") else (None, None))
        options = run_metric_options(run)
        metric = default_metric(options, metric)
        fig, error = safe(run_figure, run, metric)
        manifests = [_manifest(f"Run: {run.path.name}", run)]
        rows, _ = safe(top_table, run, metric)
        shown = table(rows, {"value": ".4g", "ci_low": ".4g", "ci_high": ".4g"}) if rows is not None else None
        message = error or (f"second run not opened: {other_error}" if other_error else state.get("b_error") or "")
        warning = None
        if other is not None:
            manifests.append(_manifest(f"Compared with: {other.path.name}", other))
            differences = run_differences(run, other)
            if differences:
                warning = html.Div("These runs differ in " + "; ".join(differences)
                                   + ": their Δ mixes that change with the heads' own.", className="stale")
            delta, delta_error = safe(compare_figure, run, other, metric)
            if delta is None:
                delta, message = placeholder_figure(delta_error, 240), delta_error
        else:
            delta = placeholder_figure("pick a second run to compare", 240)
        return (options, metric, manifests, fig if fig is not None else placeholder_figure(error or ""), delta, shown,
                warning, message)
