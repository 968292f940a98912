"""Benchmark — start-up and hot reload: seconds from process start to ``/healthz`` 200 and to
``/readyz`` 200 with the shipped weights, then 8 clients editing: half the time without reloads (the
baseline), half with two ``POST /v1/models/reload`` (status codes and the slowest request of each half).
Run: ``python bench/startup.py [--weights weights]``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import PHOTOS, machine, summary, table, wait_compiled
from server.launch import free_port

TOKEN = "bench-reload"


def _start(weights: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = os.environ | {"FACE_EDITOR_WEIGHTS_DIR": str(weights), "FACE_EDITOR_ADMIN_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "uvicorn", "server.boot:app", "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    return proc, f"http://127.0.0.1:{port}", t0


def _wait(url: str, t0: float, limit_s: float = 120.0) -> float:
    while time.perf_counter() - t0 < limit_s:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    return float("nan")


def _crop() -> bytes:
    buf = io.BytesIO()
    Image.open(PHOTOS / "portrait-2.jpg").convert("RGB").resize((128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def run(weights: Path, clients: int = 8, seconds: float = 20.0) -> str:
    proc, url, t0 = _start(weights)
    try:
        healthz = _wait(url + "/healthz", t0)
        readyz = _wait(url + "/readyz", t0)
        # The Gradio page is built in the background after the models load; wait for it, so the
        # load test measures reloads and not the start-up's warm work.
        httpx.get(url + "/gradio/", timeout=120)
        wait_compiled(url)  # the start-up's background compiles, then the load
        compiled_after = time.perf_counter() - t0
        crop, stop = _crop(), threading.Event()
        results: list[tuple[float, int, float]] = []  # (start, status, ms)
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=30) as c:
                i = 0
                while not stop.is_set():
                    t = time.perf_counter()
                    resp = c.post(
                        url + "/v1/edit",
                        files={"image": ("c.png", crop, "image/png")},
                        data={"edits": f'{{"Young": {(i % 10) / 10}}}', "aligned": "true", "image_format": "jpeg"},
                    )
                    with lock:
                        results.append((t, resp.status_code, (time.perf_counter() - t) * 1000))
                    i += 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        # first half: the same load without reloads (the baseline); second half: two reloads
        time.sleep(seconds / 2)
        reload_start = time.perf_counter()
        reloads = []
        for at in (seconds / 8, 5 * seconds / 16):
            time.sleep(max(0.0, reload_start + at - time.perf_counter()))
            t = time.perf_counter()
            resp = httpx.post(url + "/v1/models/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
            resp.raise_for_status()
            reloads.append(time.perf_counter() - t)
        time.sleep(max(0.0, reload_start + seconds / 2 - time.perf_counter()))
        stop.set()
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    def describe(part: list[tuple[float, int, float]]) -> str:
        codes = sorted({c for _, c, _ in part})
        ms = [m for _, _, m in part]
        p50, p95 = summary(ms)
        return (
            f"{len(part)} edits, status codes {codes}, {sum(c == 503 for _, c, _ in part)} × 503; "
            f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, slowest {max(ms):.0f} ms"
        )

    steady = [r for r in results if r[0] < reload_start]
    reloading = [r for r in results if r[0] >= reload_start]
    rows = [
        ["/healthz 200 after process start", f"{healthz:.2f} s", "target ≤ 2 s"],
        ["/readyz 200 after process start", f"{readyz:.2f} s", "target ≤ 10 s"],
        ["decoders compiled in the background (server/compiled.py)", f"{compiled_after:.1f} s after start", ""],
        [f"{clients} clients edit (aligned 128-px crops), no reload", describe(steady), "the baseline"],
        [
            f"2 hot reloads while {clients} clients edit",
            describe(reloading) + "; reloads took " + ", ".join(f"{r:.2f} s" for r in reloads),
            "target: no 503, none slower than 2 s",
        ],
    ]
    return f"### Start-up and hot reload\n\n{machine()}\n\n" + table(["what", "measured", "target"], rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger(__name__).info("\n%s", run(args.weights))


if __name__ == "__main__":
    main()
