"""Real-browser test of the Long context page (tiny-llama): run, scatter, click a head, its views."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.action_chains import ActionChains

pytestmark = pytest.mark.browser


def test_long_context_page(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    dash_duo.wait_for_element("#prompt-run")
    ui.go_to("/long-context", "#lc-run")
    dash_duo.select_dcc_dropdown("#lc-length", value="512")
    ui.wait_until(lambda: "512" in ui.text("#lc-length"), 10, "the 512-token choice")
    dash_duo.find_element("#lc-run").click()
    ui.wait_until(lambda: dash_duo.driver.find_elements("css selector", "#lc-graph .scatterlayer .point"), 120,
                  "the taxonomy points")
    assert len(dash_duo.find_elements("#lc-graph .scatterlayer .point")) == 8  # 2 layers x 4 heads
    assert "KV saliency" in ui.text("#lc-graph")
    ui.settle()
    box = dash_duo.driver.execute_script(
        "const r = document.querySelector('#lc-graph .scatterlayer .point').getBoundingClientRect();"
        "return [r.left + r.width / 2, r.top + r.height / 2];")
    ActionChains(dash_duo.driver).move_to_location(int(box[0]), int(box[1])).pause(0.3).click().perform()
    dash_duo.wait_for_element("#lc-thumb .heatmaplayer", timeout=60)
    ui.wait_until(lambda: "rows that predict the answer" in ui.text("#lc-row"), 60, "the needle rows")
    ui.settle()
    assert dash_duo.get_logs() == []
