"""Small layout builders shared by the pages (no callbacks, no model)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from dash import dcc, html

from app.web.ids import JobIds

POLL_MS = 500


def page_title(title: str, subtitle: str) -> html.Div:
    return html.Div([html.H2(title), html.P(subtitle, className="subtitle")], className="page-title")


def message(component_id: str) -> html.Div:
    """Where a page shows errors and notes (``role=status`` so screen readers announce it)."""
    return html.Div(id=component_id, className="message", role="status")


def job_panel(ids: JobIds) -> html.Div:
    """Progress bar + status + Cancel for one page's background jobs (see :mod:`app.web.jobs`)."""
    return html.Div([
        dcc.Store(id=ids.store),
        dcc.Store(id=ids.done),
        dcc.Interval(id=ids.interval, interval=POLL_MS, disabled=True),
        html.Progress(id=ids.progress, value="0", max="1", className="job-progress"),
        html.Span("idle", id=ids.status, className="job-status"),
        html.Button("Cancel", id=ids.cancel, n_clicks=0, disabled=True, className="button secondary"),
    ], className="job-panel")


def field(label: str, control, hint: str | None = None, error_id: str | None = None) -> html.Div:
    """A labelled form control; ``error_id`` adds the place for its own error, beside it."""
    parts = [html.Label(label, className="field-label"), control]
    if hint:
        parts.append(html.Div(hint, className="hint"))
    if error_id:
        parts.append(html.Div(id=error_id, className="field-error", role="alert"))
    return html.Div(parts, className="field")


def ok(text: str) -> html.Span:
    """A success note for a page's message area (not in the error colour)."""
    return html.Span(text, className="ok")


def number_input(component_id: str, value=None, placeholder: str | None = None) -> dcc.Input:
    """A numeric field as plain text: the server parses it and names a bad value
    (a browser ``type=number`` field hands an out-of-range or fractional value over as empty)."""
    return dcc.Input(id=component_id, type="text", inputMode="decimal", value=None if value is None else str(value),
                     placeholder=placeholder, debounce=True, className="number-input")


def table(frame: pd.DataFrame, formats: dict[str, str] | None = None, max_rows: int = 200) -> html.Table:
    """A plain HTML table of ``frame`` (numbers formatted with ``formats[column]``)."""
    formats = formats or {}

    def cell(column: str, value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "–"
        fmt = formats.get(column)
        if fmt and isinstance(value, (int, float)):
            return format(value, fmt)
        return str(value)

    head = html.Thead(html.Tr([html.Th(c) for c in frame.columns]))
    body = html.Tbody([html.Tr([html.Td(cell(c, row[c])) for c in frame.columns])
                       for _, row in frame.head(max_rows).iterrows()])
    return html.Table([head, body], className="data-table")


def token_strip(pairs: Sequence[tuple[int, str]], limit: int = 2048) -> html.Div:
    """The prompt's tokens as chips (position in the tooltip); long prompts are cut with a note."""
    chips = [html.Span(tok if tok.strip() else repr(tok), title=f"token {i}: {tok!r}", className="tok")
             for i, tok in list(pairs)[:limit]]
    if len(pairs) > limit:
        chips.append(html.Span(f"… {len(pairs) - limit} more tokens", className="tok more"))
    return html.Div(chips, className="token-strip")
