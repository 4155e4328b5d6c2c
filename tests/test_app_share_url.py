"""The shareable address (?prompt=&head=&metric=): parsing, validation and restoring a session (tiny-llama)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from app.web.services.headmap import metric_options
from app.web.services.share_url import ShareQuery, parse_share_query, restore


def _search(**params) -> str:
    return "?" + urlencode(params)


@pytest.fixture(scope="module")
def key(ws, analysis) -> str:
    """A second cache key of the module's analysis (as another session's run would have)."""
    return ws.analyses.put(analysis)


@pytest.fixture(scope="module")
def metrics(analysis) -> list[str]:
    return [o["value"] for o in metric_options(analysis)]


def test_parse_reads_the_three_parameters_and_ignores_others():
    query, problems = parse_share_query("?prompt=abc123&head=l1h2&metric=stats%7Centropy&other=x")
    assert query == ShareQuery("abc123", (1, 2), "stats|entropy") and problems == []
    assert parse_share_query("") == (ShareQuery(), [])
    assert parse_share_query(None) == (ShareQuery(), [])
    assert parse_share_query("?prompt=&head=") == (ShareQuery(), [])


@pytest.mark.parametrize("search, part, message", [
    ("?head=nine&prompt=k", "head", "L<layer>H<head>"),
    ("?metric=entropy&prompt=k", "metric", "probe|metric"),
    ("?prompt=" + "a" * 201, "prompt", "longer than 200"),
])
def test_parse_reports_each_malformed_part_and_keeps_the_rest(search, part, message):
    query, problems = parse_share_query(search)
    assert len(problems) == 1 and message in problems[0]
    assert getattr(query, part) is None
    if part != "prompt":
        assert query.prompt == "k"


def test_a_fresh_session_adopts_the_linked_prompt_head_and_metric(ws, analysis, key, metrics):
    metric = metrics[-1]
    result = restore(ws, None, _search(prompt=key, head="L1H3", metric=metric))
    assert result.problems == [] and result.changed and result.adopted
    assert result.session == dict(ws.session_defaults(), model="tiny-llama", analysis=key, prompt=analysis.prompt,
                                  selected=[1, 3], metric=metric)


def test_our_own_address_echoed_back_changes_nothing(ws, key, metrics):
    session = dict(ws.session_defaults(), analysis=key, selected=[0, 2], metric="gone|metric")
    result = restore(ws, session, _search(prompt=key, head="L0H2", metric="gone|metric"))
    assert (result.changed, result.adopted, result.problems) == (False, False, [])
    assert result.session == session


def test_a_head_link_inside_the_app_selects_the_head_only(ws, key):
    session = dict(ws.session_defaults(), analysis=key, selected=[0, 0])
    result = restore(ws, session, "?head=L1H1")
    assert result.changed and not result.adopted and result.session == dict(session, selected=[1, 1])


def test_an_unknown_prompt_leaves_the_tabs_own_session_alone(ws, key):
    own = dict(ws.session_defaults(), analysis=key, selected=[0, 1], metric="stats|entropy")
    result = restore(ws, own, _search(prompt="0" * 32, head="L1H1", metric="stats|entropy"))
    assert not result.changed and result.session == own
    assert len(result.problems) == 1
    assert "no longer in this server's memory (it keeps the 4 most recent)" in result.problems[0]
    assert "Model & prompt" in result.problems[0]


@pytest.mark.parametrize("params, message", [
    ({"head": "L7H0"}, "head L7H0 in the address is not in tiny-llama (layers 0–1, heads 0–3)"),
    ({"head": "L0H-1"}, "head L0H-1"),
    ({"metric": "stats|no_such_metric"}, "is not computed for this prompt"),
])
def test_a_bad_head_or_metric_is_reported_and_the_rest_still_applies(ws, analysis, key, params, message):
    result = restore(ws, None, _search(prompt=key, **params))
    assert result.adopted and result.session["analysis"] == key
    assert len(result.problems) == 1 and message in result.problems[0]
    assert result.session["selected"] is None and "metric" not in result.session


def test_adopting_another_prompt_drops_the_old_selection(ws, analysis, key):
    other = ws.analyses.put(analysis)
    session = dict(ws.session_defaults(), analysis=key, selected=[1, 2])
    result = restore(ws, session, _search(prompt=other))
    assert result.adopted and result.session["analysis"] == other and result.session["selected"] is None
