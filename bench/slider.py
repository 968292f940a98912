"""Benchmark 1 — slider move: one aligned face, encoder features cached, decoder only, batch 1.

p50 / p95 per served model, fp32 vs bf16 autocast (channels_last), and the max |bf16 - fp32| of the
output image. Run: ``python bench/slider.py [--weights weights] [--repeats 200]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, precisions, summary, table, time_ms
from models.checkpoint import CONFIG_FILE, load_pretrained


def run(weights: Path, repeats: int) -> str:
    rows = []
    for folder in sorted(p for p in weights.iterdir() if (p / CONFIG_FILE).is_file()):
        net, info = load_pretrained(folder)
        if info.kind != "generator":
            continue
        # channels_last pays with bf16 (oneDNN AMX kernels); without bf16 units the bench times fp32 as served
        layout = torch.channels_last if "bf16" in precisions() else torch.contiguous_format
        net = net.float().to(memory_format=layout).eval()
        size = info.image_size
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).contiguous(memory_format=layout)
        cond = torch.zeros(1, len(info.attributes))
        cond[0, 0] = 1.0
        outs, medians = {}, {}
        for precision in precisions():
            amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            with torch.no_grad(), amp:
                enc = net.encode(x)

                def step(enc=enc, amp=amp, net=net, cond=cond) -> None:
                    with torch.no_grad(), amp:
                        net.decode(enc, cond)

                ms = time_ms(step, repeats)
                with torch.no_grad(), amp:
                    outs[precision] = net.decode(enc, cond)[0].float()
            p50, p95 = summary(ms)
            medians[precision] = p50
            rows.append([folder.name, precision, p50, p95, ""])
        if "bf16" in outs:
            diff = float((outs["bf16"] - outs["fp32"]).abs().max())
            rows[-1][4] = f"{medians['fp32'] / medians['bf16']:.2f}x faster, max abs diff {diff:.4f}"
        else:
            rows[-1][4] = "not timed: no bf16 units"
    header = ["model", "precision", "p50 ms", "p95 ms", "bf16 vs fp32"]
    return f"### Slider move (decoder only, batch 1)\n\n{machine()}\n\n" + table(header, rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights"))
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger(__name__).info("\n%s", run(args.weights, args.repeats))


if __name__ == "__main__":
    main()
