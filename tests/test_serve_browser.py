"""`icd serve` in a real browser: the server (uvicorn, in a thread, on a free port) and its page driven by headless
Chromium through selenium. Upload the example, invert, two edits; the history shows both beside the original, and
the downloaded PNG carries its record. The times from each click to its result being shown are written to a JSON
file under the test's tmp dir and printed (not asserted: they depend on the machine).

Debian's packages are used (`apt-get install chromium chromium-driver`), at their standard paths, so selenium never
downloads a browser or driver; without them, or without selenium, the test skips and says why. Setting
`ICD_SERVE_SCREENSHOT=docs/images/serve.png` also saves a screenshot of the page after the two edits.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from icdcli.cli.serve import missing_serve_modules

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SRC = "a red circle on a blue background"
TARGETS = ("a yellow circle on a blue background", "a red circle on a green background")

if missing_serve_modules():
    pytest.skip(f"icd serve needs {', '.join(missing_serve_modules())}: pip install -e '.[serve]'",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("selenium", reason="the browser test needs selenium: pip install -e '.[test]'")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        f"the browser test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
        "apt-get install chromium chromium-driver",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from icdcli.models.sources import DEFAULT_MODEL_DIR  # noqa: E402

DEFAULT_NAME = json.loads((DEFAULT_MODEL_DIR / "icd.json").read_text())["name"]

CLICK_UNTIL_SHOWN = """
const [button, id, attribute, done] = arguments;
const target = document.getElementById(id);
const before = target.dataset[attribute];
const started = performance.now();
const watch = new MutationObserver(() => {
  if (target.dataset[attribute] && target.dataset[attribute] !== before) {
    watch.disconnect();
    done(performance.now() - started);
  }
});
watch.observe(target, {attributes: true});
const status = document.getElementById("status");
const failed = new MutationObserver(() => {
  if (status.classList.contains("error")) { failed.disconnect(); done(-1); }
});
failed.observe(status, {attributes: true, childList: true, subtree: true});
document.getElementById(button).click();
"""
"""Click `button`, then wait in the page for `data-<attribute>` of element `id` to change: milliseconds, -1 on an
error line."""


@pytest.fixture(scope="module")
def server():
    from icdcli import ICDEditPipeline
    from icdcli.serve import ServerThread, create_app

    app = create_app(ICDEditPipeline.from_pretrained(device="cpu"))
    with ServerThread(app) as running:
        yield running


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,1000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(argument)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})  # fmt: skip
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_script_timeout(300)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def click_until(driver, button: str, element: str, attribute: str) -> float:
    milliseconds = driver.execute_async_script(CLICK_UNTIL_SHOWN, button, element, attribute)
    status = driver.find_element(By.ID, "status").text
    assert milliseconds >= 0, f"the page says: {status}"
    return milliseconds / 1000


def type_into(driver, element: str, text: str) -> None:
    field = driver.find_element(By.ID, element)
    field.clear()
    field.send_keys(text)


def downloaded(folder: Path, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [path for path in folder.iterdir() if path.suffix == ".png"]
        if done and not any(path.name.endswith(".crdownload") for path in folder.iterdir()):
            return done[0]
        time.sleep(0.05)
    raise AssertionError(f"nothing was downloaded into {folder} in {timeout:.0f} s")


@pytest.mark.slow
def test_invert_then_two_edits_in_the_browser(server, browser, tmp_path):
    from PIL import Image

    wait = WebDriverWait(browser, 120, poll_frequency=0.02)
    started = time.perf_counter()
    browser.get(server.url)
    wait.until(lambda d: DEFAULT_NAME in d.find_element(By.ID, "model").text)
    page_seconds = time.perf_counter() - started

    browser.find_element(By.ID, "file").send_keys(str(EXAMPLE.resolve()))
    type_into(browser, "src", SRC)
    invert_seconds = click_until(browser, "invert", "inversion", "id")
    timings = {"page_ready_s": round(page_seconds, 4), "invert_click_to_done_s": round(invert_seconds, 4)}

    type_into(browser, "tgt", TARGETS[0])
    timings["edit_1_click_to_shown_s"] = round(click_until(browser, "edit", "result", "shown"), 4)
    type_into(browser, "tgt", TARGETS[1])
    Select(browser.find_element(By.ID, "method")).select_by_value("swap")
    type_into(browser, "guidance", "5")
    timings["edit_2_click_to_shown_s"] = round(click_until(browser, "edit", "result", "shown"), 4)

    entries = browser.find_elements(By.CSS_SELECTOR, "#history .entry:not(.original)")
    assert [entry.find_element(By.CLASS_NAME, "target").text for entry in entries] == list(TARGETS)
    assert entries[1].find_element(By.CLASS_NAME, "settings").text.startswith("swap · guidance 5")
    timings["edit_1_server_s"], timings["edit_2_server_s"] = (float(e.get_attribute("data-seconds")) for e in entries)
    original = browser.find_element(By.ID, "history-original")
    assert original.is_displayed() and SRC in original.text
    assert browser.execute_script("return document.getElementById('history-original-image').naturalWidth") == 128
    for entry in entries:
        assert entry.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") == "128"
    result = browser.find_element(By.ID, "result")
    assert result.is_displayed() and result.get_attribute("data-shown") == entries[1].get_attribute("data-id")

    screenshot = os.environ.get("ICD_SERVE_SCREENSHOT")
    if screenshot:
        save_screenshot(browser, Path(screenshot))

    entries[0].find_element(By.LINK_TEXT, "Download PNG").click()
    png = downloaded(browser.downloads)
    with Image.open(png) as image:
        record = json.loads(image.text["icd"])
    assert record["tgt"] == TARGETS[0] and record["src"] == SRC and record["input"] == EXAMPLE.name
    assert png.name.endswith(f"{entries[0].get_attribute('data-id')}.png")

    report = tmp_path / "serve-browser-timings.json"
    report.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"\nicd serve in headless Chromium ({report}):\n{json.dumps(timings, indent=2)}")


def save_screenshot(browser, path: Path) -> None:
    """The page as a PNG, reduced to a palette (flat colours: a few tens of KB)."""
    import io

    from PIL import Image

    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


@pytest.mark.slow
def test_a_painted_region_in_the_browser(server, browser):
    """Paint the right part of the photo, edit: the result changes there and keeps the photo's own pixels left."""
    import io
    import urllib.request

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains

    wait = WebDriverWait(browser, 120, poll_frequency=0.02)
    browser.get(server.url)
    wait.until(lambda d: DEFAULT_NAME in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(EXAMPLE.resolve()))
    type_into(browser, "src", SRC)
    canvas = browser.find_element(By.ID, "region")
    wait.until(lambda d: canvas.is_displayed())
    assert not browser.find_element(By.ID, "clear-region").is_enabled()  # nothing painted yet
    width, height = canvas.size["width"], canvas.size["height"]
    browser.execute_script("document.getElementById('brush').value = 80")
    stroke = ActionChains(browser).move_to_element_with_offset(canvas, int(width * 0.3), -int(height * 0.45))
    stroke.click_and_hold().move_by_offset(0, int(height * 0.9)).release().perform()
    assert browser.find_element(By.ID, "clear-region").is_enabled()

    type_into(browser, "tgt", TARGETS[0])
    click_until(browser, "edit", "result", "shown")
    entry = browser.find_elements(By.CSS_SELECTOR, "#history .entry:not(.original)")[-1]
    assert "painted region" in entry.find_element(By.CLASS_NAME, "settings").text
    source = browser.find_element(By.ID, "result").get_attribute("src")
    with urllib.request.urlopen(source) as response:
        served = Image.open(io.BytesIO(response.read()))
        record = json.loads(served.text["icd"])
        pixels = np.asarray(served.convert("RGB"), dtype=np.int16)
    assert record["mask"] == "(uploaded)" and record["mask_sha256"].startswith("sha256:")
    photo = np.asarray(Image.open(EXAMPLE).convert("RGB"), dtype=np.int16)
    assert np.array_equal(pixels[:, :56], photo[:, :56])  # unpainted, beyond the feathered edge: the photo exactly
    assert np.abs(pixels[:, 84:100] - photo[:, 84:100]).mean() > 8.0  # painted over the circle's edge: edited

    browser.find_element(By.ID, "clear-region").click()  # cleared: the next edit may change all of it
    assert not browser.find_element(By.ID, "clear-region").is_enabled()
