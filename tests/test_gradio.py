"""The Gradio demo at /gradio: its API from gradio_client, and a slider moved in Chromium."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    weights = make_weights(tmp_path_factory.mktemp("weights"), generators=("stgan-tiny", "mugan-tiny"))
    with live_server(weights, default_model="stgan") as (url, _):
        import httpx

        # the page is built in the background after start-up (or on first use): wait for it once
        assert httpx.get(url + "/gradio/", timeout=120).status_code == 200
        yield url


def test_gradio_client_edits_a_photo(server_url: str) -> None:
    from gradio_client import Client, handle_file

    client = Client(server_url + "/gradio/", verbose=False)
    photo = PHOTOS / "portrait-2.jpg"
    edited, overlay, faces = client.predict(handle_file(str(photo)), "stgan", '{"Young": 1}', api_name="/edit_json")
    original = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("RGB"))
    out = np.asarray(Image.open(edited).convert("RGB"))
    assert out.shape == original.shape
    assert np.any(out != original)  # the face was edited
    assert np.any(np.asarray(Image.open(overlay).convert("RGB")) != out)  # the mask is tinted in
    assert [f["caption"] for f in faces] == ["face 0: before", "face 0: after", "face 0: mask"]
    # the same edit through the per-slider endpoint (one value per attribute, in the page's order)
    info = client.view_api(return_format="dict", print_info=False)
    labels = [p["label"] for p in info["named_endpoints"]["/edit"]["parameters"]][2:]
    values = [1.0 if a == "Young" else 0.0 for a in labels]
    edited2, _, _ = client.predict(handle_file(str(photo)), "stgan", *values, api_name="/edit")
    np.testing.assert_array_equal(np.asarray(Image.open(edited2).convert("RGB")), out)


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason="no Chromium")
def test_a_slider_moved_in_the_gradio_page_changes_the_image(server_url: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.set_default_timeout(60_000)
        page.goto(server_url + "/gradio/")
        page.wait_for_selector("a[href='/']")  # links back to the JS editor
        assert "with Male" in page.inner_text("#slider-Mustache")  # what the slider implies in the labels
        page.locator("#photo input[type=file]").set_input_files(str(PHOTOS / "portrait-2.jpg"))
        page.wait_for_selector("#edited img")
        first = page.get_attribute("#edited img", "src")
        slider = page.locator("#slider-Young input[type=range]")
        slider.fill("1")
        slider.dispatch_event("pointerup")
        slider.dispatch_event("mouseup")
        page.wait_for_function(
            "(first) => { const img = document.querySelector('#edited img'); return img && img.src !== first; }",
            arg=first,
        )
        browser.close()


def test_the_idle_gradio_queue_does_not_poll_every_millisecond(tmp_path: Path) -> None:
    """Gradio's queue loops run on the server's event loop; at Gradio's 1 ms they cost the REST edits
    CPU and GIL time even when nobody uses the demo page (frontend/gradio_app.py)."""
    from frontend.gradio_app import QUEUE_POLL_S, build_app

    weights = make_weights(tmp_path / "weights")
    app = build_app(service=None, weights_dir=weights)  # type: ignore[arg-type]  # no edit runs here
    mounted = [r.app for r in app.routes if hasattr(getattr(r, "app", None), "get_blocks")]  # type: ignore[attr-defined]
    assert len(mounted) == 1, "the Gradio app was not found in the mounted app"
    queue = mounted[0].get_blocks()._queue
    assert queue.sleep_when_free >= QUEUE_POLL_S >= 0.01
