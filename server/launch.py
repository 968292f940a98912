"""Run the app in a child process: uvicorn serving ``server.boot:app`` on a free loopback port, ready
when ``/readyz`` says so. The tests, the benchmarks and the README screenshot all start it this way."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(weights: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """uvicorn serving ``server.boot:app`` on a free loopback port; yields (url, process)."""
    import httpx

    port = free_port()
    environ = (
        os.environ | {"FACE_EDITOR_WEIGHTS_DIR": str(weights)} | {f"FACE_EDITOR_{k.upper()}": v for k, v in env.items()}
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "server.boot:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode() if proc.stdout else "server died")
            time.sleep(0.3)
        else:
            raise RuntimeError("server did not become ready in 60 s")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")
