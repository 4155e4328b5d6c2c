"""Screenshots of every page on the real SmolLM2-135M for ``docs/screenshots`` (opt-in, slow).

Run: ``WORKBENCH_SCREENSHOTS=1 python -m pytest tests/browser/test_screenshots_browser.py -m browser -q``
(needs the cached smollm2-135m). Besides writing the PNGs it checks each page rendered its
main figure and the console stayed clean.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains

pytestmark = [pytest.mark.browser, pytest.mark.smollm2,
              pytest.mark.skipif(os.environ.get("WORKBENCH_SCREENSHOTS") != "1",
                                 reason="set WORKBENCH_SCREENSHOTS=1 to regenerate docs/screenshots")]

OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PROMPT = ("Alice and Bob went to the market. Alice bought apples and Bob bought pears. "
          "Alice and Bob went to the market. Alice bought")


def shoot(dash_duo, name: str, height: int = 1500) -> None:
    """Save the viewport (1400 px wide, ``height`` tall) as ``docs/screenshots/NAME.png``."""
    dash_duo.driver.set_window_size(1400, height)
    time.sleep(1.0)
    OUT.mkdir(parents=True, exist_ok=True)
    dash_duo.driver.save_screenshot(str(OUT / f"{name}.png"))


def click_cell(dash_duo, graph: str, row: int, col: int, n_rows: int, n_cols: int) -> None:
    drag = dash_duo.find_element(f"{graph} .nsewdrag")
    dash_duo.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", drag)
    box = dash_duo.driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                         "return [r.left, r.top, r.width, r.height];", drag)
    x, y = box[0] + box[2] * (col + 0.5) / n_cols, box[1] + box[3] * (row + 0.5) / n_rows
    ActionChains(dash_duo.driver).move_to_location(int(x), int(y)).pause(0.3).click().perform()


def make_runs(root: Path) -> None:
    from app.analysis import AnalysisRequest, run_analysis
    from workbench.runstore import write_run

    for dataset in ("induction", "calibration"):
        result = run_analysis(AnalysisRequest(model="smollm2-135m", dataset=dataset, n=4, seq_len=64,
                                              progress=False))
        write_run(root / f"smollm2-135m-{dataset}", result.heads, result.manifest)


def test_screenshots(dash_duo, make_app, ui, tmp_path, smollm2):
    make_runs(tmp_path / "runs")
    app = make_app(model_name="smollm2-135m", runs_dir=tmp_path / "runs")
    ws = app.workspace
    dash_duo.start_server(app)
    ui.run_prompt(PROMPT, timeout=180)
    ui.settle()
    shoot(dash_duo, "prompt", 900)

    analysis = list(ws.analyses._items.values())[-1]
    rows = analysis.frame[(analysis.frame["probe"] == "detectors") & (analysis.frame["metric"] == "induction")]
    top = rows.sort_values("value", ascending=False).iloc[0]
    layer, head = int(top["layer"]), int(top["head"])

    ui.go_to("/heads", "#headmap-graph .heatmaplayer")
    dash_duo.select_dcc_dropdown("#headmap-metric", value="detectors / induction")
    ui.settle(1.5)
    click_cell(dash_duo, "#headmap-graph", layer, head, smollm2.n_layers, smollm2.n_heads)
    ui.wait_until(lambda: f"head: L{layer}H{head}" in ui.text("#session-badge"), 30, "the head selection")
    ui.settle()
    dash_duo.driver.execute_script("window.scrollTo(0, 0)")
    shoot(dash_duo, "head-map", 1250)

    ui.go_to("/pattern", "#pattern-graph .heatmaplayer")
    ui.wait_until(lambda: f"L{layer}H{head}" in ui.text("#pattern-graph"), 30, "the selected head's pattern")
    ui.settle(1.5)
    shoot(dash_duo, "pattern", 1400)

    ui.go_to("/atlas", "#atlas-run")
    dash_duo.find_element("#atlas-run").click()
    ui.wait_until(lambda: dash_duo.driver.find_elements("css selector", "#atlas-graph .scatterlayer .point"), 400,
                  "the UMAP atlas")
    ui.settle(1.5)
    shoot(dash_duo, "atlas", 1000)

    ui.go_to("/intervene", "#intervene-add")
    top3 = rows.sort_values("value", ascending=False).head(3)
    for r in top3.itertuples():
        dash_duo.select_dcc_dropdown("#intervene-layer", value=str(int(r.layer)))
        dash_duo.select_dcc_dropdown("#intervene-head", value=str(int(r.head)))
        dash_duo.find_element("#intervene-add").click()
        ui.wait_until(lambda r=r: f"L{int(r.layer)}H{int(r.head)} zero" in ui.text("#intervene-list"), 20, "item")
    dash_duo.find_element("#intervene-target-text").send_keys(" apples")  # what induction predicts here
    dash_duo.find_element("#intervene-run").click()
    ui.wait_until(lambda: dash_duo.driver.find_elements("css selector", "#intervene-topk table"), 400, "comparison")
    ui.wait_until(lambda: "apples" in ui.text("#intervene-target"), 60, "the target token's logit")
    dash_duo.wait_for_element("#intervene-delta .heatmaplayer", timeout=400)  # the follow-up streams in
    ui.settle(1.5)
    shoot(dash_duo, "intervene", 1900)

    ui.go_to("/long-context", "#lc-run")
    dash_duo.select_dcc_dropdown("#lc-length", value="1024")
    dash_duo.find_element("#lc-run").click()
    ui.wait_until(lambda: dash_duo.driver.find_elements("css selector", "#lc-graph .scatterlayer .point"), 900,
                  "the taxonomy points")
    ui.settle(1.5)
    point = dash_duo.driver.execute_script(  # the head with the highest retrieval score (topmost point)
        "const pts = [...document.querySelectorAll('#lc-graph .scatterlayer .point')]"
        ".map(p => p.getBoundingClientRect()).sort((a, b) => a.top - b.top);"
        "return [pts[0].left + pts[0].width / 2, pts[0].top + pts[0].height / 2];")
    ActionChains(dash_duo.driver).move_to_location(int(point[0]), int(point[1])).pause(0.3).click().perform()
    dash_duo.wait_for_element("#lc-thumb .heatmaplayer", timeout=300)
    ui.wait_until(lambda: "rows that predict the answer" in ui.text("#lc-row"), 300, "the needle rows")
    ActionChains(dash_duo.driver).move_to_element(dash_duo.find_element("#lc-run")).perform()  # no hover label
    ui.settle(1.5)
    dash_duo.driver.execute_script("window.scrollTo(0, 0)")
    shoot(dash_duo, "long-context", 1700)

    ui.go_to("/runs", "#runs-open")
    dash_duo.select_dcc_dropdown("#runs-pick", value="smollm2-135m-induction")
    dash_duo.select_dcc_dropdown("#runs-compare-pick", value="smollm2-135m-calibration")
    ui.wait_until(lambda: dash_duo.find_element("#runs-compare-path").get_attribute("value"), 10, "the picked runs")
    dash_duo.find_element("#runs-open").click()
    dash_duo.wait_for_element("#runs-delta .heatmaplayer", timeout=60)
    ui.settle(1.5)
    shoot(dash_duo, "runs", 1900)
    assert dash_duo.get_logs() == []
    assert np.isfinite(rows["value"]).all()


def set_textarea(dash_duo, selector: str, text: str) -> None:
    """Put a long text into a React-controlled textarea at once (typing it would take minutes)."""
    box = dash_duo.find_element(selector)
    box.send_keys(text[:20])  # focus and start typing like a user, then paste the rest
    dash_duo.driver.execute_script(
        "const setter = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;"
        "setter.call(arguments[0], arguments[1]);"
        "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", box, text)


def test_screenshots_long_input(dash_duo, make_app, ui, smollm2):
    """A stats-mode prompt: job progress, Cancel, the pooled thumbnail, a drag-zoom to exact weights."""
    from workbench.data import datasets_dir

    text = (datasets_dir() / "calibration.txt").read_text(encoding="utf-8")[:3400]
    app = make_app(model_name="smollm2-135m")
    dash_duo.start_server(app)
    dash_duo.driver.set_window_size(1400, 900)
    set_textarea(dash_duo, "#prompt-text", text)
    time.sleep(0.5)
    dash_duo.find_element("#prompt-run").click()
    ui.wait_until(lambda: "layer" in ui.text("#prompt-job-status"), 300, "per-layer progress")
    dash_duo.find_element("#prompt-job-cancel").click()
    ui.wait_until(lambda: "cancelled" in ui.text("#prompt-job-status"), 300, "the cancellation")
    assert not app.workspace.analyses._items and "tokens," not in ui.text("#prompt-summary")

    dash_duo.find_element("#prompt-run").click()
    ui.wait_until(lambda: "layer" in ui.text("#prompt-job-status"), 300, "per-layer progress")
    shoot(dash_duo, "job-progress", 760)
    ui.wait_until(lambda: "stats mode" in ui.text("#prompt-summary"), 900, "the stats-mode analysis")

    ui.go_to("/pattern", "#pattern-graph .heatmaplayer")
    dash_duo.select_dcc_dropdown("#pattern-layer", value="17")
    dash_duo.select_dcc_dropdown("#pattern-head", value="5")
    ui.wait_until(lambda: "L17H5 attention pattern (max-pooled)" in ui.text("#pattern-graph"), 60, "the thumbnail")
    ui.wait_until(lambda: "max-pooled" in ui.text("#pattern-row"), 60, "the whole pooled row")
    ui.settle(1.5)
    shoot(dash_duo, "pattern-long", 1700)
    drag = dash_duo.find_element("#pattern-graph .nsewdrag")
    r = dash_duo.driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                       "return [r.left, r.top, r.width, r.height];", drag)
    x0, y0, x1, y1 = r[0] + r[2] * 0.40, r[1] + r[3] * 0.45, r[0] + r[2] * 0.44, r[1] + r[3] * 0.49
    ActionChains(dash_duo.driver).move_to_location(int(x0), int(y0)).click_and_hold().pause(0.2) \
        .move_to_location(int((x0 + x1) / 2), int((y0 + y1) / 2)).pause(0.1) \
        .move_to_location(int(x1), int(y1)).pause(0.2).release().perform()
    ui.wait_until(lambda: "exact weights" in ui.text("#pattern-info"), 60, "the exact tile after the zoom")
    ui.settle(1.5)
    shoot(dash_duo, "pattern-zoomed", 1110)
    assert dash_duo.get_logs() == []
