"""Benchmark 3 — throughput: aligned edits per second with 1, 4 and 16 concurrent clients.

Three server set-ups: the default (one compute thread, see server/compute.py), four compute threads
without micro-batching, and four with micro-batching of their decoder calls (up to 8, wait <= 5 ms).

Each client edits its own aligned 128-px crop with changing slider values (features cached after its
first request, as while dragging a slider). Run: ``python bench/throughput.py [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import EDIT_SETUPS, PHOTOS, machine, table
from server.launch import live_server


def crop_bytes() -> bytes:
    with Image.open(PHOTOS / "portrait-2.jpg") as im:
        crop = im.convert("RGB").crop((380, 230, 780, 630)).resize((128, 128))
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    return buf.getvalue()


async def client_loop(url: str, k: int, deadline: float, done: list[int], latencies: list[float]) -> None:
    data = crop_bytes() + bytes([k])  # distinct photo per client (trailing byte), same pixels
    async with httpx.AsyncClient(timeout=60) as client:
        i = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            resp = await client.post(
                url + "/v1/edit",
                files={"image": ("c.png", data, "image/png")},
                data={"edits": f'{{"Eyeglasses": {(i % 10) / 10}}}', "aligned": "true"},
                headers={"Accept": "image/png"},
            )
            if resp.status_code == 200:
                done[0] += 1
                latencies.append((time.perf_counter() - t0) * 1000)
            i += 1


async def measure(url: str, clients: int, seconds: float) -> tuple[float, float]:
    await asyncio.gather(*(client_loop(url, k, time.monotonic() + 1.0, [0], []) for k in range(clients)))  # warm
    done: list[int] = [0]
    latencies: list[float] = []
    t0 = time.monotonic()
    await asyncio.gather(*(client_loop(url, k, t0 + seconds, done, latencies) for k in range(clients)))
    elapsed = time.monotonic() - t0
    latencies.sort()
    return done[0] / elapsed, latencies[len(latencies) // 2] if latencies else float("nan")


def run(weights: Path, seconds: float, model: str | None) -> str:
    rows = []
    for label, workers, micro_batch in EDIT_SETUPS:
        env = {
            "max_concurrent": "16",
            "max_queue": "64",
            "compute_workers": str(workers),
            "micro_batch": str(micro_batch),
        }
        if model:
            env["default_model"] = model
        with live_server(weights, **env) as (url, _):
            for clients in (1, 4, 16):
                rate, p50 = asyncio.run(measure(url, clients, seconds))
                rows.append([label, clients, rate, p50])
    header = ["server", "clients", "edits/s", "p50 latency ms"]
    title = f"### Throughput: aligned 128-px edits, PNG response ({model or 'default model'})"
    return f"{title}\n\n{machine()}\n\n" + table(header, rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights"))
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--model")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger(__name__).info("\n%s", run(args.weights, args.seconds, args.model))


if __name__ == "__main__":
    main()
