"""One real-browser smoke test per page (console log must stay empty), on tiny-llama."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.action_chains import ActionChains

pytestmark = pytest.mark.browser

PROMPT = "The cat sat on the mat. The cat sat on the mat."


def test_prompt_page(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    dash_duo.wait_for_element("#prompt-run")
    ui.run_prompt(PROMPT)
    assert "tiny-llama" in ui.text("#prompt-summary")
    assert len(dash_duo.find_elements(".token-strip .tok")) >= 10
    assert "tiny-llama" in ui.text("#session-badge")
    ui.settle()
    assert dash_duo.get_logs() == []


def test_prompt_page_rejects_empty_prompt(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    dash_duo.find_element("#prompt-run").click()
    ui.wait_until(lambda: "empty prompt" in ui.text("#prompt-message"), 20, "the empty-prompt message")
    assert dash_duo.get_logs() == []


def test_head_map_page(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt(PROMPT)
    ui.go_to("/heads", "#headmap-graph .heatmaplayer")
    ui.wait_until(lambda: "stats / entropy" in ui.text("#headmap-metric"), 20, "the metric list")
    assert "entropy" in ui.text("#headmap-help")
    assert "detectors" in ui.text("#headmap-probe-list")
    ui.settle()
    assert dash_duo.get_logs() == []


def test_pattern_page(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt(PROMPT)
    ui.go_to("/pattern", "#pattern-graph .heatmaplayer")
    ui.wait_until(lambda: "exact weights" in ui.text("#pattern-info"), 20, "the pattern info line")
    dash_duo.wait_for_element("#pattern-row .barlayer", timeout=20)
    ui.settle()
    assert dash_duo.get_logs() == []


def test_atlas_page(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt(PROMPT)
    ui.go_to("/atlas", "#atlas-run")
    dash_duo.select_dcc_dropdown("#atlas-method", value="PCA (scikit-learn)")
    ui.wait_until(lambda: "PCA" in ui.text("#atlas-method"), 10, "the PCA choice")
    dash_duo.find_element("#atlas-run").click()
    ui.wait_until(lambda: dash_duo.driver.find_elements("css selector", "#atlas-graph .scatterlayer .point"), 60,
                  "the atlas points")
    assert len(dash_duo.find_elements("#atlas-graph .scatterlayer .point")) == 8  # 2 layers x 4 heads
    assert "PCA (scikit-learn)" in ui.text("#atlas-graph")
    ui.settle()
    assert dash_duo.get_logs() == []
    box = dash_duo.driver.execute_script(  # one script: no stale element if the graph re-renders
        "const r = document.querySelector('#atlas-graph .scatterlayer .point').getBoundingClientRect();"
        "return [r.left + r.width / 2, r.top + r.height / 2];")
    ActionChains(dash_duo.driver).move_to_location(int(box[0]), int(box[1])).pause(0.3).click().perform()
    ui.wait_until(lambda: dash_duo.driver.execute_script("return window.location.pathname") == "/pattern", 20,
                  "the jump to the pattern viewer")
    dash_duo.wait_for_element("#pattern-graph .heatmaplayer", timeout=20)
    ui.wait_until(lambda: "head: L" in ui.text("#session-badge"), 20, "the selected head")
    layer, head = ui.text("#session-badge").split("head: L")[1].split("H")
    ui.wait_until(lambda: f"L{layer}H{head} attention pattern" in ui.text("#pattern-graph"), 20, "its pattern")
    ui.wait_until(lambda: f"head=L{layer}H{head}" in dash_duo.driver.execute_script("return window.location.search"),
                  20, "the jumped-to head in the address")
    ui.wait_until(lambda: "Promotes" in ui.text("#headcard-body"), 60, "the head card beside the pattern")
    assert f"L{layer}H{head}" in ui.text("#headcard-body")
    ui.settle()
    assert dash_duo.get_logs() == []


def test_intervene_page(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt(PROMPT)
    ui.go_to("/intervene", "#intervene-add")
    ui.wait_until(lambda: ui.text("#intervene-layer"), 20, "the layer choice")
    dash_duo.find_element("#intervene-add").click()
    ui.wait_until(lambda: "zero" in ui.text("#intervene-list"), 20, "the intervention list")
    ui.settle()
    assert dash_duo.get_logs() == []


def test_runs_page(dash_duo, make_app, ui, tmp_path):
    import pandas as pd

    from workbench.runstore import write_run

    rows = [{"layer": layer, "head": head, "probe": "stats", "metric": "entropy", "value": 0.1 * (layer + head),
             "ci_low": 0.0, "ci_high": 1.0} for layer in range(2) for head in range(4)]
    write_run(tmp_path / "runs" / "run-a", pd.DataFrame(rows), {"model": "tiny-llama", "dataset": "induction"})
    dash_duo.start_server(make_app(runs_dir=tmp_path / "runs"))
    ui.go_to("/runs", "#runs-open")
    path = dash_duo.find_element("#runs-path")
    path.send_keys(str(tmp_path / "no-such-run"))
    dash_duo.find_element("#runs-open").click()
    ui.wait_until(lambda: "is not a run under the runs root" in ui.text("#runs-message"), 20,
                  "the bad-folder message")
    dash_duo.clear_input(path)
    path.send_keys(str(tmp_path / "runs" / "run-a"))
    dash_duo.find_element("#runs-open").click()
    dash_duo.wait_for_element("#runs-graph .heatmaplayer", timeout=20)
    ui.wait_until(lambda: "entropy" in ui.text("#runs-table"), 20, "the run table")
    ui.settle()
    assert dash_duo.get_logs() == []
