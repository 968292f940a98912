"""Benchmark 2 — full photo over HTTP: POST /v1/edit on each photo against a live uvicorn (loopback).

Per photo: the first request (cold: decode, detect, align, encode) and repeats on the same photo with
other slider values (cache hit), p50 / p95 of the total and of each stage the server reports.
Run: ``python bench/photo_http.py [--weights weights] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import PHOTOS, machine, summary, table, wait_compiled
from server.launch import live_server

STAGES = ("decode_image", "detect", "align", "classify", "encode", "decode", "compose", "crops_png", "encode_response")


def edit(
    client: httpx.Client, url: str, data: bytes, value: float, png_only: bool, image_format: str | None = None
) -> tuple[float, dict]:
    """One POST /v1/edit. ``image_format=None`` is the README's default call (a JPEG upload is answered
    in JPEG q95, with the overlay); "jpeg" requests are the UI's previews (no overlay while the mask is
    hidden)."""
    headers = {"Accept": "image/png"} if png_only else {}
    t0 = time.perf_counter()
    resp = client.post(
        url + "/v1/edit",
        files={"image": ("p.jpg", data, "image/jpeg")},
        data={"edits": json.dumps({"Blond_Hair": value}), "faces": "all"}
        | ({} if image_format is None else {"image_format": image_format, "overlay": "false"}),
        headers=headers,
    )
    total = (time.perf_counter() - t0) * 1000
    resp.raise_for_status()
    return total, ({} if png_only else resp.json()["timings_ms"])


def run(weights: Path, repeats: int, cold_runs: int) -> str:
    rows = []
    with live_server(weights, cache_size="64") as (url, _), httpx.Client(timeout=120) as client:
        wait_compiled(url)  # time the decoders the server will serve, not a compile's contention
        for photo in sorted(PHOTOS.glob("*.jpg")):
            data = photo.read_bytes()
            cold, cold_stages = [], []
            for k in range(cold_runs):  # a byte appended makes a new photo for the cache, same pixels
                total, stages = edit(client, url, data + bytes([k]) * (k + 1), 0.5, png_only=False)
                cold.append(total)
                cold_stages.append(stages)
            cold_jpeg = [
                edit(client, url, data + bytes([100 + k]) * (k + 1), 0.5, False, "jpeg") for k in range(cold_runs)
            ]
            warm, warm_stages = [], []
            for i in range(repeats):
                total, stages = edit(client, url, data + b"\x00", (i % 10) / 10, png_only=False)
                warm.append(total)
                warm_stages.append(stages)
            jpeg = [edit(client, url, data + b"\x00", (i % 10) / 10, False, "jpeg") for i in range(repeats)]
            png_only = [edit(client, url, data + b"\x00", 0.3, png_only=True)[0] for _ in range(repeats)]
            for label, totals, stages in (
                ("first request, README default (JPEG q95 answer)", cold, cold_stages),
                ("first request, UI preview (JPEG)", [t for t, _ in cold_jpeg], [st for _, st in cold_jpeg]),
                ("repeat (cache hit), README default", warm, warm_stages),
                ("repeat, UI preview (JPEG)", [t for t, _ in jpeg], [st for _, st in jpeg]),
            ):
                p50, p95 = summary(totals)
                per_stage = ", ".join(
                    f"{s} {summary([st.get(s, 0.0) for st in stages])[0]:.0f}"
                    for s in STAGES
                    if any(s in st for st in stages)
                )
                rows.append([photo.name, label, p50, p95, per_stage])
            p50, p95 = summary(png_only)
            rows.append([photo.name, "repeat, Accept: image/png", p50, p95, "no base64 crops/overlay"])
    header = ["photo", "request", "p50 ms", "p95 ms", "server stages, p50 ms"]
    return f"### Full photo over HTTP (JSON response unless noted)\n\n{machine()}\n\n" + table(header, rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--cold-runs", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger(__name__).info("\n%s", run(args.weights, args.repeats, args.cold_runs))


if __name__ == "__main__":
    main()
