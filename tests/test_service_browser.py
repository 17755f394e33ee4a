"""The worklist page in a real browser (headless Chromium through Selenium and Debian's chromedriver): upload a
film through the page, see it in the worklist, open its study, toggle the heat map. Screenshots go to docs/ when
CXR_ONECLASS_SCREENSHOTS is set (they are in the README)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_oneclass.data.phantom import render
from test_service_api import Server

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM), reason="chromium and chromium-driver are not installed")
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(predicate, timeout: float = 60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - the page is still loading
            pass
        time.sleep(0.2)
    raise AssertionError("the page did not get there in time")


def test_upload_through_the_page_then_open_and_toggle_the_heat_map(tmp_path, browser, tiny_run):
    from selenium.webdriver.common.by import By

    run = tiny_run
    films = []
    for kind in ("normal", "effusion", "consolidation"):  # phantom films at the model's resolution x 8
        img = (render(1, size=256, seed=11, kind=kind)[0][0] * 255).round().astype(np.uint8)
        films.append(tmp_path / f"{kind}.png")
        Image.fromarray(img).save(films[-1])
    server = Server(run, tmp_path / "db.sqlite")
    shots = os.environ.get("CXR_ONECLASS_SCREENSHOTS")
    try:
        browser.get(server.url + "/")
        # Wait for it: headless Chromium can hand back an empty document for a moment after get() returns (seen once
        # in a fresh clone, page_source == '').
        _wait(lambda: "No studies yet" in browser.page_source)
        browser.find_element(By.ID, "file-input").send_keys("\n".join(str(f) for f in films))
        rows = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.study") if len(browser.find_elements(By.CSS_SELECTOR, "tr.study")) == 3 else None)
        assert browser.find_element(By.ID, "total").text == "3"
        flags = {r.find_element(By.CSS_SELECTOR, ".flag").text for r in rows}
        assert flags <= {"normal", "abnormal"}
        if shots:
            browser.save_screenshot(str(DOCS / "service_worklist.png"))
        rows[0].find_element(By.CSS_SELECTOR, "a.open").click()
        img = _wait(lambda: browser.find_element(By.CSS_SELECTOR, "img.film"))
        assert img.get_attribute("data-showing") == "thumbnail"
        browser.find_element(By.CSS_SELECTOR, "button.toggle").click()
        _wait(lambda: img.get_attribute("data-showing") == "heatmap")
        assert img.get_attribute("src").endswith("/heatmap.png")
        _wait(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img))
        if shots:
            browser.save_screenshot(str(DOCS / "service_study.png"))
        browser.find_element(By.CSS_SELECTOR, "button.toggle").click()
        _wait(lambda: img.get_attribute("data-showing") == "thumbnail")
    finally:
        server.stop()
