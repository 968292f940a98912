"""Load and backpressure against a live uvicorn on loopback: 32 clients for 30 s, bounded in count."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.launch import live_server, rss_mb
from tests.server_utils import PHOTOS, make_weights

CLIENTS = 32
SECONDS = 30.0
MAX_REQUESTS = 4000


def _payloads() -> list[tuple[bytes, str, dict[str, str]]]:
    with Image.open(PHOTOS / "portrait-2.jpg") as im:
        rgb = im.convert("RGB")
        crop = rgb.crop((380, 230, 780, 630)).resize((96, 96))
        small = rgb.resize((281, 403))
    out = []
    for img, form in ((crop, {"aligned": "true"}), (small, {})):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), "image/jpeg", form))
    return out


async def _client(url: str, k: int, deadline: float, budget: list[int], statuses: Counter, bad: list[str]) -> None:
    payloads = _payloads()
    async with httpx.AsyncClient(timeout=60) as client:
        i = 0
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            data, mime, form = payloads[1 if (k + i) % 4 == 0 else 0]  # one full photo in four, the rest aligned crops
            edits = f'{{"Blond_Hair": {((k + i) % 21 - 10) / 10}}}'
            resp = await client.post(
                url + "/v1/edit", files={"image": ("p.jpg", data, mime)}, data={"edits": edits, **form}
            )
            statuses[resp.status_code] += 1
            if resp.status_code == 503 and "Retry-After" not in resp.headers:
                bad.append("503 without Retry-After")
            elif resp.status_code not in (200, 503):
                bad.append(f"{resp.status_code}: {resp.text[:200]}")
            i += 1


@pytest.mark.slow
def test_32_clients_for_30_seconds(tmp_path: Path) -> None:
    weights = make_weights(tmp_path / "w")
    with live_server(weights, max_concurrent="2", max_queue="8", cache_size="8") as (url, proc):
        asyncio.run(_load(url, seconds=3.0, clients=4))  # warm-up: detector, caches, allocator
        plateau = rss_mb(proc.pid)
        statuses: Counter = Counter()
        bad: list[str] = []
        t0 = time.monotonic()
        asyncio.run(_load(url, SECONDS, CLIENTS, statuses, bad))
        elapsed = time.monotonic() - t0
        assert not bad, bad[:5]
        assert statuses[200] > 0 and set(statuses) <= {200, 503}
        assert elapsed < SECONDS + 30  # requests have bounded latency: nothing hangs
        peak = rss_mb(proc.pid)
        asyncio.run(_load(url, seconds=3.0, clients=4))  # back to a light load
        after = rss_mb(proc.pid)
        print(
            f"load: {dict(statuses)} in {elapsed:.1f} s; "
            f"RSS plateau {plateau:.0f} MB, peak {peak:.0f}, after {after:.0f}"
        )
        assert after < plateau * 1.3 + 100, (plateau, peak, after)
        assert httpx.get(url + "/healthz").status_code == 200


async def _load(
    url: str, seconds: float, clients: int, statuses: Counter | None = None, bad: list[str] | None = None
) -> None:
    deadline = time.monotonic() + seconds
    budget = [MAX_REQUESTS]
    statuses = Counter() if statuses is None else statuses
    bad = [] if bad is None else bad
    await asyncio.gather(*(_client(url, k, deadline, budget, statuses, bad) for k in range(clients)))
