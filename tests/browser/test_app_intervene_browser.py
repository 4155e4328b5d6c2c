"""Issue 13 in a real browser, Intervene page (tiny-llama): the list survives navigation and
reloads (bug 2), bad α is refused beside its field (bug 8), results are tagged with the prompt
and list they were computed for (bug 3), continuations stream in after the fast half."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

PROMPT = "The cat sat on the mat. The cat sat on the mat."
OTHER = "When Mary and John went to the store, John gave a drink to"


def table_rows(dash_duo, selector: str) -> list[list[str]]:
    # one script: the table re-renders when the streamed follow-up arrives (no stale elements)
    return dash_duo.driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map("
        "r => Array.from(r.querySelectorAll('td')).map(td => td.innerText.trim()));", f"{selector} table tbody tr")


def test_list_survives_navigation_and_reload_and_bad_alpha_is_refused(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt(PROMPT)
    ui.go_to("/intervene", "#intervene-add")
    ui.wait_until(lambda: ui.text("#intervene-layer"), 20, "the layer choice")
    assert not dash_duo.find_element("#intervene-alpha").is_displayed()  # zero ablation has no α
    dash_duo.select_dcc_dropdown("#intervene-kind", value="scale — reinforce / dampen: multiply the head output by α")
    ui.wait_until(lambda: dash_duo.find_element("#intervene-alpha").is_displayed(), 10, "the α field")
    assert not dash_duo.find_element("#intervene-u").is_displayed()
    for bad, says in (("abc", "'abc' is not a number"), ("1000", "α 1000 is out of range"),
                      ("-7", "α -7 is out of range")):
        ui.type_into("#intervene-alpha", bad)
        dash_duo.find_element("#intervene-add").click()
        ui.wait_until(lambda: says in ui.text("#intervene-alpha-error"), 10, f"the message for α = {bad}")
        assert "no interventions yet" in ui.text("#intervene-list")
    ui.type_into("#intervene-alpha", "3")
    dash_duo.find_element("#intervene-add").click()
    ui.wait_until(lambda: "scale α=3" in ui.text("#intervene-list"), 10, "the added intervention")
    assert ui.text("#intervene-alpha-error") == ""

    ui.go_to("/heads", "#headmap-graph")
    ui.go_to("/intervene", "#intervene-add")
    ui.wait_until(lambda: "scale α=3" in ui.text("#intervene-list"), 10, "the list after coming back")
    dash_duo.driver.refresh()
    dash_duo.wait_for_element("#intervene-add", timeout=20)
    ui.wait_until(lambda: "scale α=3" in ui.text("#intervene-list"), 10, "the list after a reload")
    ui.settle()
    assert dash_duo.get_logs() == []


def test_results_are_marked_or_cleared_when_the_list_or_prompt_changes(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt(PROMPT)
    ui.go_to("/intervene", "#intervene-add")
    ui.wait_until(lambda: ui.text("#intervene-layer"), 20, "the layer choice")
    dash_duo.find_element("#intervene-add").click()
    ui.wait_until(lambda: "L0H0 zero" in ui.text("#intervene-list"), 10, "the intervention list")
    dash_duo.find_element("#intervene-run").click()
    ui.wait_until(lambda: table_rows(dash_duo, "#intervene-topk"), 60, "the before/after table")
    assert "with: L0H0 zero" in ui.text("#intervene-topk")
    ui.wait_until(lambda: "streaming" not in ui.text("#intervene-continuation")
                  and "after:" in ui.text("#intervene-continuation"), 60, "the continuations")
    dash_duo.wait_for_element("#intervene-delta .heatmaplayer", timeout=30)
    assert ui.text("#intervene-stale") == ""

    dash_duo.select_dcc_dropdown("#intervene-head", value="1")
    dash_duo.find_element("#intervene-add").click()
    ui.wait_until(lambda: "L0H1 zero" in ui.text("#intervene-list"), 10, "the longer list")
    ui.wait_until(lambda: "list has changed" in ui.text("#intervene-stale"), 10, "the stale mark")
    assert "with: L0H0 zero" in ui.text("#intervene-stale")

    ui.go_to("/", "#prompt-run")
    box = dash_duo.find_element("#prompt-text")
    dash_duo.clear_input(box)
    box.send_keys(OTHER)
    dash_duo.find_element("#prompt-run").click()
    ui.wait_until(lambda: "15 tokens" in ui.text("#prompt-summary") or "Mary" in ui.text("#prompt-tokens"), 60,
                  "the new analysis")
    ui.go_to("/intervene", "#intervene-add")
    ui.wait_until(lambda: "another prompt" in ui.text("#intervene-stale"), 10, "the cleared results")
    assert table_rows(dash_duo, "#intervene-topk") == []
    ui.settle()
    assert dash_duo.get_logs() == []
