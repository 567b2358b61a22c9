"""Real-browser tests: headless Chromium from Debian's packages, driven by Selenium.

For tests of pages that run scripts (the portal). Chromium and its driver come
from apt (`apt-get install chromium chromium-driver`; .ci/run installs them),
never from the internet: both paths are passed to Selenium explicitly, so
Selenium Manager never runs and nothing is downloaded.

    from tests.browser import WebDriver, browser_fixture, screenshot  # noqa: F401 (fixture)

    def test_something(browser: WebDriver) -> None:
        browser.get(url)
        ...

`browser` (defined as browser_fixture) is module-scoped: one Chromium per test
module, since starting one costs as much as several page loads. It FAILS, never
skips, when Chromium is missing. Outside pytest, use `open_browser()`.

Environment: TOLLWAY_CHROMIUM and TOLLWAY_CHROMEDRIVER override the binaries
(a name on PATH or a path); TOLLWAY_ARTIFACTS is where screenshots go (default
<repo>/.tollway/artifacts/).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

__all__ = [
    "INSTALL_HINT",
    "WebDriver",
    "artifacts_dir",
    "browser_fixture",
    "find_chromium",
    "open_browser",
    "require_chromium",
    "screenshot",
    "text_of",
    "wait_for",
]

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMEDRIVER_NAMES = ("chromedriver",)
INSTALL_HINT = (
    "headless Chromium is missing: run `apt-get install chromium chromium-driver` "
    "(.ci/run installs them), or point TOLLWAY_CHROMIUM / TOLLWAY_CHROMEDRIVER at the binaries"
)
PAGE_LOAD_TIMEOUT_S = 15.0
FULL_PAGE_MAX_HEIGHT = 4000

# Chromium's own background traffic (component updates, sync, metrics) is off:
# tests must not depend on, or wait for, the network.
_CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",  # tests run as root in CI; Chromium refuses its sandbox then
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--password-store=basic",
    "--hide-scrollbars",
    "--mute-audio",
)


def _which(override_var: str, names: tuple[str, ...]) -> str | None:
    override = os.environ.get(override_var)
    if override:
        return shutil.which(override)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def find_chromium() -> tuple[str, str] | None:
    """(chromium binary, chromedriver binary), or None when either is missing."""
    chromium = _which("TOLLWAY_CHROMIUM", CHROMIUM_NAMES)
    driver = _which("TOLLWAY_CHROMEDRIVER", CHROMEDRIVER_NAMES)
    if chromium is None or driver is None:
        return None
    return chromium, driver


def require_chromium() -> tuple[str, str]:
    """find_chromium(), or fail the current test (not skip) with how to install it."""
    found = find_chromium()
    if found is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return found


@contextlib.contextmanager
def open_browser(*, width: int = 1280, height: int = 900) -> Iterator[WebDriver]:
    """A fresh headless Chromium (own temporary profile); always quit on exit."""
    found = find_chromium()
    if found is None:
        raise RuntimeError(INSTALL_HINT)
    chromium, chromedriver = found
    # Only Selenium Manager reads these, and it never runs (the driver path is
    # given); set anyway so a future Selenium cannot phone home or download.
    os.environ.setdefault("SE_AVOID_STATS", "true")
    os.environ.setdefault("SE_OFFLINE", "true")
    with tempfile.TemporaryDirectory(prefix="tollway-chromium-", ignore_cleanup_errors=True) as d:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in _CHROMIUM_ARGS:
            options.add_argument(arg)
        options.add_argument(f"--window-size={width},{height}")
        options.add_argument(f"--user-data-dir={d}")
        service = Service(executable_path=chromedriver)
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.implicitly_wait(0)
            driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
            yield driver
        finally:
            try:
                driver.quit()  # closes Chromium, then stops chromedriver
            finally:
                service.stop()  # idempotent; in case quit() raised before it


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[WebDriver]:
    """One headless Chromium for the test module; fails (not skips) when it is missing."""
    require_chromium()
    with open_browser() as driver:
        yield driver


def artifacts_dir() -> Path:
    """TOLLWAY_ARTIFACTS, else <repo>/.tollway/artifacts/ (gitignored); created."""
    configured = os.environ.get("TOLLWAY_ARTIFACTS")
    path = Path(configured) if configured else REPO / ".tollway" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save a PNG of the whole page (up to 4000 px tall) as artifacts_dir()/<name>.png."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.removesuffix(".png")).strip("._") or "screenshot"
    path = artifacts_dir() / f"{stem}.png"
    size = driver.get_window_size()
    chrome_px = int(driver.execute_script("return window.outerHeight - window.innerHeight") or 0)
    page_px = int(
        driver.execute_script(
            "return Math.max(document.documentElement.scrollHeight,"
            " document.body ? document.body.scrollHeight : 0)"
        )
    )
    tall = min(max(page_px + chrome_px, size["height"]), FULL_PAGE_MAX_HEIGHT)
    try:
        if tall != size["height"]:
            driver.set_window_size(size["width"], tall)
        if not driver.save_screenshot(str(path)):
            raise RuntimeError(f"Chromium could not take a screenshot to {path}")
    finally:
        if tall != size["height"]:
            driver.set_window_size(size["width"], size["height"])
    return path


def wait_for(driver: WebDriver, predicate: Callable[[WebDriver], T], timeout: float = 5.0) -> T:
    """Poll predicate(driver) until it is truthy; return its value (TimeoutException after)."""
    wait: WebDriverWait[WebDriver] = WebDriverWait(driver, timeout, poll_frequency=0.05)
    return wait.until(predicate)


def text_of(driver: WebDriver, css: str) -> str:
    """The visible text of the first element matching the CSS selector."""
    return driver.find_element(By.CSS_SELECTOR, css).text
