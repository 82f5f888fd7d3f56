"""The station's web app in a real browser (Debian's chromium + chromedriver, driven by selenium, headless) against a
real `clad serve` process on 127.0.0.1 with two tiny models: upload, result, verdict, threshold, teach, versions,
blind rating, and the API's error sentences on the pages.

Screenshots of every page go to $CLAD_SCREENSHOTS (default: a temporary folder). With CI=true a missing browser
fails these tests instead of skipping them.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import plant_square, texture

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
KEY = "s3cret-station-key"
WAIT_S = 60  # the longest a page may take to show what a step waits for (tiny models on 2 busy cores)


def _browser_parts() -> tuple[str, str]:
    """The chromium and chromedriver executables; skip (fail in CI) when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if CI:
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    return chromium, driver


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("CLAD_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = _browser_parts()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--lang=en-GB", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


class Station:
    """The station under test: its URL, its models, and the API calls the test makes around the browser (with the key)."""

    def __init__(self, url: str, models: list[str]):
        import httpx

        self.url, self.models = url, models
        self.client = httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": KEY}, timeout=WAIT_S)

    def _ok(self, r):
        assert r.status_code < 300, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
        return r

    def get(self, path: str):
        return self._ok(self.client.get(path)).json()

    def get_bytes(self, path: str) -> bytes:
        return self._ok(self.client.get(path)).content

    def model(self, name: str) -> dict:
        return next(m for m in self.get("/models") if m["name"] == name)

    def inspect(self, name: str, data: bytes, source: str | None = None) -> dict:
        return self._ok(self.client.post(f"/models/{name}/inspect", params={"source": source} if source else None,
                                         files={"file": ("part.png", data, "image/png")})).json()

    def set_threshold(self, name: str, threshold: float) -> dict:
        return self._ok(self.client.post(f"/models/{name}/threshold", json={"threshold": threshold})).json()


@pytest.fixture(scope="module")
def station(browser, tmp_path_factory):
    """`clad serve` (a real process on 127.0.0.1, a free port) with an API key and two tiny models: `knn`
    (patch_knn, which learns from verdicts) and `spade`."""
    try:
        import fastapi  # noqa: F401
    except ImportError:
        if CI:
            pytest.fail("CI=true but the app extra (fastapi) is not installed")
        pytest.skip("the app extra (fastapi, uvicorn, ...) is not installed: pip install -e '.[app]'")
    import clad
    from serve_helpers import Server

    root = tmp_path_factory.mktemp("webapp_station")
    normal = [texture((64, 64), seed) for seed in range(4)]
    dirs = [clad.create_detector(detector, backbone="tiny_cnn", image_size=64).fit(normal).save(root / name)
            for name, detector in (("knn", "patch_knn"), ("spade", "spade"))]
    key_file = root / "key.txt"
    key_file.write_text(KEY + "\n")
    server = Server([*map(str, dirs), "--data-dir", str(root / "station"), "--api-key-file", str(key_file)])
    try:
        server.wait_ready()
        station = Station(server.url, ["knn", "spade"])
        yield station
        station.client.close()
    finally:
        server.stop()


# -- helpers ------------------------------------------------------------------------------------------------------
class Page:
    """The browser on the station: navigation that waits for the page to be drawn, waits, screenshots."""

    def __init__(self, driver, base: str, shots: Path):
        self.d, self.base, self.shots = driver, base, shots

    def go(self, route: str):
        """Open #/route and wait until its page has rendered (the router marks #view with data-ready)."""
        if not self.d.current_url.startswith(self.base):
            self.d.get(f"{self.base}/#/{route}")
        else:
            self.d.execute_script("document.getElementById('view').removeAttribute('data-ready');"
                                  "if (location.hash === '#/' + arguments[0]) dispatchEvent(new HashChangeEvent('hashchange'));"
                                  "else location.hash = '#/' + arguments[0];", route)
        self.css("#view[data-ready]")
        self.console_ok()

    def css(self, selector: str, timeout: float = WAIT_S):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.d, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, selector)),
                                                    f"no {selector} on {self.d.current_url}")

    def all(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.CSS_SELECTOR, selector)

    def until(self, condition, what: str, timeout: float = WAIT_S):
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:  # a page redrawn while the condition reads it is read again
            return WebDriverWait(self.d, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda _: condition(), f"{what} on {self.d.current_url}")
        except TimeoutException:
            self.shot("failed")  # what the page showed instead
            raise

    def text(self, selector: str) -> str:
        return self.css(selector).text

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def shot(self, name: str):
        self.js("window.scrollTo(0, 0)")
        self.d.save_screenshot(str(self.shots / f"{name}.png"))

    def console_ok(self):
        """No script error in the browser's console (failed image or API requests are expected: 404, 401, 422)."""
        errors = [e["message"] for e in self.d.get_log("browser")
                  if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
        assert not errors, errors


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def newest(model: dict) -> dict:
    return max(model["versions"], key=lambda v: v["version"])


def drop_files(page: Page, selector: str, files: dict[str, bytes]):
    """Drop files on an element as a user dragging them from the desktop would (a DataTransfer on a drop event)."""
    page.js("""
        const [selector, files] = arguments;
        const dt = new DataTransfer();
        for (const [name, b64] of Object.entries(files)) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          dt.items.add(new File([bytes], name, { type: name.endsWith('.png') ? 'image/png' : 'text/plain' }));
        }
        const zone = document.querySelector(selector);
        zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    """, selector, {name: base64.b64encode(data).decode() for name, data in files.items()})


# -- the flow -----------------------------------------------------------------------------------------------------
def test_operator_flow_in_a_browser(browser, station, shots, tmp_path):
    """Upload (refused without the station's key, then accepted), see the result, give verdicts (a button, then the
    review queue's keyboard), see them change the threshold page's counts, apply a threshold, teach the confirmed
    normals, see the new version, roll back, rate blind, and see an error page."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    page = Page(browser, station.url, shots)
    model = station.models[0]

    # the feed of an empty station
    page.go("feed")
    page.css(".feed .empty")

    # the upload page: without the station's key the upload is refused, and the page says why
    page.go("upload")
    Select(page.css("#upload-model")).select_by_value(model)
    normal_png = tmp_path / "part_normal.png"
    normal_png.write_bytes(png_bytes(texture((64, 64), 101)))
    page.css("#upload-file").send_keys(str(normal_png))
    refused = page.css(".result[data-error]")
    assert refused.get_attribute("data-error") == "401" and "API key" in refused.text
    page.shot("upload_refused")
    # with the key: one file chosen, two dropped (one of them not an image)
    page.css("#api-key").send_keys(KEY, Keys.ENTER)
    page.css("#upload-file").send_keys(str(normal_png))
    defect, _ = plant_square(texture((64, 64), 102), 20, 24, 14, value=255)
    drop_files(page, "#dropzone", {"part_defect.png": png_bytes(defect), "notes.txt": b"not an image at all"})
    page.until(lambda: len(page.all(".result[data-id]")) == 2 and page.all(".result[data-error='422']"),
               "two inspected uploads and one refused")
    bad = page.css(".result[data-error='422']")
    assert "notes.txt" in bad.text and "Error 422" in bad.find_element(By.CSS_SELECTOR, ".error").text
    ok = page.all(".result[data-id]")
    for row in ok:
        assert row.find_element(By.CSS_SELECTOR, ".badge").text in ("DEFECT", "NORMAL")
        assert row.find_element(By.CSS_SELECTOR, ".sentence").text
    page.shot("upload")
    ids = sorted(int(r.get_attribute("data-id")) for r in ok)
    defect_id = next(int(r.get_attribute("data-id")) for r in ok if r.get_attribute("data-file") == "part_defect.png")

    # two more normal images straight through the API (a camera), so that there are several to review and teach
    for seed in (103, 104):
        ids.append(station.inspect(model, png_bytes(texture((64, 64), seed)), source="camera-2")["id"])

    # the live feed shows them without a reload (it polls)
    page.go("feed")
    page.until(lambda: len(page.all("#feed-cards .card")) + len(page.all(".latest[data-id]")) == len(ids), "every inspection in the feed")
    assert page.css(".latest[data-id]").get_attribute("data-id") == str(max(ids))
    page.until(lambda: page.js("return [...document.querySelectorAll('.card img, .latest img')].every(i => i.complete && i.naturalWidth > 0)"),
               "the thumbnails loaded")
    page.shot("feed")

    # the threshold page before any verdict: no counts yet
    page.go("threshold")
    Select(page.css("#threshold-model")).select_by_value(model)
    page.css("#histogram")
    before = {k: int(page.text(f"#cm-{k}").split()[0]) for k in ("tp", "fp", "fn", "tn")}
    assert before == {"tp": 0, "fp": 0, "fn": 0, "tn": 0}

    # the inspection page of the defective upload: heatmap, slider, sentence, nearest patch, verdict form
    page.go(f"inspection/{defect_id}")
    assert page.text("#score") and page.text("#sentence")
    page.until(lambda: page.js("const i = document.querySelector('.viewer img.heat'); return i && i.complete && i.naturalWidth > 0"),
               "the heatmap loaded")
    page.js("const s = document.getElementById('opacity'); s.value = 80; s.dispatchEvent(new Event('input'))")
    assert page.js("return document.querySelector('.viewer img.heat').style.opacity") == "0.8"
    page.shot("inspection")
    page.css("#defect-type").send_keys("bright spot")
    page.css("#verdict-note").send_keys("found by the browser test")
    page.css("#operator").send_keys("Ada")
    page.css(".rating button[data-rating='4']").click()
    page.css("#verdict-defect").click()
    page.until(lambda: "defect: bright spot" in page.text("#verdict .current-verdict"), "the saved verdict shown")
    assert "Ada" in page.text("#verdict .current-verdict")
    saved = station.get(f"/inspections/{defect_id}")["verdict"]
    assert saved["verdict"] == "defect" and saved["rating"] == 4 and saved["note"] == "found by the browser test"

    # the review queue, by keyboard: n on every unreviewed image (the normal ones)
    page.go("review")
    Select(page.css("#review-model")).select_by_value(model)
    page.until(lambda: page.text("#queue-count") == str(len(ids) - 1), "the unreviewed ones queued")
    page.shot("review")
    for remaining in range(len(ids) - 2, -1, -1):
        page.css("#review-detail .insp")
        page.js("document.activeElement.blur()")  # keys go to the page, not to the model picker
        ActionChains(browser).send_keys("n").perform()
        page.until(lambda r=remaining: page.text("#queue-count") == str(r), f"{remaining} left in the queue")
    page.css("#review-detail .empty")
    normals = [i for i in ids if i != defect_id]
    assert all(station.get(f"/inspections/{i}")["verdict"]["operator"] == "Ada" for i in normals)

    # the threshold page now counts the verdicts; the slider changes the counts; apply writes a new version
    page.go("threshold")
    page.css("#histogram")
    after = {k: int(page.text(f"#cm-{k}").split()[0]) for k in ("tp", "fp", "fn", "tn")}
    assert after["tp"] + after["fn"] == 1 and after["fp"] + after["tn"] == len(normals) and after != before
    assert len(page.all("#histogram rect.bar-normal")) >= 1 and len(page.all("#histogram rect.bar-defect")) == 1
    scores = station.get(f"/models/{model}/scores")["items"]
    lowest = min(s["score"] for s in scores)
    page.js("const n = document.getElementById('threshold-value'); n.value = arguments[0]; n.dispatchEvent(new Event('input'))",
            lowest - 1e-3 * max(1.0, abs(lowest)))
    flagged_all = {k: int(page.text(f"#cm-{k}").split()[0]) for k in ("tp", "fp", "fn", "tn")}
    assert flagged_all == {"tp": 1, "fp": len(normals), "fn": 0, "tn": 0}
    assert page.text("#stat-recall").startswith("100")
    page.shot("threshold")
    version_before = station.model(model)["version"]
    page.css("#threshold-apply").click()
    page.css("#threshold-applied")
    applied = station.model(model)
    assert applied["version"] == version_before + 1 and newest(applied)["reason"] == "threshold"

    # the models page: teach the confirmed normals, see the new version, roll back to the one before
    page.go("models")
    card = f"section[data-model='{model}']"
    if station.model(model)["can_add_references"]:
        page.until(lambda: f"{len(normals)} confirmed normal" in page.text(f"#pending-{model}"), "the normals waiting")
        page.css(f"{card} button[data-action=teach]").click()
        page.css(f"#taught-{model}")
        assert f"Taught {len(normals)} images" in page.text(f"#taught-{model}")
        taught = station.model(model)
        assert newest(taught)["reason"] == "teach" and taught["version"] == applied["version"] + 1
        assert all(station.get(f"/inspections/{i}")["taught_in_version"] == taught["version"] for i in normals)
        assert page.text(f"{card} .active-version") == f"v{taught['version']}"
        assert page.all(f"{card} tr.active[data-version='{taught['version']}']")
        back_to = applied["version"]
    else:  # before patch_knn learns (the `teach` branch): the page says why and offers no teaching
        assert "cannot learn" in page.text(f"#pending-{model}")
        assert not page.css(f"{card} button[data-action=teach]").is_enabled()
        back_to = version_before
    page.shot("models")
    active = station.model(model)["version"]
    rollback = page.css(f"{card} button[data-action=rollback][data-version='{back_to}']")
    rollback.click()
    assert "Confirm" in rollback.text and station.model(model)["version"] == active  # a first click only arms it
    rollback.click()
    page.until(lambda: station.model(model)["version"] != active, "the rollback saved")
    page.until(lambda: page.text(f"{card} .active-version") == f"v{station.model(model)['version']}", "the rollback shown")
    assert station.model(model)["threshold"] == next(v for v in applied["versions"] if v["version"] == back_to)["threshold"]

    # blind rating: a defect-decided image under both models' maps, options without names, then the export
    station.set_threshold(model, lowest - 1.0)  # so that the next image is decided a defect whatever its score
    station.inspect(model, png_bytes(defect), source="camera-2")
    page.go("rate")
    rater = page.css("#rater")
    rater.clear()  # it starts with the operator's name
    rater.send_keys("Grace")
    page.css("#rate-start").click()
    options = page.until(lambda: page.all(".option[data-option]"), "the options of a rating task")
    letters = [o.get_attribute("data-option") for o in options]
    assert letters == [chr(ord("A") + i) for i in range(len(letters))] and len(letters) == len(station.models)
    html = page.css("#rate-task").get_attribute("innerHTML")
    assert not any(name in html for name in station.models)  # blind: no model name anywhere
    page.until(lambda: page.js("return [...document.querySelectorAll('.option img')].every(i => i.complete && i.naturalWidth > 0)"),
               "the option images loaded")
    page.shot("rate")
    for i, option in enumerate(options):
        option.find_element(By.CSS_SELECTOR, f"button[data-rating='{i + 2}']").click()
    page.css("#rate-submit").click()
    page.until(lambda: page.all("#rate-done") or page.all(".option[data-option]:not(.rated)"), "the next task or the end")
    sheets = zipfile.ZipFile(io.BytesIO(station.get_bytes("/ratings/export")))
    assert "sheet_Grace.csv" in sheets.namelist()

    # errors degrade clearly: an unknown inspection shows the API's 404 sentence
    page.go("inspection/999999")
    assert "Error 404" in page.text("#view .error")
    page.shot("error_404")


# -- without a browser --------------------------------------------------------------------------------------------
STATIC = Path(__file__).resolve().parents[1] / "src" / "clad" / "serve" / "static"


def test_the_app_is_self_contained_and_fetches_nothing_from_the_internet():
    """Every file index.html and the modules load is in the static folder, and no file names another origin: the
    app runs on a line with no internet and needs no build step."""
    import re

    files = {p.relative_to(STATIC).as_posix(): p.read_text() for p in STATIC.rglob("*") if p.is_file()}
    assert {"index.html", "app.js", "app.css"} <= set(files)
    html = files["index.html"]
    loaded = set(re.findall(r'(?:src|href)="([^"#:]+)"', html))
    assert {"app.js", "app.css"} <= loaded
    for name, text in files.items():
        if name.endswith(".js"):  # relative ES module imports, resolved against the importing file
            for target in re.findall(r'^import .*? from "(\.{1,2}/[^"]+)";', text, re.M):
                loaded.add((Path(name).parent / target).as_posix())
    missing = {f for f in loaded if os.path.normpath(f) not in files}
    assert not missing, f"loaded but not in {STATIC}: {missing}"
    for name, text in files.items():
        foreign = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text)
                   if not u.startswith("http://www.w3.org/2000/svg")]  # the SVG namespace is a name, not a fetch
        assert not foreign, f"{name} names another origin: {foreign}"
