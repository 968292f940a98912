"""How the project drives a headless browser (Playwright with Debian's Chromium; ``playwright install``
cannot download browsers here): the browser tests and the README screenshot use these."""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
