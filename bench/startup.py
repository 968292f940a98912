"""Benchmark — start-up and hot reload: seconds from process start to ``/healthz`` 200 and to
``/readyz`` 200 with the shipped weights; the README's REST call 2 s after ``/readyz``, while the
decoders compile (an empty cache of compiled decoders); when the compiled decoders are in use; then 8
clients editing: half the time without reloads (the baseline), half with two ``POST /v1/models/reload``
(status codes and the slowest request of each half). Last, a restart with the cache the first start
filled: when its compiled decoders are in use. Run: ``python bench/startup.py [--weights weights]``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import PHOTOS, machine, summary, table, wait_compiled
from server.launch import free_port

TOKEN = "bench-reload"


def _start(weights: Path, cache_dir: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = os.environ | {
        "FACE_EDITOR_WEIGHTS_DIR": str(weights),
        "FACE_EDITOR_ADMIN_TOKEN": TOKEN,
        "FACE_EDITOR_COMPILE_CACHE_DIR": str(cache_dir),
    }
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


def _readme_call(url: str, edits: str) -> float:
    """ms of the README's REST call (portrait-1, the default JSON answer)."""
    t = time.perf_counter()
    with (PHOTOS / "portrait-1.jpg").open("rb") as f:
        httpx.post(url + "/v1/edit", files={"image": f}, data={"edits": edits}, timeout=120).raise_for_status()
    return (time.perf_counter() - t) * 1000


def _compiled_models(url: str) -> str:
    models = httpx.get(url + "/v1/models", timeout=10).json()["models"]
    parts = []
    for m in models:
        report = m.get("compiled_decoder") or {}
        how = "from the cache" if report.get("cached") else "compiled"
        parts.append(f"{m['name']} {how} {report.get('compile_s')} s" if report.get("used") else f"{m['name']} eager")
    return ", ".join(parts)


def run(weights: Path, clients: int = 8, seconds: float = 20.0) -> str:
    with tempfile.TemporaryDirectory() as cache:
        return _run(weights, Path(cache), clients, seconds)


def _run(weights: Path, cache_dir: Path, clients: int, seconds: float) -> str:
    proc, url, t0 = _start(weights, cache_dir)
    try:
        healthz = _wait(url + "/healthz", t0)
        readyz = _wait(url + "/readyz", t0)
        time.sleep(2.0)
        # a new photo, then a new edit of it, while the decoders compile (nothing cached yet)
        first_calls = [_readme_call(url, '{"Blond_Hair": 1, "Eyeglasses": 0.6}'), _readme_call(url, '{"Male": -1}')]
        # The Gradio page is built in the background after the models load; wait for it, so the
        # load test measures reloads and not the start-up's warm work.
        httpx.get(url + "/gradio/", timeout=120)
        wait_compiled(url)  # the start-up's background compiles, then the load
        compiled_after = time.perf_counter() - t0
        compiled_cold = _compiled_models(url)
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
    proc, url, t0 = _start(weights, cache_dir)  # a restart: the packages the first start compiled are cached
    try:
        _wait(url + "/readyz", t0)
        wait_compiled(url)
        restart_compiled_after = time.perf_counter() - t0
        compiled_warm = _compiled_models(url)
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
        [
            "README REST call 2 s after /readyz, while the decoders compile (portrait-1: new photo, new edit)",
            " / ".join(f"{ms:.0f} ms" for ms in first_calls),
            "",
        ],
        ["compiled decoders in use (empty cache)", f"{compiled_after:.1f} s after start", compiled_cold],
        ["compiled decoders in use after a restart", f"{restart_compiled_after:.1f} s after start", compiled_warm],
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
