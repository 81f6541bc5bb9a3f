"""Headless Chromium through selenium for the MLflow UI tests: the system's Chromium and chromedriver
(Debian/Ubuntu: `apt-get install chromium chromium-driver`; `.ci/run` installs them), no download at test time."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIRE_ENV = "VFM_REQUIRE_BROWSER"  # .ci/run sets it: there the browser test must run, never skip
INSTALL_HINT = ("install Chromium and its driver to run the MLflow UI browser test: "
                "`apt-get install chromium chromium-driver` (Debian/Ubuntu; .ci/run does this)")


def artifacts_dir() -> Path:
    """Where CI keeps what a run leaves for people to look at (screenshots): $VFM_CI_ARTIFACTS or .ci/artifacts."""
    out = Path(os.environ.get("VFM_CI_ARTIFACTS") or REPO / ".ci" / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _binaries() -> tuple[str, str] | None:
    browser = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium WebDriver; skips the test, saying how to install it, only when there is none."""
    found = _binaries()
    if found is None:
        if os.environ.get(REQUIRE_ENV):  # CI installed them: a missing browser there is a broken CI, not a skip
            pytest.fail(f"no Chromium/chromedriver on PATH although {REQUIRE_ENV} is set: {INSTALL_HINT}")
        pytest.skip(f"no Chromium/chromedriver on PATH: {INSTALL_HINT}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; /dev/shm is small in containers
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Any, check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll `check` (the MLflow UI is a React app that fills in after load) until it is truthy; on timeout fail
    with `what`, the page's URL and the start of its text."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # a stale element while React re-renders: poll again
            if got := check():
                return got
        if time.monotonic() > deadline:
            shot = artifacts_dir() / "failure.png"
            driver.save_screenshot(str(shot))
            text = driver.find_element("tag name", "body").text[:2000]
            pytest.fail(f"MLflow UI: no {what} within {timeout:.0f} s at {driver.current_url} (screenshot: {shot})"
                        f"\npage text:\n{text}")
        time.sleep(0.5)


def page_text(driver: Any) -> str:
    return driver.find_element("tag name", "body").text
