"""Issue 13 in a real browser: the pattern viewer on long (stats-mode) inputs, on tiny-llama.

The app is built with a low patterns limit so a ~300-token prompt is analysed in stats mode
(Q/K/LSE kept, tiles recomputed on demand), as a 4k-token prompt is with the default limits.
"""

from __future__ import annotations

import pytest

from app.web.services.workspace import Limits

pytestmark = pytest.mark.browser

LONG = " ".join(f"word{i % 37} is here." for i in range(80))  # ~300 tokens on tiny-llama


def slow_views(monkeypatch, seconds: float = 1.5) -> None:
    """Make the pattern figure as slow as on a 4k-token prompt (the server runs in this process)."""
    import time

    from app.web.services import patterns

    original = patterns.pattern_view

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(patterns, "pattern_view", slow)
    from app.web.callbacks import pattern as callbacks

    if hasattr(callbacks, "pattern_view"):
        monkeypatch.setattr(callbacks, "pattern_view", slow)


def test_stats_mode_pattern_map_is_drawn_on_first_open(dash_duo, make_app, ui, monkeypatch):
    """Bug 1: the first figure of a stats-mode prompt must appear without touching the controls
    (the graph's autosize relayout used to supersede the pending figure request)."""
    slow_views(monkeypatch, 3.0)
    dash_duo.start_server(make_app(limits=Limits(patterns=32)))
    ui.run_prompt(LONG)
    assert "stats mode" in ui.text("#prompt-summary")
    dash_duo.driver.get(dash_duo.server_url + "/pattern")  # a fresh page load, as after a reload
    ui.wait_until(lambda: dash_duo.driver.find_elements("css selector", "#pattern-graph .heatmaplayer image, "
                                                                        "#pattern-graph .heatmaplayer"),
                  20, "the pooled pattern map")
    ui.wait_until(lambda: "max over" in ui.text("#pattern-info"), 20, "the pooled-map info line")
    ui.settle(1.5)  # a late autosize relayout must not blank it either
    assert dash_duo.driver.find_elements("css selector", "#pattern-graph .heatmaplayer")
    assert dash_duo.get_logs() == []


def test_long_row_shows_every_key_and_its_top_keys(dash_duo, make_app, ui):
    """Bug 4: the row view of a long input showed only keys i-255..i; now the whole row (pooled to
    the plot width, exact on zoom) and the row's strongest keys wherever they are. Bug 8: a bad
    query position is refused beside the field, never moved to the last token."""
    
    app = make_app(limits=Limits(patterns=32))
    dash_duo.start_server(app)
    ui.run_prompt(LONG)
    n = int(ui.text("#prompt-summary").split(": ")[1].split(" tokens")[0])
    assert n > 300
    ui.go_to("/pattern", "#pattern-row")
    ui.wait_until(lambda: f"keys 0..{n - 1} of {n} (max-pooled" in ui.text("#pattern-row"), 30, "the whole row")
    ui.wait_until(lambda: len(dash_duo.find_elements("#pattern-topk table tbody tr")) == 8, 20, "the top keys")
    keys = [int(r.find_elements("css selector", "td")[0].text) for r in dash_duo.find_elements("#pattern-topk tbody tr")]
    from app.web.services import patterns

    (analysis,) = app.workspace.analyses._items.values()
    expected = [k for k, _, _ in patterns.top_keys(analysis, 0, 0, n - 1, 8)]  # over the whole exact row
    assert keys == expected
    for bad, says in (("99999", "query token 99999 is out of range"), ("1.5", "not a whole number"),
                      ("-3", "query token -3 is out of range")):
        ui.type_into("#pattern-query", bad)
        ui.wait_until(lambda: says in ui.text("#pattern-query-error"), 10, f"the refusal of {bad}")
    ui.type_into("#pattern-query", "40")
    ui.wait_until(lambda: "token 40" in ui.text("#pattern-row") and "keys 0..40 of 41 (exact)" in ui.text("#pattern-row"),
                  20, "the exact short row")
    assert ui.text("#pattern-query-error") == ""
    dash_duo.find_element("#pattern-options input[value='log']").click()
    ui.wait_until(lambda: "log10 weight" in ui.text("#pattern-graph"), 30, "the log-scale map")
    dash_duo.find_element("#pattern-options input[value='hide_bos']").click()
    ui.wait_until(lambda: "keys [1," in ui.text("#pattern-info"), 30, "the map without key 0")
    ui.settle()
    assert dash_duo.get_logs() == []
