"""The dashboard in a real browser: Debian's headless Chromium driven by selenium through chromedriver.

Logs in with the keyboard, opens each page, follows a live log until new lines arrive without a
reload, cancels the run with the page's button. Screenshots of every page are saved as test artifacts
under test-artifacts/dashboard/ (ignored by git); the README's pictures are copies of them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import require
from test_dashboard import fns  # noqa: F401 (the same jobs and runs: chatty prints a line each 0.2 s, oops fails)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
@pytest.fixture(scope="module")
def browser():
    require(os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK),
            "chromium and chromium-driver (scripts/setup-browser.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 1000


def read(driver, selector: str) -> str:
    """An element's text, read in one script call: htmx may swap the element between two webdriver calls."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
                                 selector)


def text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def test_login_with_the_keyboard(plat, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(plat.url + "/_ui/runs")
    assert browser.current_url.endswith("/_ui/login")
    field = browser.switch_to.active_element  # the token field has the focus (autofocus)
    assert field.get_attribute("id") == "token"
    label = browser.find_element(By.CSS_SELECTOR, "label[for=token]")
    assert label.text == "Token"
    shot(browser, "login")
    field.send_keys(plat.token, Keys.ENTER)
    wait_for(browser, lambda d: d.current_url.endswith("/_ui/"))
    assert plat.token not in browser.current_url
    cookie = browser.get_cookie("opbox_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # scripts cannot read the session
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    skip = browser.switch_to.active_element
    assert skip.text == "Skip to content"  # the first stop of the keyboard


def test_each_page(plat, browser, fns):
    from selenium.webdriver.common.by import By

    failed = fns["oops"].runs(limit=1)[0]["id"]
    done = fns["chatty"].runs(limit=1)[0]["id"]
    pages = [
        ("overview", "/_ui/", "Busiest jobs"), ("jobs", "/_ui/jobs", "chatty"),
        ("job", f"/_ui/jobs/{fns['chatty'].job_id}", "Build log of version"),
        ("runs", "/_ui/runs", failed), ("runs-failed", "/_ui/runs?status=failed", failed),
        ("run-failed", f"/_ui/runs/{failed}", "missing thing"),
        ("run-succeeded", f"/_ui/runs/{done}", "Result"), ("maps", "/_ui/maps", "Maps"),
        ("services", "/_ui/services", "Services"), ("tokens", "/_ui/tokens", "bootstrap"),
    ]
    for name, path, expected in pages:
        browser.get(plat.url + path)
        assert expected in text(browser), name
        shot(browser, name)
    browser.get(plat.url + f"/_ui/runs/{failed}")
    assert "Remote traceback" in text(browser)
    browser.get(plat.url + "/_ui/maps")
    browser.find_element(By.CSS_SELECTOR, "a[href^='/_ui/maps/b-']").click()
    wait_for(browser, lambda d: "2 of 2 ended" in text(d))
    assert browser.find_element(By.TAG_NAME, "progress").get_attribute("value") == "2"
    shot(browser, "map")
    browser.get(plat.url + "/_ui/runs")
    browser.find_element(By.ID, "f-status").send_keys("failed")  # a select, chosen by typing
    browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    wait_for(browser, lambda d: "status=failed" in d.current_url)
    statuses = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "td .badge")}
    assert statuses == {"failed"}


def test_follow_a_live_log_and_cancel(plat, browser, fns):
    from selenium.webdriver.common.by import By

    run = fns["chatty"].submit(300)
    browser.get(plat.url + f"/_ui/runs/{run.id}")
    log = lambda d: read(d, "#log pre")  # noqa: E731
    wait_for(browser, lambda d: "line 1" in log(d))
    first = log(browser)
    browser.execute_script("window.notReloaded = true")  # gone if the page reloads
    wait_for(browser, lambda d: len(log(d)) > len(first) and "line 4" in log(d))
    assert browser.execute_script("return window.notReloaded === true")  # htmx swapped it in: no reload
    shot(browser, "run-live-log")
    browser.find_element(By.XPATH, "//button[normalize-space()='Cancel this run']").click()
    wait_for(browser, lambda d: read(d, "#status") == "cancelled")
    assert run.status()["status"] == "cancelled"
    assert not browser.find_elements(By.XPATH, "//button[normalize-space()='Cancel this run']")
    assert re.search(r"line \d+", log(browser))
    shot(browser, "run-cancelled")


def test_logout(plat, browser):
    from selenium.webdriver.common.by import By

    browser.get(plat.url + "/_ui/")
    browser.find_element(By.XPATH, "//button[normalize-space()='Log out']").click()
    wait_for(browser, lambda d: d.current_url.endswith("/_ui/login"))
    assert browser.get_cookie("opbox_session") is None
    browser.get(plat.url + "/_ui/runs")
    assert browser.current_url.endswith("/_ui/login")
