"""The head card's layout (shown where a head is selected; filled by :mod:`app.web.callbacks.head_card`)."""

from __future__ import annotations

import pandas as pd
from dash import dcc, html

from app.web import ids
from app.web.components import field, table


def head_card() -> html.Div:
    """The empty card: a target-token field and the body the callback fills."""
    return html.Div([
        html.H4("Head card"),
        field("Target token (optional)", dcc.Input(id=ids.HEADCARD_TARGET, type="text", debounce=True,
                                                   placeholder="e.g.  Mary", className="text-input"),
              hint="the head's direct contribution to this token's logit at the last prompt token"),
        dcc.Loading(html.Div(id=ids.HEADCARD_BODY, className="headcard-body")),
    ], id=ids.HEADCARD, className="headcard")


def _tokens(frame: pd.DataFrame) -> html.Table:
    shown = frame.assign(token=frame["token"].map(repr))
    return table(shown, {"value": ".3f"})


def card_body(card, thumbnail) -> list:
    """Children of the card body for a :class:`app.web.services.head_card.HeadCard`."""
    name = f"L{card.layer}H{card.head}"
    lines = [html.Li(f"top prediction {card.top_token!r}: this head adds {card.top_value:+.3f} to its logit")]
    if card.target_token is not None:
        lines.append(html.Li(f"target {card.target_token!r}: this head adds {card.target_value:+.3f} to its logit "
                             f"(rank {card.target_rank} of all heads)"))
    partner_links = [html.Li([dcc.Link(f"L{r.layer}H{r.head}", href=f"/heads?head=L{r.layer}H{r.head}"),
                              f" — {r.kind.upper()}-composition {r.score:.3f} ({'writes into' if r.role == 'writer' else 'reads from'} "
                              f"{name})"]) for r in card.partners.itertuples()]
    scores = card.scores
    return [
        html.H5(name),
        html.Div([
            html.Div(dcc.Graph(figure=thumbnail, config={"displayModeBar": False}), className="headcard-thumb")
            if thumbnail is not None else html.Div("no pattern for this head", className="note"),
            html.Div([html.Ul(lines), html.H6("Promotes (direct effect on the next-token logits)"),
                      _tokens(card.promoted), html.H6("Suppresses"), _tokens(card.suppressed)]),
            html.Div([html.H6("Strongest composition partners"), html.Ul(partner_links),
                      html.H6("Scores"),
                      table(scores, {"value": ".4g", "ci_low": ".4g", "ci_high": ".4g"}) if len(scores)
                      else html.Div("no scores yet", className="note")]),
        ], className="row headcard-grid"),
    ]
