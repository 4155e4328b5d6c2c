"""End to end in a real browser: prompt -> run -> click a head -> ablate it -> the output changes."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.action_chains import ActionChains

pytestmark = pytest.mark.browser


def click_heatmap_cell(dash_duo, graph: str, row: int, col: int, n_rows: int, n_cols: int) -> None:
    """Click the centre of cell (row, col) of a plotly heatmap (rows top to bottom)."""
    drag = dash_duo.find_element(f"{graph} .nsewdrag")
    box = dash_duo.driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                         "return [r.left, r.top, r.width, r.height];", drag)
    x = box[0] + box[2] * (col + 0.5) / n_cols
    y = box[1] + box[3] * (row + 0.5) / n_rows
    ActionChains(dash_duo.driver).move_to_location(int(x), int(y)).pause(0.2).click().perform()


def table_rows(dash_duo, selector: str) -> list[list[str]]:
    # one script: the table re-renders when the streamed follow-up arrives (no stale elements)
    return dash_duo.driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map("
        "r => Array.from(r.querySelectorAll('td')).map(td => td.innerText.trim()));", f"{selector} table tbody tr")


def test_ablating_a_clicked_head_changes_the_output(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt("When Mary and John went to the store, John gave a drink to")

    ui.go_to("/heads", "#headmap-graph .heatmaplayer")
    ui.settle()
    click_heatmap_cell(dash_duo, "#headmap-graph", row=1, col=2, n_rows=2, n_cols=4)
    ui.wait_until(lambda: "head: L1H2" in ui.text("#session-badge"), 20, "the head selection")
    ui.wait_until(lambda: "selected L1H2" in ui.text("#headmap-selected"), 20, "the selected-head line")

    ui.go_to("/intervene", "#intervene-add")
    ui.wait_until(lambda: ui.text("#intervene-layer") == "1" and ui.text("#intervene-head") == "2", 20,
                  "the selected head in the form")
    dash_duo.find_element("#intervene-add").click()  # default kind: zero ablation
    ui.wait_until(lambda: "L1H2 zero" in ui.text("#intervene-list"), 20, "the intervention list")
    dash_duo.find_element("#intervene-run").click()
    ui.wait_until(lambda: table_rows(dash_duo, "#intervene-topk"), 120, "the before/after table")

    rows = table_rows(dash_duo, "#intervene-topk")
    assert len(rows) >= 10
    changed_topk = any(row[1:3] != row[3:5] for row in rows)  # rank, before, p_before, after, p_after
    continuation = ui.text("#intervene-continuation").splitlines()
    before = next(line for line in continuation if line.startswith("before:"))
    after = next(line for line in continuation if line.startswith("after:"))
    assert changed_topk or before[len("before:"):] != after[len("after:"):]
    assert "with: L1H2 zero" in ui.text("#intervene-topk")
    dash_duo.wait_for_element("#intervene-delta .heatmaplayer", timeout=20)
    ui.settle()
    assert dash_duo.get_logs() == []
