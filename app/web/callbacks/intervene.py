"""Page 5 callbacks: the session's intervention list, the comparison jobs, their views.

Compare runs in two jobs on the page's panel: the fast half (top-k, loss, target logits) shows
first; its end starts the follow-up (continuations, head scores), which fills in after. Every
result is tagged with the prompt and list it was computed for, and is cleared (other prompt) or
marked (other list) when the session moves on.
"""

from __future__ import annotations

from dash import ALL, Dash, Input, Output, State, ctx, html, no_update

from app.web import ids
from app.web.callbacks.jobs import cancel_previous, not_started, start_outputs, started
from app.web.components import table
from app.web.services import placeholder_figure, safe
from app.web.services.analysis import get_analysis
from app.web.services.headmap import default_metric
from app.web.services.intervene import (add_item, delta_figure, delta_metric_options, describe_item, first_divergence,
                                        make_item, staleness, start_comparison, start_followup, target_table,
                                        topk_table, uses)
from app.web.services.workspace import Workspace

JOB = ids.INTERVENE_JOB
SHOWN, HIDDEN = {}, {"display": "none"}


def _fmt_loss(value: float | None, note: str | None) -> str:
    return f"{value:.4f}" if value is not None else f"n/a ({note})"


def continuation_view(label: str, side, other, pending: bool) -> html.Div:
    """One continuation, its tokens after the first divergence from ``other`` highlighted."""
    if side.pieces is None:
        text = "streaming in…" if pending else f"n/a ({side.notes.get('continuation', 'not computed')})"
        return html.Div([html.B(f"{label}: "), html.Span(text, className="hint")])
    split = None
    if other.continuation_ids is not None:
        split = first_divergence(side.continuation_ids, other.continuation_ids)
    if split is None:
        body = [html.Span("".join(side.pieces), className="continuation")]
    else:
        body = [html.Span("".join(side.pieces[:split]), className="continuation"),
                html.Span("".join(side.pieces[split:]), className="continuation divergence",
                          title=f"differs from token {split} of the continuation on")]
    return html.Div([html.B(f"{label}: "), *body])


def register(app: Dash, ws: Workspace) -> None:
    @app.callback(
        Output(ids.INTERVENE_LAYER, "options"), Output(ids.INTERVENE_LAYER, "value"),
        Output(ids.INTERVENE_HEAD, "options"), Output(ids.INTERVENE_HEAD, "value"),
        Output(ids.INTERVENE_MESSAGE, "children"),
        Input(ids.INTERVENE_INIT, "data"), Input(ids.SHARE_ADOPTED, "data"), State(ids.SESSION, "data"),
    )
    def init(_, _adopted, session):
        analysis, error = safe(get_analysis, ws, session)
        if analysis is None:
            return [], None, [], None, error
        cap = analysis.capture
        layer, head = (session or {}).get("selected") or (cap.layers[0], cap.heads[0])
        return ([{"label": str(v), "value": v} for v in cap.layers], layer,
                [{"label": str(v), "value": v} for v in cap.heads], head, "")

    @app.callback(
        Output(ids.INTERVENE_ALPHA_BOX, "style"), Output(ids.INTERVENE_U_BOX, "style"),
        Input(ids.INTERVENE_KIND, "value"),
    )
    def parameters(kind):
        used = uses(kind)
        return (SHOWN if "alpha" in used else HIDDEN), (SHOWN if "u" in used else HIDDEN)

    @app.callback(
        Output(ids.INTERVENTIONS, "data"), Output(ids.INTERVENE_MESSAGE, "children", allow_duplicate=True),
        Output(ids.INTERVENE_ALPHA_ERROR, "children"), Output(ids.INTERVENE_U_ERROR, "children"),
        Input(ids.INTERVENE_ADD, "n_clicks"),
        State(ids.INTERVENE_LAYER, "value"), State(ids.INTERVENE_HEAD, "value"), State(ids.INTERVENE_KIND, "value"),
        State(ids.INTERVENE_ALPHA, "value"), State(ids.INTERVENE_U, "value"), State(ids.INTERVENTIONS, "data"),
        prevent_initial_call=True,
    )
    def add(n_clicks, layer, head, kind, alpha, u, items):
        if not n_clicks:
            return no_update, no_update, no_update, no_update
        item, error = safe(make_item, layer, head, kind, alpha, u)
        if error:  # the message goes beside the field it is about
            if error.startswith("α"):
                return no_update, "", error, ""
            if error.startswith("u "):
                return no_update, "", "", error
            return no_update, error, "", ""
        return add_item(items, item), "", "", ""

    @app.callback(
        Output(ids.INTERVENTIONS, "data", allow_duplicate=True),
        Input({"type": ids.INTERVENE_REMOVE, "index": ALL}, "n_clicks"), Input(ids.INTERVENE_CLEAR, "n_clicks"),
        State(ids.INTERVENTIONS, "data"),
        prevent_initial_call=True,
    )
    def remove(_removes, clear, items):
        trigger = ctx.triggered_id
        if trigger == ids.INTERVENE_CLEAR:
            return [] if clear else no_update
        if not isinstance(trigger, dict) or not ctx.triggered or not ctx.triggered[0]["value"]:
            return no_update  # buttons re-rendered with n_clicks=0
        index = trigger["index"]
        return [item for i, item in enumerate(items or []) if i != index]

    @app.callback(Output(ids.INTERVENE_LIST, "children"),
                  Input(ids.INTERVENTIONS, "data"), Input(ids.INTERVENE_INIT, "data"))
    def show_list(items, _init):
        """Drawn from the session store on every page load, so the list shown is the list applied."""
        if not items:
            return html.Span("no interventions yet: pick a head and press 'Add to list'", className="hint")
        return html.Ul([html.Li([describe_item(item), " ",
                                 html.Button("remove", id={"type": ids.INTERVENE_REMOVE, "index": i}, n_clicks=0,
                                             className="button small")])
                        for i, item in enumerate(items)])

    @app.callback(
        *start_outputs(JOB), Output(ids.INTERVENE_MESSAGE, "children", allow_duplicate=True),
        Input(ids.INTERVENE_RUN, "n_clicks"), State(ids.INTERVENTIONS, "data"), State(ids.SESSION, "data"),
        State(ids.INTERVENE_TARGET_TEXT, "value"), State(ids.INTERVENE_DISTRACTOR, "value"),
        State(JOB.store, "data"),
        prevent_initial_call=True,
    )
    def run(n_clicks, items, session, target, distractor, store):
        if not n_clicks:
            return *not_started(), no_update
        analysis, error = safe(get_analysis, ws, session)
        if not error:
            cancel_previous(ws, store)
            job_id, error = safe(start_comparison, ws, analysis, items, (session or {}).get("analysis"),
                                 target, distractor)
        if error:
            return *not_started(), error
        return *started(job_id), ""

    @app.callback(
        Output(ids.INTERVENE_RESULT, "data"), Output(ids.INTERVENE_FOLLOWUP, "data"), *start_outputs(JOB),
        Input(JOB.done, "data"),
        prevent_initial_call=True,
    )
    def finished(done):
        if not done or done.get("state") != "done":
            return no_update, no_update, *not_started()
        result, error = safe(ws.jobs.result, done["id"])
        if error:
            return no_update, no_update, *not_started()
        if result["kind"] == "followup":
            return no_update, result["key"], *not_started()
        job_id, _ = safe(start_followup, ws, result["key"])
        return result["key"], None, *(started(job_id) if job_id else not_started())

    @app.callback(
        Output(ids.INTERVENE_TOPK, "children"), Output(ids.INTERVENE_TARGET, "children"),
        Output(ids.INTERVENE_LOSS, "children"), Output(ids.INTERVENE_CONTINUATION, "children"),
        Output(ids.INTERVENE_METRIC, "options"), Output(ids.INTERVENE_METRIC, "value"),
        Output(ids.INTERVENE_DELTA, "figure"), Output(ids.INTERVENE_STALE, "children"),
        Output(ids.INTERVENE_MESSAGE, "children", allow_duplicate=True),
        Input(ids.INTERVENE_RESULT, "data"), Input(ids.INTERVENE_FOLLOWUP, "data"), Input(ids.INTERVENE_METRIC, "value"),
        Input(ids.SESSION, "data"), Input(ids.INTERVENTIONS, "data"),
        prevent_initial_call="initial_duplicate",
    )
    def show(key, _followup, metric, session, items):
        empty = placeholder_figure("press 'Compare before / after'")
        if not key:
            return None, None, None, None, [], None, empty, None, no_update
        comparison, error = safe(ws.comparisons.get, key)
        if comparison is None:
            return None, None, None, None, [], None, placeholder_figure(error), None, error
        stale = staleness(comparison, (session or {}).get("analysis"), items)
        if stale == "prompt":
            note = html.Div("The last comparison was computed for another prompt: press Compare to run it on "
                            "this one.", className="stale")
            return None, None, None, None, [], None, empty, note, no_update
        banner = None
        if stale == "list":
            banner = html.Div("The intervention list has changed since these results were computed (with: "
                              + ", ".join(describe_item(i) for i in comparison.items)
                              + "): press Compare to update them.", className="stale")
        before, after = comparison.before, comparison.after
        applied = html.Div("with: " + ", ".join(describe_item(i) for i in comparison.items), className="hint")
        topk = [applied, table(topk_table(comparison), {"p_before": ".4g", "p_after": ".4g"})] \
            if before.topk is not None else f"n/a ({before.notes.get('top-k')})"
        targets = target_table(comparison)
        target = table(targets, {"logit before": ".3f", "logit after": ".3f", "p before": ".4g", "p after": ".4g",
                                 "Δ logit": "+.3f"}) if targets is not None else \
            html.Span("give a target token (and a distractor) to follow its logit", className="hint")
        loss = html.Div([html.Div(f"before: {_fmt_loss(before.loss, before.notes.get('loss'))}"),
                         html.Div(f"after: {_fmt_loss(after.loss, after.notes.get('loss'))}")])
        pending = not comparison.complete
        continuation = html.Div([continuation_view("before", before, after, pending),
                                 continuation_view("after", after, before, pending)])
        options = delta_metric_options(comparison)
        metric = default_metric(options, metric)
        if pending:
            fig, error = placeholder_figure("the heads' scores under the interventions are streaming in…"), None
        else:
            fig, error = safe(delta_figure, comparison, metric)
        return (topk, target, loss, continuation, options, metric,
                fig if fig is not None else placeholder_figure(error or ""), banner, error or "")
