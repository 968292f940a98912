"""Benchmark 5 — memory: peak RSS of the server after loading all models, and after 200 mixed requests.

Run: ``python bench/memory.py [--weights weights] [--requests 200]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import PHOTOS, machine, table
from server.launch import live_server


def peak_rss_mb(pid: int) -> tuple[float, float]:
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def run(weights: Path, n_requests: int) -> str:
    photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))]
    with Image.open(PHOTOS / "portrait-2.jpg") as im:
        buf = io.BytesIO()
        im.convert("RGB").crop((380, 230, 780, 630)).resize((128, 128)).save(buf, format="PNG")
        crop = buf.getvalue()
    rows = []
    with live_server(weights) as (url, proc), httpx.Client(timeout=120) as client:
        models = [m["name"] for m in client.get(url + "/v1/models").json()["models"] if m["state"] == "loaded"]
        rows.append(["after loading " + ", ".join(models), *peak_rss_mb(proc.pid)])
        for i in range(n_requests):
            model = models[i % len(models)]
            if i % 3 == 0:
                files, form = {"image": ("c.png", crop, "image/png")}, {"aligned": "true"}
            else:
                files, form = {"image": ("p.jpg", photos[i % len(photos)], "image/jpeg")}, {}
            edits = json.dumps({"Young": (i % 7 - 3) / 3})
            client.post(url + "/v1/edit", files=files, data={"edits": edits, "model": model, **form}).raise_for_status()
        rows.append([f"after {n_requests} mixed requests (photos, crops, all models)", *peak_rss_mb(proc.pid)])
    return f"### Server memory\n\n{machine()}\n\n" + table(["when", "RSS MB", "peak RSS MB"], rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights"))
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger(__name__).info("\n%s", run(args.weights, args.requests))


if __name__ == "__main__":
    main()
