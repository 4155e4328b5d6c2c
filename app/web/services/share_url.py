"""Shareable state in the address: ``?prompt=<analysis key>&head=L3H2&metric=<probe|metric>``.

The browser writes the query from the session (a clientside ``history.replaceState`` in
:mod:`app.web.callbacks.share_url`); :func:`restore` reads it back into a session, on a fresh
tab, a reload or a link followed inside the app. The prompt is the key of an analysis in this
server's cache (:attr:`Workspace.analyses`), so a link works while the server keeps that analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs

from app.web.services.analysis import Analysis
from app.web.services.head_card import parse_head_query
from app.web.services.headmap import SEPARATOR, metric_options
from app.web.services.workspace import Workspace
from workbench.errors import InputError

PARAMS = ("prompt", "head", "metric")
MAX_VALUE_CHARS = 200


@dataclass(frozen=True)
class ShareQuery:
    """The share parameters of an address (None where absent)."""

    prompt: str | None = None
    head: tuple[int, int] | None = None
    metric: str | None = None


@dataclass
class Restored:
    """What an address does to a session.

    Attributes:
        session: the session to keep (the given one when nothing changes).
        changed: ``session`` differs from the given one.
        adopted: the address's analysis replaced the session's (pages re-read their state).
        problems: one line per part of the address that could not be used.
    """

    session: dict
    changed: bool = False
    adopted: bool = False
    problems: list[str] = field(default_factory=list)


def _first(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values or not values[0].strip():
        return None
    value = values[0].strip()
    if len(value) > MAX_VALUE_CHARS:
        raise InputError(f"'{name}' in the address is longer than {MAX_VALUE_CHARS} characters: copy the link again")
    return value


def parse_share_query(search: str | None) -> tuple[ShareQuery, list[str]]:
    """The share parameters of ``search`` (``"?prompt=...&head=L3H2&metric=probe|name"``).

    Returns:
        the parsed query (a malformed part is left out) and one problem line per malformed part.
    """
    params = parse_qs((search or "").lstrip("?"))
    values: dict = {}
    problems: list[str] = []
    for name in PARAMS:
        try:
            value = _first(params, name)
            if name == "head" and value is not None:
                value = parse_head_query(f"head={value}")
            if name == "metric" and value is not None and SEPARATOR not in value:
                raise InputError(f"metric '{value}' in the address is not of the form probe{SEPARATOR}metric "
                                 f"(e.g. stats{SEPARATOR}entropy): pick one on the Head map")
            values[name] = value
        except InputError as err:
            problems.append(str(err))
    return ShareQuery(**values), problems


def check_head(analysis: Analysis, head: tuple[int, int]) -> None:
    """Raises InputError when ``head`` is not a head of the analysed model."""
    cap = analysis.capture
    layer, index = head
    if layer not in cap.layers or index not in cap.heads:
        raise InputError(f"head L{layer}H{index} in the address is not in {analysis.model_name} (layers "
                         f"{min(cap.layers)}–{max(cap.layers)}, heads {min(cap.heads)}–{max(cap.heads)}): "
                         "pick one on the Head map")


def check_metric(analysis: Analysis, metric: str) -> None:
    """Raises InputError when ``metric`` is not computed for the analysis."""
    if metric not in {o["value"] for o in metric_options(analysis)}:
        raise InputError(f"metric '{metric}' in the address is not computed for this prompt: compute its probe "
                         "on the Head map, or pick another metric there")


def _lost_prompt(ws: Workspace) -> str:
    return (f"the linked prompt is no longer in this server's memory (it keeps the {ws.analyses.capacity} most "
            "recent): run it again on Model & prompt")


def restore(ws: Workspace, session: dict | None, search: str | None) -> Restored:
    """Apply an address's share parameters to a session.

    A prompt key is adopted only when the server still has it (with its model name and text; the
    selection of the old prompt is dropped); otherwise the session is left alone and a problem says
    so. A head or metric that differs from the session's is applied when it fits the session's
    analysis (unchecked when there is none yet); one that does not fit is reported, never clamped.
    """
    old = dict(session or ws.session_defaults())
    query, problems = parse_share_query(search)
    new = dict(old)
    adopted = False
    if query.prompt and query.prompt != old.get("analysis"):
        if query.prompt in ws.analyses:
            analysis = ws.analyses.get(query.prompt)
            new.update(model=analysis.model_name, analysis=query.prompt, prompt=analysis.prompt, selected=None)
            adopted = True
        else:
            return Restored(old, problems=[_lost_prompt(ws), *problems])
    analysis = ws.analyses.get(new["analysis"]) if new.get("analysis") in ws.analyses else None
    for name, value, check in (("selected", query.head, check_head), ("metric", query.metric, check_metric)):
        stored = list(value) if name == "selected" and value is not None else value
        if stored is None or stored == new.get(name):
            continue  # nothing to apply (our own address echoed back is never re-checked)
        try:
            if analysis is not None:
                check(analysis, value)
            new[name] = stored
        except InputError as err:
            problems.append(str(err))
    return Restored(new, changed=new != old, adopted=adopted, problems=problems)
