"""The web page in a real headless browser: Debian's chromium, driven by Selenium through
Debian's chromedriver (both installed by scripts/install-test.sh), against a real server with
the bundled models, started as a user starts it (`nanodiffusion serve`, a subprocess). It fills
the form, generates, watches the progress bar and the live preview move, and gets decoded
images in the gallery; then the same with the unCLIP model. A missing browser fails the test: the
project's setup installs it."""
import io
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import httpx
from front_door import served

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
STEPS, SEED, SIDE = 20, 7, 64  # the bundled model draws 64x64


@pytest.fixture(scope="module")
def server():
    with served() as (url, _):  # no models dir: the bundled models
        for model in ("shapes", "shapes-unclip"):  # loaded before the page asks
            httpx.post(url + "/v1/images/generations", timeout=120,
                       json={"model": model, "prompt": "a red circle", "steps": 1})
        yield url


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        assert path.exists(), f"{path} is missing: run scripts/install-test.sh"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


# Records every change of the progress bar's width, the preview's source and visibility, and
# the status line, so that the test sees the progress move however fast the model is.
WATCH = """
window.seen = {widths: [], previews: 0, previewShown: false, status: []};
const watch = (el, attr, fn) => new MutationObserver(fn).observe(
    el, attr ? {attributes: true, attributeFilter: [attr]} : {childList: true});
watch(document.getElementById('bar'), 'style',
      () => seen.widths.push(document.getElementById('bar').style.width));
const p = document.getElementById('preview');
watch(p, 'src', () => { seen.previews += 1; });
watch(p, 'class', () => { seen.previewShown ||= !p.classList.contains('hidden'); });
const s = document.getElementById('status');
watch(s, null, () => seen.status.push(s.textContent));
"""


def _fill(driver, element_id, text):
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(text)


def test_page_generates_with_progress_and_gallery(server, browser, tmp_path):
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "shapes")
    _fill(browser, "prompt", "a red circle above a blue square")
    _fill(browser, "steps", str(STEPS))
    _fill(browser, "seed", str(SEED))
    browser.execute_script(WATCH)
    browser.find_element(By.ID, "go").click()

    imgs = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card .tile img"))
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery .tile img')].every(i => i.complete)"))
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('#gallery .tile img')]"
        ".map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[SIDE, SIDE]] * 4  # the form asks for 4 by default
    cols = browser.execute_script("return getComputedStyle(document.querySelector("
                                  "'#gallery .grid')).gridTemplateColumns.split(' ').length")
    assert cols == 2  # 4 results: a 2x2 grid
    params = browser.find_element(By.CSS_SELECTOR, "#gallery .card .params").text
    assert f"Seed: {SEED}" in params and f"Steps: {STEPS}" in params
    assert "Size: 64x64" in params

    seen = browser.execute_script("return window.seen")
    widths = [float(w.rstrip("%")) for w in seen["widths"] if w.endswith("%")]
    moving = [w for w in widths if 0 < w < 100]
    assert len(set(moving)) >= 2 and moving == sorted(moving), seen["widths"]
    assert widths[-1] == 100
    assert seen["previews"] >= 1 and seen["previewShown"], seen
    assert any(s.startswith("step ") for s in seen["status"]) and seen["status"][-1] == "done"

    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert Image.open(io.BytesIO(shot.read_bytes())).size[0] >= 800

    # The result's parameters go back to the form.
    _fill(browser, "prompt", "something else")
    browser.find_element(By.CSS_SELECTOR, '#gallery [data-act="form"]').click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == \
        "a red circle above a blue square"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert len(imgs) == 4


def test_page_generates_with_the_unclip_model(server, browser):
    browser.get(server + "/")
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "shapes")
    browser.execute_script("const m = document.getElementById('model'); m.value = "
                           "'shapes-unclip'; m.dispatchEvent(new Event('change'));")
    _fill(browser, "prompt", "a green star below a purple circle")
    _fill(browser, "steps", "6")
    _fill(browser, "seed", str(SEED))
    browser.execute_script(WATCH)
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: d.execute_script("return window.seen.status.slice(-1)[0] == 'done' || "
                                          "window.seen.status.some(s => /error|fail/i.test(s))"))
    seen = browser.execute_script("return window.seen")
    assert seen["status"][-1] == "done", seen["status"]
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery .tile img')].every(i => i.complete)"))
    params = browser.find_element(By.CSS_SELECTOR, "#gallery .card .params").text
    assert "Model: shapes-unclip" in params and "Steps: 6" in params
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('#gallery .card:first-child .tile img')]"
        ".map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes and all(s == [SIDE, SIDE] for s in sizes), sizes
