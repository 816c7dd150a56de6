"""The gallery in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) through Selenium. Without them the tests skip, unless
``VIZCNN_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs them) makes that a failure."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import vizcnn
from vizcnn.render.gallery import write_gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SHOTS = Path(os.environ.get("VIZCNN_SCREENSHOTS", "")) if os.environ.get(
    "VIZCNN_SCREENSHOTS") else None


@pytest.fixture(scope="module")
def browser():
    # Why a skip at all: the browser is a system package, not a pip dependency, so a developer
    # without it still runs the rest of the suite. CI sets VIZCNN_REQUIRE_BROWSER=1, where a
    # missing browser is a failure, so these tests always run there.
    if not (CHROMIUM and DRIVER):
        if os.environ.get("VIZCNN_REQUIRE_BROWSER") == "1":
            pytest.fail("VIZCNN_REQUIRE_BROWSER=1 but chromium or chromedriver is missing")
        # reason: a system package, not pip's; CI requires it (above), so it never skips there
        pytest.skip(reason="needs Debian's chromium and chromium-driver (apt-get install -y "
                           "chromium chromium-driver); a system package, so a developer without "
                           "it runs the rest; CI (VIZCNN_REQUIRE_BROWSER=1) fails instead")
    from selenium import webdriver  # a test dependency: its absence is a failure
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _all_images_loaded(driver) -> None:
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src'));")
    assert broken == [], broken
    assert driver.execute_script("return document.images.length") > 0


def _no_console_errors(driver) -> None:
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors


def _shot(driver, name: str, tmp: Path) -> None:
    path = (SHOTS or tmp) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000


def test_walk_the_demo_gallery_by_clicking(browser, tmp_path):
    from selenium.webdriver.common.by import By

    site = tmp_path / "site"
    write_gallery(vizcnn.load_model("demo"), "shapes:120", site,
                  layers=["features.3", "features.8"], channels=list(range(12)),
                  checkpoints=["demo:0", "demo:5", "demo"], progress=False)
    browser.get((site / "index.html").as_uri())
    _all_images_loaded(browser)
    _no_console_errors(browser)
    health = browser.find_elements(By.CSS_SELECTOR, "#health tr td:first-child")
    assert [cell.text for cell in health] == ["features.3", "features.8"]
    settled = browser.find_element(By.CSS_SELECTOR, "img[alt^='settledness']")
    assert settled.is_displayed() and settled.size["width"] > 300
    _shot(browser, "gallery_index.png", tmp_path)

    browser.find_element(By.LINK_TEXT, "features.8").click()
    assert browser.title == "features.8"
    _all_images_loaded(browser)
    cards = lambda: [c.get_attribute("data-channel")  # noqa: E731
                     for c in browser.find_elements(By.CSS_SELECTOR, ".card")]
    assert cards() == [str(c) for c in range(12)]
    strongest = {c.get_attribute("data-channel"): float(c.get_attribute("data-strongest"))
                 for c in browser.find_elements(By.CSS_SELECTOR, ".card")}
    browser.find_element(By.CSS_SELECTOR, "button[data-key='strongest']").click()
    order = cards()
    assert order != [str(c) for c in range(12)]
    assert [strongest[c] for c in order] == sorted(strongest.values(), reverse=True)
    dead = [c.get_attribute("data-channel") for c in browser.find_elements(
        By.CSS_SELECTOR, ".card[data-dead='1']")]
    browser.find_element(By.ID, "hide-dead").click()
    shown = [c.get_attribute("data-channel") for c in browser.find_elements(By.CSS_SELECTOR,
                                                                             ".card")
             if c.is_displayed()]
    assert set(shown) == {str(c) for c in range(12)} - set(dead)
    browser.find_element(By.ID, "show-vis").click()  # the cards show feature visualizations
    assert all(not a.is_displayed() for a in browser.find_elements(By.CSS_SELECTOR, ".card .top"))
    assert all(c.find_element(By.CSS_SELECTOR, ".vis").is_displayed()
               for c in browser.find_elements(By.CSS_SELECTOR, ".card") if c.is_displayed())
    browser.find_element(By.ID, "show-vis").click()
    _no_console_errors(browser)
    _shot(browser, "gallery_layer.png", tmp_path)

    browser.find_element(By.LINK_TEXT, f"channel {shown[0]}").click()
    assert browser.title == f"features.8 channel {shown[0]}"
    _all_images_loaded(browser)
    strip = browser.find_elements(By.CSS_SELECTOR, ".strip figcaption")
    assert [caption.text for caption in strip] == ["epoch 0", "epoch 5", "epoch 20"]
    _no_console_errors(browser)
    _shot(browser, "gallery_channel.png", tmp_path)
    browser.find_element(By.LINK_TEXT, "index").click()
    assert browser.title.startswith("vizcnn gallery")
