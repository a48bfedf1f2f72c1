"""The labeling page in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
sign in, label three pairs with the keyboard (one undone and labeled again), reach the done state,
and find exactly the three labels stored as the person saw them."""
import os
import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_labeling_api import pairs, thread_server

from labeling import store

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"


@pytest.fixture()
def browser() -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM and CHROMEDRIVER):
        # CI installs them (.ci/run), so there a missing browser is a failure, not a reason to skip.
        message = f"Debian's chromium and chromedriver are not on PATH: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)  # no sandbox: CI runs as root; /dev/shm may be small in containers
    # An explicit driver path keeps Selenium Manager from trying to download one (offline machines).
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_label_three_pairs_with_the_keyboard(tmp_path, browser):
    db = store.init_db(tmp_path / "labels.db")
    store.publish_batch(db, pairs(3), "b1")
    token = store.add_annotator(db, "alice")
    wait = WebDriverWait(browser, 15, poll_frequency=0.05)

    def text(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def visible(element_id: str) -> bool:
        return browser.find_element(By.ID, element_id).is_displayed()

    def press(*keys: str) -> None:
        ActionChains(browser).send_keys(*keys).perform()  # to whatever has focus, as a person types

    def next_pair(progress: str) -> tuple[str, str, str]:
        wait.until(lambda _: text("progress-text") == progress and visible("labeling"))
        return text("prompt"), text("left-text"), text("right-text")

    with thread_server(db) as url:
        browser.get(url + "/")
        wait.until(lambda _: visible("login"))
        browser.find_element(By.ID, "token").send_keys("wrong-token\n")
        wait.until(lambda _: "not accepted" in text("login-reason"))

        browser.get(f"{url}/?token={token}")
        first = next_pair("0 of 3")
        assert "token" not in browser.current_url  # moved to sessionStorage, out of the address bar
        assert text("who") == "signed in as alice"
        press("1", "w", "v")  # left better; right unsafe, category by its first letter: Violence
        press("\ue007")       # Enter
        second = next_pair("1 of 3")
        assert second[0] != first[0]
        press("2", "\ue007")
        next_pair("2 of 3")
        press("u")            # undo: the second pair comes back with the same sides
        assert next_pair("1 of 3") == second
        press("3", "q", "p", "\ue007")  # tie; left unsafe: Privacy Violation
        third = next_pair("2 of 3")
        press("1", "\ue007")
        wait.until(lambda _: visible("done"))
        assert text("progress-text") == "3 of 3" and "You labeled 3 pairs" in text("done-text")
        browser.save_screenshot(str(tmp_path / "done.png"))

    labels = store.export_labels(db, "b1").to_pylist()
    assert [r["prompt"] for r in labels] == [first[0], second[0], third[0]]
    for row, (_, left, right) in zip(labels, (first, second, third), strict=True):
        # The stored order is the one the page showed.
        assert (left, right) == ((row["response_a"], row["response_b"]) if row["display_order"] == "ab"
                                 else (row["response_b"], row["response_a"]))
    a_left = [r["display_order"] == "ab" for r in labels]
    # First pair: left better, right-shown answer unsafe (Violence).
    assert labels[0]["better"] == (0 if a_left[0] else 1)
    unsafe_side = "b" if a_left[0] else "a"
    assert (labels[0][f"is_safe_{unsafe_side}"], labels[0][f"harm_category_{unsafe_side}"]) == (False, "Violence")
    # Second pair, relabeled after the undo: a tie, left-shown answer unsafe (Privacy Violation).
    assert labels[1]["better"] == -1
    unsafe_side = "a" if a_left[1] else "b"
    assert (labels[1][f"is_safe_{unsafe_side}"], labels[1][f"harm_category_{unsafe_side}"]) == \
        (False, "Privacy Violation")
    # Third pair: left better, both safe.
    assert labels[2]["better"] == (0 if a_left[2] else 1)
    assert labels[2]["is_safe_a"] and labels[2]["is_safe_b"]
    assert {(r["annotator"], r["source"]) for r in labels} == {("alice", "human")}
