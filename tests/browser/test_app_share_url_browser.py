"""Real-browser test of the shareable address (?prompt=&head=&metric=) on tiny-llama: it follows the
state, survives a reload, restores a fresh tab, and explains a link the server can no longer serve."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode

import pytest
from selenium.webdriver.common.action_chains import ActionChains

from app.web.services.headmap import metric_options

pytestmark = pytest.mark.browser

PROMPT = "The cat sat on the mat. The cat sat on the mat."


def _query(dash_duo) -> dict[str, str]:
    search = dash_duo.driver.execute_script("return window.location.search")
    return {k: v[0] for k, v in parse_qs(search.lstrip("?")).items()}


def _path(dash_duo) -> str:
    return dash_duo.driver.execute_script("return window.location.pathname")


def _shows(ui, head: str, label: str) -> None:
    """The head map shows the prompt, the head and the metric (after a load)."""
    ui.duo.wait_for_element("#headmap-graph .heatmaplayer", timeout=30)
    ui.wait_until(lambda: "prompt: " in ui.text("#session-badge") and f"head: {head}" in ui.text("#session-badge"),
                  30, f"the prompt and {head} in the badge")
    ui.wait_until(lambda: label in ui.text("#headmap-metric"), 30, f"the metric {label}")
    ui.wait_until(lambda: head in ui.text("#headmap-selected"), 30, "the selected-head line")


def _fresh_tab(dash_duo, url: str) -> None:
    dash_duo.driver.execute_script("sessionStorage.clear()")
    dash_duo.driver.get(url)


def test_the_address_follows_the_state_and_restores_it(dash_duo, make_app, ui):
    app = make_app()
    dash_duo.start_server(app)
    ui.run_prompt(PROMPT)
    key = ui.wait_until(lambda: _query(dash_duo).get("prompt"), 20, "the prompt key in the address")
    assert _path(dash_duo) == "/" and set(_query(dash_duo)) == {"prompt"}

    ui.go_to("/heads", "#headmap-graph .heatmaplayer")
    ui.wait_until(lambda: _query(dash_duo).get("prompt") == key, 20, "the query back after the header link dropped it")
    option = metric_options(app.workspace.analyses.get(key))[2]
    dash_duo.select_dcc_dropdown("#headmap-metric", value=option["label"])
    box = dash_duo.driver.execute_script(
        "const r = document.querySelector('#headmap-graph .nsewdrag').getBoundingClientRect();"
        "return [r.left + r.width * 0.6, r.top + r.height * 0.3];")
    ActionChains(dash_duo.driver).move_to_location(int(box[0]), int(box[1])).pause(0.3).click().perform()
    ui.wait_until(lambda: "head: L" in ui.text("#session-badge"), 20, "the clicked head")
    head = "L" + ui.text("#session-badge").split("head: L")[1].split()[0]
    expected = {"prompt": key, "head": head, "metric": option["value"]}
    ui.wait_until(lambda: _query(dash_duo) == expected, 20, f"the address {expected}")
    ui.settle()
    url = dash_duo.driver.current_url

    dash_duo.driver.refresh()  # a reload of the same tab keeps prompt, head and metric
    _shows(ui, head, option["label"])
    ui.settle()
    assert _query(dash_duo) == expected and _path(dash_duo) == "/heads"

    ui.go_to("/pattern", "#pattern-graph .heatmaplayer")  # moving between pages keeps the share state
    ui.wait_until(lambda: _query(dash_duo) == expected, 20, "the query on the pattern page")
    ui.wait_until(lambda: f"{head} attention pattern" in ui.text("#pattern-graph"), 30, "the head's pattern")
    assert dash_duo.get_logs() == []

    _fresh_tab(dash_duo, url)  # someone else opens the link
    _shows(ui, head, option["label"])
    assert _query(dash_duo) == expected and ui.text("#share-message") == ""

    _fresh_tab(dash_duo, url.replace("/heads?", "/pattern?"))  # pages that read the session once re-read it
    ui.wait_until(lambda: f"{head} attention pattern" in ui.text("#pattern-graph"), 30, "the linked head's pattern")
    link = dash_duo.wait_for_element("#headcard-body a[href*='/heads?head=']", timeout=60)  # a partner head
    partner = link.get_attribute("href").split("head=")[1]
    link.click()
    ui.wait_until(lambda: f"head: {partner}" in ui.text("#session-badge"), 20, "the partner head selected")
    ui.wait_until(lambda: _query(dash_duo) == dict(expected, head=partner) and _path(dash_duo) == "/heads", 20,
                  "the partner head in the address")
    _fresh_tab(dash_duo, dash_duo.server_url + "/?" + urlencode({"prompt": key}))
    ui.wait_until(lambda: dash_duo.find_element("#prompt-text").get_attribute("value") == PROMPT, 30,
                  "the linked prompt's text")
    ui.settle()
    assert dash_duo.get_logs() == []


def test_links_the_server_cannot_serve_say_why(dash_duo, make_app, ui):
    app = make_app()
    dash_duo.start_server(app)
    ui.run_prompt(PROMPT)
    key = ui.wait_until(lambda: _query(dash_duo).get("prompt"), 20, "the prompt key in the address")
    base = dash_duo.server_url + "/heads?"
    gone = base + urlencode({"prompt": "0" * 32, "head": "L1H1"})
    lost = "the linked prompt is no longer in this server's memory (it keeps the 4 most recent)"

    dash_duo.driver.get(gone)  # this tab has its own prompt: it keeps it
    ui.wait_until(lambda: lost in ui.text("#share-message"), 30, "the lost-prompt message")
    ui.wait_until(lambda: _query(dash_duo).get("prompt") == key, 20, "the tab's own prompt back in the address")
    assert "prompt: " in ui.text("#session-badge") and "head:" not in ui.text("#session-badge")

    _fresh_tab(dash_duo, gone)  # a fresh tab has nothing: the message, and the dead link stays visible
    ui.wait_until(lambda: lost in ui.text("#share-message"), 30, "the lost-prompt message")
    assert "prompt: " not in ui.text("#session-badge")
    ui.wait_until(lambda: "no prompt analysed yet" in ui.text("#headmap-graph"), 30, "the empty head map")

    _fresh_tab(dash_duo, base + urlencode({"prompt": key, "head": "L9H0", "metric": "stats|nope"}))
    ui.wait_until(lambda: "head L9H0 in the address is not in tiny-llama" in ui.text("#share-message"), 30,
                  "the bad-head message")
    assert "metric 'stats|nope' in the address is not computed for this prompt" in ui.text("#share-message")
    ui.wait_until(lambda: "prompt: " in ui.text("#session-badge"), 30, "the linked prompt, adopted all the same")
    dash_duo.wait_for_element("#headmap-graph .heatmaplayer", timeout=30)
    ui.wait_until(lambda: _query(dash_duo).get("metric", "").startswith("stats|"), 20, "a real metric in the address")
    assert "head" not in _query(dash_duo)
    ui.settle()
    assert dash_duo.get_logs() == []
