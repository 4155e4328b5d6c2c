"""Real-browser tests of the Dash app: dash's ``dash_duo`` with Debian's chromium + chromedriver.

Needs ``apt-get install -y chromium chromium-driver`` (selenium 4.2, pinned by dash[testing],
drives it through ``/usr/bin/chromedriver``); the tests skip when chromedriver is missing.
Run: ``python -m pytest tests/browser -m browser --headless -q``.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from selenium.webdriver.chrome.options import Options

CHROME_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--window-size=1400,1000",
)


def pytest_setup_options():
    """Chromium options for dash's browser fixtures (root in a container, no network)."""
    options = Options()
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    binary = os.environ.get("DASH_TEST_CHROMEPATH") or shutil.which("chromium")
    if binary:
        options.binary_location = binary
    return options


def pytest_collection_modifyitems(config, items):
    if shutil.which("chromedriver"):
        return
    skip = pytest.mark.skip(reason="chromedriver not found: apt-get install -y chromium chromium-driver")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_app(tmp_path):
    """An app on tiny-llama (fast), with an empty runs folder."""
    from app.web.factory import create_app

    apps = []

    def build(**kwargs):
        kwargs.setdefault("runs_dir", tmp_path / "runs")
        app = create_app(kwargs.pop("model_name", "tiny-llama"), **kwargs)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.workspace.jobs.shutdown()


class UI:
    """Helpers over ``dash_duo`` shared by the browser tests."""

    def __init__(self, dash_duo) -> None:
        self.duo = dash_duo

    def wait_until(self, condition, timeout: float = 60.0, what: str = "condition"):
        """Poll ``condition()`` until truthy; returns its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def text(self, selector: str) -> str:
        """The text of the first match ("" when none); an element re-rendered between finding and
        reading it (stale) is looked up again."""
        from selenium.common.exceptions import StaleElementReferenceException

        for _ in range(5):
            found = self.duo.driver.find_elements("css selector", selector)
            try:
                return found[0].text if found else ""
            except StaleElementReferenceException:
                time.sleep(0.05)
        return ""

    def run_prompt(self, text: str, timeout: float = 90.0) -> None:
        """Type ``text`` on the Model & prompt page, press Run, wait for the token strip."""
        box = self.duo.find_element("#prompt-text")
        self.duo.clear_input(box)
        box.send_keys(text)
        self.duo.find_element("#prompt-run").click()
        self.wait_until(lambda: "tokens," in self.text("#prompt-summary"), timeout, "the analysis")
        self.duo.wait_for_element(".token-strip .tok")

    def type_into(self, selector: str, text: str) -> None:
        """Replace the text of an input (select all, delete, type) and press Enter."""
        from selenium.webdriver.common.keys import Keys

        box = self.duo.find_element(selector)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text, Keys.ENTER)

    def go_to(self, path: str, ready_selector: str) -> None:
        """Navigate with the header link (client-side) and wait for a page element."""
        self.duo.find_element(f"a.nav-link[href='{path}']").click()
        self.duo.wait_for_element(ready_selector, timeout=20)

    def settle(self, seconds: float = 0.8) -> None:
        """Let pending callbacks finish."""
        time.sleep(seconds)
        self.wait_until(lambda: not self.duo.driver.find_elements("css selector", "[data-dash-is-loading='true']"),
                        20, "callbacks to settle")

    def severe_logs(self) -> list:
        return self.duo.get_logs()


@pytest.fixture
def ui(dash_duo) -> UI:
    return UI(dash_duo)
