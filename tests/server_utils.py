"""Tiny served models for server and browser tests (made on the fly, never downloaded)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from models.checkpoint import save_pretrained
from models.registry import build, get_preset
from server.faces import DEFAULT_TEMPLATE

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos"


def make_weights(
    root: Path, generators: tuple[str, ...] = ("stgan-tiny",), seed: int = 0, classifier: bool = True
) -> Path:
    """A weights folder with tiny 32-px generators (mask head on) and a tiny 40-attribute classifier."""
    torch.manual_seed(seed)
    for preset in generators:
        arch, cfg = get_preset(preset)
        if hasattr(cfg, "mask_head"):
            cfg = dataclasses.replace(cfg, mask_head=True)
        gen = build(arch, cfg)
        with torch.no_grad():  # make the random network do visible edits: open its mask
            gen.to_image.bias.data[-1:] = 2.0 if cfg.mask_head else gen.to_image.bias.data[-1:]
        save_pretrained(
            root / preset.split("-")[0],
            gen,
            architecture=arch,
            alignment_template={"landmarks": DEFAULT_TEMPLATE},
            metrics={"test": {"psnr": 20.0, "ssim": 0.5, "mean_edit_success": 0.5, "mean_preservation": 0.9}},
        )
    if classifier:
        arch, cfg = get_preset("classifier-tiny")
        save_pretrained(root / "classifier", build(arch, cfg), architecture=arch, metrics={"val_mean_accuracy": 0.5})
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(weights: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """uvicorn serving ``server.app:app`` on a free loopback port; yields (url, process)."""
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
            "server.app:app",
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
