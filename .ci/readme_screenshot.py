"""Screenshot of the editor with a real photo and the shipped weights, for the README.

Starts the app on 127.0.0.1 with ``weights/``, opens it in Debian's Chromium (Playwright), uploads a
photo, moves one slider, turns the mask overlay on and saves ``frontend/screenshot.png``.

Run: ``python .ci/readme_screenshot.py [--photo ../shared/photos/portrait-1.jpg] [--attribute Eyeglasses]``
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT.parent / "shared" / "photos"

from frontend.headless import CHROMIUM, FLAGS  # noqa: E402
from server.launch import live_server  # noqa: E402

log = logging.getLogger("readme_screenshot")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--photo", type=Path, default=PHOTOS / "portrait-1.jpg")
    p.add_argument("--model", default="stgan")
    p.add_argument("--attribute", default="Eyeglasses")
    p.add_argument("--value", type=float, default=1.0)
    p.add_argument("--mask", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=ROOT / "frontend" / "screenshot.png")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    from playwright.sync_api import sync_playwright

    with live_server(args.weights, default_model=args.model) as (url, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(120_000)
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelectorAll('#sliders input').length > 0")
        page.select_option("#model", args.model)
        page.set_input_files("#file", str(args.photo))
        page.wait_for_function("() => state.faces.length > 0 && !state.inflight")
        before = page.evaluate("() => document.getElementById('after').dataset.requestId")
        page.fill(f"#slider-{args.attribute}", str(args.value))
        page.dispatch_event(f"#slider-{args.attribute}", "input")
        page.wait_for_function(
            f"() => document.getElementById('after').dataset.requestId !== '{before}' && !state.inflight"
        )
        if args.mask:
            page.check("#show-mask")
            page.fill("#mask-opacity", "100")
            page.dispatch_event("#mask-opacity", "input")
            # ticking the box fetches this edit's overlay; the page unhides it when it arrives
            page.wait_for_function("() => !state.inflight && !document.getElementById('overlay').hidden")
        page.wait_for_timeout(300)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
