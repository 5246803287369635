"""GET /: the swap page, driven in a real headless Chromium against a live `koff serve`: type a
prompt, choose two memories and `auto`, and see every stream finish with the text the API gives."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("KOFF_REQUIRE_BROWSER") == "1"  # CI: a missing browser fails instead of skipping


def _browser():
    if REQUIRED:
        assert CHROMIUM and DRIVER, "KOFF_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed"
    if not REQUIRED:
        pytest.importorskip("selenium", reason="selenium comes with the test extra")
        if not (CHROMIUM and DRIVER):
            pytest.skip("no chromium + chromedriver (Debian: apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def test_the_page_is_self_contained(server):
    status, headers, body = server.raw("GET", "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "<script" in page and "/v1/completions" in page
    assert "http://" not in page and "https://" not in page  # no external assets


def test_two_memories_and_auto_stream_side_by_side_with_the_api_texts(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prompt, chosen = "le chat est", ["en", "fr", "auto"]
    c = server.client()
    want = {m: c.completions.create(model=m, prompt=prompt, max_tokens=12, temperature=0) for m in chosen}
    driver = _browser()
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        driver.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[data-memory='fr']"))
        names = [e.get_attribute("value") for e in driver.find_elements(By.CSS_SELECTOR, "input[name=memory]")]
        assert {"en", "fr", "es", "none", "auto"} <= set(names)
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        max_tokens = driver.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("12")
        for m in chosen:
            driver.find_element(By.CSS_SELECTOR, f"input[data-memory='{m}']").click()
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".col[data-state='done']")) == len(chosen))
        shot = Path(os.environ.get("KOFF_SCREENSHOT", tmp_path / "swap.png"))
        driver.save_screenshot(str(shot))
        for m in chosen:
            col = driver.find_element(By.CSS_SELECTOR, f".col[data-memory='{m}']")
            text = driver.execute_script("return arguments[0].querySelector('pre').textContent", col)
            assert text == want[m].choices[0].text, m
        pick = driver.find_element(By.CSS_SELECTOR, ".col[data-memory='auto'] .pick").get_attribute("data-pick")
        assert pick == want["auto"].model  # the memory auto chose, marked on the page
    finally:
        driver.quit()
