"""Benchmark 4 — training: images/s of a training step (G + D, batch 16) for the served STGAN and
MU-GAN configs, fp32 vs bf16 autocast, and achieved FLOP/s against a measured bf16 peak.

FLOPs of a step are counted by ``torch.utils.flop_counter`` (convolutions and matmuls, forward and
backward); the peak is the best of a large bf16 matmul and a large bf16 3x3 convolution measured in
the same process. Synthetic 128-px faces in a temp dir stand in for the dataset (speed does not
depend on pixel content). Run: ``python bench/train_step.py [--steps 6]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, precisions, table
from models.memory import retain_freed_memory
from training.config import TrainConfig
from training.data import prepare_cache
from training.synthetic import make_celeba_folder
from training.trainer import Trainer

log = logging.getLogger(__name__)


def _best_rate(fn: Callable[[], object], flop: float, repeats: int = 7, n: int = 5) -> float:
    """FLOP/s of ``fn`` (``flop`` per call): the best of ``repeats`` timings of ``n`` calls (a peak)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return flop / best


def peak_flops(dtype: torch.dtype) -> tuple[float, float]:
    """(matmul, conv) best achieved FLOP/s in ``dtype`` on large, well-shaped problems."""
    layout = torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    mm = _best_rate(lambda: a @ b, 2 * 2048**3)
    x = torch.randn(32, 256, 32, 32, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(256, 256, 3, 3, dtype=dtype).contiguous(memory_format=layout)
    conv = _best_rate(lambda: F.conv2d(x, w, padding=1), 2 * 32 * 256 * 32 * 32 * 256 * 9)
    return mm, conv


def run(steps: int, batch: int) -> str:
    retain_freed_memory(1 << 30)  # as the training CLI does
    rows = []
    timed = precisions()
    peak_dtype = "bf16" if "bf16" in timed else "fp32"
    peak_mm, peak_conv = peak_flops(torch.bfloat16 if peak_dtype == "bf16" else torch.float32)
    peak = max(peak_mm, peak_conv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_celeba_folder(Path(tmp) / "data", n=4 * batch, size=128)
        cache = Path(tmp) / "cache"
        prepare_cache(folder, cache, image_size=128)
        for preset in ("stgan-cpu", "mugan-cpu"):
            per_precision = {}
            for precision in timed:
                cfg = TrainConfig(
                    preset=preset,
                    cache_dir=str(cache),
                    batch_size=batch,
                    precision=precision,
                    eval_every=10**9,
                    sample_every=10**9,
                    classifier=str(Path(tmp) / "none"),
                )
                trainer = Trainer(cfg, Path(tmp) / "run")
                trainer.train_step()  # warm-up (and lazy R1 at step 0)
                trainer.train_step()
                with FlopCounterMode(display=False) as counter:
                    trainer.train_step()
                flops = counter.get_total_flops()
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                dt = (time.perf_counter() - t0) / steps
                per_precision[precision] = batch / dt
                rows.append([preset, precision, batch / dt, dt * 1000, flops / 1e9, flops / dt / 1e9, ""])
            ratio = (
                f"bf16 {per_precision['bf16'] / per_precision['fp32']:.2f}x"
                if "bf16" in per_precision
                else "bf16 not timed (no bf16 units)"
            )
            rows[-1][6] = f"{ratio}; {rows[-1][5] * 1e9 / peak:.0%} of the {peak_dtype} peak"
    header = ["preset", "precision", "images/s", "ms/step", "GFLOP/step", "GFLOP/s", "bf16 vs fp32, share of peak"]
    peak_line = (
        f"Measured {peak_dtype} peak: matmul {peak_mm / 1e9:.0f} GFLOP/s, 3x3 conv {peak_conv / 1e9:.0f} GFLOP/s."
    )
    return f"### Training step (batch {batch}, G + D)\n\n{machine()}\n\n{peak_line}\n\n" + table(header, rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    log.info("\n%s", run(args.steps, args.batch))


if __name__ == "__main__":
    main()
