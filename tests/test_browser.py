"""End to end in a real browser: Debian's Chromium driven by Playwright against a live uvicorn."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from frontend.headless import CHROMIUM, FLAGS
from server.launch import live_server
from tests.server_utils import PHOTOS, make_weights

pytestmark = pytest.mark.slow  # starts servers / browsers / processes: CI runs it, `-m 'not slow'` skips it

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: CI must install Debian's chromium (bash .ci/setup.sh --with-browser)")
    pytest.skip(f"{CHROMIUM} not installed (bash .ci/setup.sh --with-browser)", allow_module_level=True)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    weights = make_weights(tmp_path_factory.mktemp("weights"), generators=("stgan-tiny", "mugan-tiny"))
    with live_server(weights, default_model="stgan") as (url, _):
        yield url


@pytest.fixture
def page(server_url: str) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        yield pg
        context.close()
        browser.close()


def test_upload_slide_mask_download(page, server_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page.goto(server_url + "/")
    page.wait_for_function("() => document.querySelectorAll('#sliders input').length === 13")
    assert page.locator("#model option").count() == 2

    page.set_input_files("#file", str(PHOTOS / "portrait-2.jpg"))
    page.wait_for_function("() => (document.getElementById('after').dataset.requestId || '') === '1'")
    page.wait_for_function("() => state.faces.length === 1 && !state.inflight")
    first_src = page.get_attribute("#after", "src")
    first_closeup = page.get_attribute("#closeups img.edited", "src")
    assert "now" in page.inner_text("#value-Blond_Hair")
    assert page.locator("#closeups figure").count() == 1

    # move a slider with the keyboard; the preview must change without a page reload, and the
    # request names the cached photo instead of uploading it again
    assert page.evaluate("() => state.photoId") and len(page.evaluate("() => state.photoId")) == 64
    page.focus("#slider-Blond_Hair")
    with page.expect_request(lambda r: r.url.endswith("/v1/edit") and r.method == "POST") as request_info:
        page.keyboard.press("End")
    body = request_info.value.post_data_buffer or b""
    assert b'name="photo_id"' in body and len(body) < 4096
    page.wait_for_function("() => Number(document.getElementById('after').dataset.requestId) >= 2 && !state.inflight")
    assert page.get_attribute("#after", "src") != first_src
    assert page.get_attribute("#closeups img.edited", "src") != first_closeup  # the close-up follows the slider
    assert page.input_value("#slider-Blond_Hair") == "1"
    page.screenshot(path=str(ARTIFACTS / "editor-edited.png"), full_page=True)

    assert page.get_attribute("#overlay", "data-request-id") is None  # previews skip the hidden overlay
    assert not page.is_visible("#overlay")
    # ticked with no overlay of this edit yet: it stays hidden (not a broken image) until the fetch returns
    hidden_on_tick = page.evaluate(
        "() => { document.getElementById('show-mask').click(); return document.getElementById('overlay').hidden; }"
    )
    assert hidden_on_tick and page.is_checked("#show-mask")
    page.wait_for_function(
        "() => !state.inflight && document.getElementById('overlay').dataset.requestId"
        " === document.getElementById('after').dataset.requestId"
    )
    assert page.is_visible("#overlay")
    page.fill("#mask-opacity", "40")
    page.dispatch_event("#mask-opacity", "input")
    assert page.eval_on_selector("#overlay", "el => el.style.opacity") == "0.4"
    page.screenshot(path=str(ARTIFACTS / "editor-mask.png"), full_page=True)
    page.uncheck("#show-mask")
    assert not page.is_visible("#overlay")

    with page.expect_download() as info:
        page.click("#download")
    target = tmp_path / "edited.png"
    info.value.save_as(str(target))
    edited = np.asarray(Image.open(target).convert("RGB"))
    with Image.open(PHOTOS / "portrait-2.jpg") as im:
        original = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert edited.shape == original.shape
    x0, y0, x1, y1 = (int(v) for v in page.evaluate("() => state.faces[0].region"))
    changed = np.any(edited != original, axis=2)
    inside = np.zeros_like(changed)
    inside[y0:y1, x0:x1] = True
    assert changed[inside].any(), "the downloaded photo shows no edit"
    assert not changed[~inside].any(), "the download differs from the upload outside the face region"

    # the overlay download is the tinted photo
    with page.expect_download() as info:
        page.click("#download-overlay")
    info.value.save_as(str(tmp_path / "overlay.png"))
    assert Image.open(tmp_path / "overlay.png").size == (original.shape[1], original.shape[0])


def test_bad_file_and_phone_width(page, server_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server_url + "/")
    page.wait_for_function("() => document.querySelectorAll('#sliders input').length === 13")
    blank = tmp_path / "blank.png"
    buf = io.BytesIO()
    Image.new("RGB", (200, 150), (120, 160, 200)).save(buf, format="PNG")
    blank.write_bytes(buf.getvalue())
    page.set_input_files("#file", str(blank))
    page.wait_for_selector("#error:not([hidden])")
    assert "no face" in page.inner_text("#error")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    page.set_input_files("#file", str(text))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('not a JPEG')")
    # nothing overflows the phone-width viewport horizontally
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "editor-phone.png"), full_page=True)


def test_group_photo_face_picker(page, server_url: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(server_url + "/")
    page.wait_for_function("() => document.querySelectorAll('#sliders input').length === 13")
    page.set_input_files("#file", str(PHOTOS / "group-six-faces.jpg"))
    page.wait_for_function("() => state.faces.length === 6 && !state.inflight")
    assert page.locator("#boxes rect").count() == 6
    assert page.locator("#closeups figure").count() == 6
    assert page.locator("#faces input[type=radio]").count() == 7
    page.check("#faces input[value='2']")
    page.wait_for_function("() => state.face === 2 && !state.inflight")
    assert page.locator("#boxes rect.selected").count() == 1
    page.select_option("#model", "mugan")
    page.wait_for_function("() => state.model === 'mugan' && !state.inflight && state.faces.length === 6")
    page.screenshot(path=str(ARTIFACTS / "editor-group.png"), full_page=True)


def test_sliders_say_what_an_edit_implies_in_the_training_data(page, server_url: str) -> None:  # type: ignore[no-untyped-def]
    from models.attributes import IMPLIED_VALUES

    page.goto(server_url + "/")
    page.wait_for_function("() => document.querySelectorAll('#sliders input').length === 13")
    assert "Male" in (page.get_attribute("label[for=slider-Mustache]", "title") or "")
    assert page.get_attribute("label[for=slider-Eyeglasses]", "title") is None  # implies nothing
    page.set_input_files("#file", str(PHOTOS / "portrait-2.jpg"))
    page.wait_for_function("() => state.faces.length === 1 && !state.inflight")
    assert not page.is_visible("#implied")
    moved = {"Mustache": 1, "Male": -1, "Bald": 1}
    for attr, value in moved.items():
        page.fill(f"#slider-{attr}", str(value))
        page.dispatch_event(f"#slider-{attr}", "input")
    reading = page.evaluate("() => state.faces[0].attributes")
    expected = {}  # the implied values the face does not already read as, per moved slider
    for attr, value in moved.items():
        on = value > 0
        if (reading[attr] >= 0.5) == on:
            continue
        implied = IMPLIED_VALUES[(attr, int(on))].items()
        unmet = {b: w for b, w in implied if b in reading and (reading[b] >= 0.5) != w}  # what the face reads otherwise
        if unmet:
            expected[attr] = unmet
    text = page.inner_text("#implied") if page.is_visible("#implied") else ""
    assert bool(text) == bool(expected)
    for attr, unmet in expected.items():
        assert attr.replace("_", " ") in text
        assert all(b.replace("_", " ") in text for b in unmet)
    page.click("#reset")
    assert not page.is_visible("#implied")
