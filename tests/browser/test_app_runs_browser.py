"""Issue 13 bug 9 and issue 14 item 3 in a real browser: the Runs page opens only runs under
the runs root (a picker; typed paths outside are refused without saying whether they exist),
a bad second run never hides the first, both manifests show and differing runs are flagged.
(Datasets outside the bundled names / data folder: tests/test_app_services.py.)"""

from __future__ import annotations

import pandas as pd
import pytest

pytestmark = pytest.mark.browser


def write(root, name: str, model: str, value: float):
    from workbench.runstore import write_run

    rows = [{"layer": layer, "head": head, "probe": "stats", "metric": "entropy", "value": value + layer + 0.1 * head,
             "ci_low": 0.0, "ci_high": 9.0} for layer in range(2) for head in range(4)]
    return write_run(root / name, pd.DataFrame(rows), {"model": model, "dataset": "induction"})


def test_runs_root_only_and_compare_keeps_the_first_run(dash_duo, make_app, ui, tmp_path):
    root = tmp_path / "runs"
    write(root, "run-a", "tiny-llama", 1.0)
    write(root, "run-b", "smollm2-135m", 2.0)
    dash_duo.start_server(make_app(runs_dir=root))
    ui.go_to("/runs", "#runs-open")
    ui.wait_until(lambda: "2 runs" in ui.text("#runs-root"), 10, "the runs root line")
    path = dash_duo.find_element("#runs-path")
    for outside in ("/etc", "../../etc", "/root", str(tmp_path / "nothing-here")):
        dash_duo.clear_input(path)
        path.send_keys(outside)
        dash_duo.find_element("#runs-open").click()
        ui.wait_until(lambda: f"'{outside}' is not a run under the runs root" in ui.text("#runs-message"), 10,
                      f"the refusal of {outside}")
        assert "exist" not in ui.text("#runs-message")
    dash_duo.select_dcc_dropdown("#runs-pick", value="run-a")
    ui.wait_until(lambda: path.get_attribute("value") == "run-a", 10, "the picked run")
    other = dash_duo.find_element("#runs-compare-path")
    other.send_keys("/etc")
    dash_duo.find_element("#runs-open").click()
    ui.wait_until(lambda: "second run not opened" in ui.text("#runs-message"), 10, "the second-run message")
    dash_duo.wait_for_element("#runs-graph .heatmaplayer", timeout=20)  # the first run still shows
    assert "Run: run-a" in ui.text("#runs-manifest")
    dash_duo.select_dcc_dropdown("#runs-compare-pick", value="run-b")
    ui.wait_until(lambda: other.get_attribute("value") == "run-b", 10, "the picked second run")
    dash_duo.find_element("#runs-open").click()
    ui.wait_until(lambda: "Compared with: run-b" in ui.text("#runs-manifest"), 20, "both manifests")
    ui.wait_until(lambda: "differ in model: tiny-llama vs smollm2-135m" in ui.text("#runs-warning"), 10,
                  "the differing-runs warning")
    dash_duo.wait_for_element("#runs-delta .heatmaplayer", timeout=20)
    ui.settle()
    assert dash_duo.get_logs() == []
