"""The real-browser harness (tests/browser.py) works: scripts run, screenshots save."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from tests.browser import WebDriver, browser_fixture, screenshot, text_of, wait_for  # noqa: F401

pytestmark = pytest.mark.servers

PAGE = """<!doctype html>
<html>
  <head><meta charset="utf-8"><title>harness</title></head>
  <body>
    <p id="status">not clicked</p>
    <button id="go" type="button">Go</button>
    <div style="height: 1500px; background: linear-gradient(#fff, #38f)"></div>
    <script src="app.js"></script>
  </body>
</html>
"""

SCRIPT = """document.getElementById("go").addEventListener("click", () => {
  document.getElementById("status").textContent = "clicked by app.js";
});
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A static site on 127.0.0.1 (stdlib http.server in a thread); yields its base URL."""
    root: Path = tmp_path_factory.mktemp("site")
    (root / "index.html").write_text(PAGE)
    (root / "app.js").write_text(SCRIPT)
    handler = functools.partial(_QuietHandler, directory=str(root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            thread.join(timeout=5)


def test_a_real_headless_chromium_runs_page_scripts_and_saves_screenshots(
    browser: WebDriver, site: str
) -> None:
    browser.get(site + "index.html")
    assert text_of(browser, "#status") == "not clicked"

    browser.find_element(By.ID, "go").click()
    wait_for(browser, lambda d: text_of(d, "#status") == "clicked by app.js")

    path = screenshot(browser, "browser-harness")
    assert path.is_file()
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width = int.from_bytes(png[16:20], "big")
    height = int.from_bytes(png[20:24], "big")
    assert width >= 1000
    assert height > 1500, "the screenshot covers the whole page, not only the 900 px viewport"
    assert browser.get_window_size()["height"] == 900, "the window is restored afterwards"
