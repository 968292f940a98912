"""Benchmark 1 — slider move: one aligned face, encoder features cached, decoder only, batch 1.

p50 / p95 per served model: fp32 in NCHW and in channels_last, bf16 autocast (channels_last) where the
CPU has bf16 units, and the max |bf16 - fp32| of the output image; with ``--compiled``, also the
decoder the server compiles in the background (server/compiled.py; in channels_last, fp32, and bf16 where
the CPU has bf16 units; tens of seconds of compiling per model first).
Run: ``python bench/slider.py [--weights weights] [--repeats 200] [--compiled]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, precisions, summary, table, time_ms
from models.checkpoint import CONFIG_FILE, load_pretrained


def compiled_row(
    name: str, net: torch.nn.Module, info: Any, layout: torch.memory_format, repeats: int, precision: str = "fp32"
) -> list:
    """The server's compiled decoder (built, checked against eager fp32) timed like the other rows."""
    from server.compiled import build_compiled_decoder
    from server.served_models import ServedGenerator

    served = ServedGenerator(
        name, info, net.to(memory_format=layout), torch.device("cpu"), precision=precision, memory_format=layout
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:  # compiled anew, not loaded from an earlier run
        decode = build_compiled_decoder(served, Path(cache))
    compile_s = time.perf_counter() - t0
    x = torch.rand(1, 3, info.image_size, info.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = torch.zeros(1, len(info.attributes))
    cond[0, 0] = 1.0
    enc = served.encode(x)

    def step() -> None:
        with torch.no_grad(), served.autocast():
            decode(enc, cond)

    p50, p95 = summary(time_ms(step, repeats))
    layout_name = "channels_last" if layout == torch.channels_last else "contiguous"
    note = f"compiled in {compile_s:.0f} s (in the background)"
    return [name, f"{precision}, {layout_name}, compiled", p50, p95, note]


def run(weights: Path, repeats: int, compiled: bool = False) -> str:
    rows = []
    for folder in sorted(p for p in weights.iterdir() if (p / CONFIG_FILE).is_file()):
        net, info = load_pretrained(folder)
        if info.kind != "generator":
            continue
        net = net.float().eval()
        size = info.image_size
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        cond = torch.zeros(1, len(info.attributes))
        cond[0, 0] = 1.0
        outs, medians = {}, {}
        # fp32 in both layouts (the server's eager layout trial, where it does not compile), bf16 in channels_last
        trials = [("fp32", torch.contiguous_format), ("fp32", torch.channels_last)]
        if "bf16" in precisions():
            trials.append(("bf16", torch.channels_last))
        for precision, layout in trials:
            net = net.to(memory_format=layout)

            def amp(precision: str = precision) -> torch.autocast:
                # a fresh context each time: re-entering one torch.autocast object inside itself
                # leaves autocast on when the outer block exits (this bench's later rows ran in bf16)
                return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

            with torch.no_grad(), amp():
                enc = net.prepare_decode(net.encode(x.contiguous(memory_format=layout)))

            def step(enc: Any = enc, amp: Any = amp, net: Any = net, cond: torch.Tensor = cond) -> None:
                with torch.no_grad(), amp():
                    net.decode(enc, cond)

            ms = time_ms(step, repeats)
            with torch.no_grad(), amp():
                outs[precision] = net.decode(enc, cond)[0].float()
            p50, p95 = summary(ms)
            medians[(precision, layout)] = p50
            name = "channels_last" if layout == torch.channels_last else "contiguous"
            rows.append([folder.name, f"{precision}, {name}", p50, p95, ""])
        fp32_best = min(medians[("fp32", torch.contiguous_format)], medians[("fp32", torch.channels_last)])
        if "bf16" in outs:
            diff = float((outs["bf16"] - outs["fp32"]).abs().max())
            ratio = fp32_best / medians[("bf16", torch.channels_last)]
            rows[-1][4] = f"{ratio:.2f}x the faster fp32, max abs diff {diff:.4f}"
        else:
            rows[-1][4] = "bf16 not timed: no bf16 units"
        if compiled:  # the server compiles its CPU decoders in channels_last (server/state.py:served_layout)
            rows.append(compiled_row(folder.name, net.float(), info, torch.channels_last, repeats))
            if "bf16" in outs:  # what the server compiles where its precision trial picks bf16
                rows.append(compiled_row(folder.name, net.float(), info, torch.channels_last, repeats, "bf16"))
    header = ["model", "precision, layout", "p50 ms", "p95 ms", "bf16 vs fp32 / compiled"]
    return f"### Slider move (decoder only, batch 1)\n\n{machine()}\n\n" + table(header, rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights"))
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--compiled", action="store_true", help="also time the server's compiled decoder")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger(__name__).info("\n%s", run(args.weights, args.repeats, args.compiled))


if __name__ == "__main__":
    main()
