"""Issue 13 bugs 5-7 in a real browser (tiny-llama): a job behind another session's job says
so with its place in the queue and cancels at once there; a probe that cannot run on the
prompt is refused before anything runs; a bad sample count is refused beside its field."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.browser

PROMPT = "The cat sat on the mat. The cat sat on the mat."


def test_queued_run_says_it_waits_for_the_model_and_cancels_at_once(dash_duo, make_app, ui):
    app = make_app()
    dash_duo.start_server(app)
    gate = threading.Event()
    other = app.workspace.jobs.submit(  # another session's long job holds the model
        "other session", lambda ctx: (ctx.progress(0.9, "probe sinks"), gate.wait(120)))
    try:
        box = dash_duo.find_element("#prompt-text")
        box.send_keys(PROMPT)
        dash_duo.find_element("#prompt-run").click()
        ui.wait_until(lambda: "waiting for the model (another job is running): position 1"
                      in ui.text("#prompt-job-status"), 20, "the queue message")
        assert "probe sinks" not in ui.text("#prompt-job-status")
        dash_duo.find_element("#prompt-job-cancel").click()
        ui.wait_until(lambda: "cancelled" in ui.text("#prompt-job-status"), 5, "the cancel while waiting")
        dash_duo.find_element("#prompt-run").click()
        ui.wait_until(lambda: "position 1" in ui.text("#prompt-job-status"), 20, "the queue message again")
    finally:
        gate.set()
    ui.wait_until(lambda: "tokens," in ui.text("#prompt-summary"), 60, "the analysis once the model is free")
    assert app.workspace.jobs.status(other)["state"] == "done"
    ui.settle()
    assert dash_duo.get_logs() == []


def test_probe_requirements_are_checked_before_running(dash_duo, make_app, ui):
    dash_duo.start_server(make_app())
    ui.run_prompt(PROMPT)
    ui.go_to("/heads", "#headmap-compute")
    dash_duo.select_dcc_dropdown("#headmap-probe", value="importance")
    ui.wait_until(lambda: "importance" in ui.text("#headmap-probe"), 10, "the importance choice")
    dash_duo.find_element("#headmap-compute").click()
    ui.wait_until(lambda: "cannot run on this prompt" in ui.text("#headmap-message"), 10, "the pre-check")
    assert ">= 2 samples" in ui.text("#headmap-message")
    assert ui.text("#headmap-job-status") == "idle"  # nothing was started
    dash_duo.select_dcc_dropdown("#headmap-source", value="induction")
    ui.type_into("#headmap-source-n", "100000")
    dash_duo.find_element("#headmap-compute").click()
    ui.wait_until(lambda: "samples 100000 is out of range" in ui.text("#headmap-source-n-error"), 10,
                  "the refused sample count")
    assert ui.text("#headmap-job-status") == "idle"
    ui.settle()
    assert dash_duo.get_logs() == []
