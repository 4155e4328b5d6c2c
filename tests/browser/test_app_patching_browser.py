"""Issue 10 in a real browser, on tiny-llama: the Patching page and the head card it opens."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

pytestmark = pytest.mark.browser

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def _type(dash_duo, selector: str, text: str) -> None:
    box = dash_duo.find_element(selector)
    dash_duo.clear_input(box)
    box.send_keys(text)


def test_patching_page_heatmaps_open_the_head_card(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt(CLEAN)
    ui.go_to("/patching", "#patch-run")
    dash_duo.find_element("#patch-run").click()           # empty form: one line, no job
    ui.wait_until(lambda: "empty clean prompt" in ui.text("#patch-message"), 20, "the empty-form message")

    _type(dash_duo, "#patch-clean", CLEAN)
    _type(dash_duo, "#patch-corrupt", CORRUPT)
    _type(dash_duo, "#patch-answer", "Mary")
    _type(dash_duo, "#patch-distractor", "John")
    dash_duo.find_element("#patch-run").click()
    ui.wait_until(lambda: "highest head recovery" in ui.text("#patch-summary"), 120, "the patching result")
    dash_duo.wait_for_element("#patch-heads-graph .heatmaplayer", timeout=20)
    dash_duo.wait_for_element("#patch-resid-graph .heatmaplayer", timeout=20)
    assert "residual stream" in ui.text("#patch-resid-graph")
    ui.settle()
    assert dash_duo.get_logs() == []

    box = dash_duo.driver.execute_script(
        "const r = document.querySelector('#patch-heads-graph .nsewdrag').getBoundingClientRect();"
        "return [r.left + r.width * 0.3, r.top + r.height * 0.7];")
    ActionChains(dash_duo.driver).move_to_location(int(box[0]), int(box[1])).pause(0.3).click().perform()
    ui.wait_until(lambda: dash_duo.driver.execute_script("return window.location.pathname") == "/heads", 20,
                  "the jump to the head map")
    ui.wait_until(lambda: "Promotes" in ui.text("#headcard-body"), 60, "the head card")
    card = ui.text("#headcard-body")
    assert "top prediction" in card and "composition" in card

    target = dash_duo.find_element("#headcard-target")
    target.send_keys("M")
    target.send_keys(Keys.ENTER)
    ui.wait_until(lambda: "rank" in ui.text("#headcard-body"), 30, "the target-token line")
    ui.settle()
    assert dash_duo.get_logs() == []
