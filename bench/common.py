"""Shared helpers for the benchmark scripts: timing, percentiles, Markdown tables, machine line."""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from models.device import machine_description
from models.precision import cpu_has_bf16_units, describe_cpu_bf16, isa_caps

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "photos"

#: The edit path's set-ups (label, compute threads, micro-batch size), over HTTP in bench/throughput.py and
#: in-process in bench/gpu.py. One compute thread never merges decoder calls (server/state.py).
EDIT_SETUPS = (
    ("1 compute thread (the CPU default)", 1, 1),
    ("4 compute threads, no micro-batching", 4, 1),
    ("4 compute threads, micro-batching ≤8, ≤5 ms", 4, 8),
)


def machine() -> str:
    """The machine line every table carries (the same one model cards use), with the CPU's bf16 units."""
    return (
        f"{machine_description()} ({describe_cpu_bf16()}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def machine_kind() -> str:
    """What sets a machine's tables apart: the CPU model and whether it has bf16 units. ``run_all``
    titles each section with it, so each kind of machine keeps its own tables in RESULTS.md."""
    cpu = machine_description().split(",")[0]
    caps = isa_caps()
    if caps:  # a stand-in for another kind of CPU (models.precision.isa_caps) keeps tables of its own
        cpu += " capped at " + "/".join(dict.fromkeys(v.upper() for v in caps.values()))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    units = "bf16 units" if cpu_has_bf16_units() else "no bf16 units"
    return ", ".join(x for x in (cpu, units, gpu) if x)


def precisions() -> tuple[str, ...]:
    """The precisions worth timing here: bf16 only where the CPU has bf16 units (emulated bf16 is ~40x
    slower than fp32 and a bf16 row would take longer than the whole bench)."""
    return ("fp32", "bf16") if cpu_has_bf16_units() else ("fp32",)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (a multiple of 0.01), interpolated linearly as numpy's default does."""
    if len(values) < 2:
        return float(values[0]) if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summary(ms: Sequence[float]) -> tuple[float, float]:
    return statistics.median(ms), percentile(ms, 0.95)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def repeats_main(description: str | None, run: Callable[[int], str], default_repeats: int) -> None:
    """The command line of a benchmark whose only option is ``--repeats``: run it, log its table."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=default_repeats)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger(run.__module__).info("\n%s", run(args.repeats))


def wait_compiled(url: str, limit_s: float = 300.0) -> float:
    """Seconds until the server at ``url`` has no decoder queued or compiling in the background
    (server/compiled.py), so timings do not share the cores with a compile; at most ``limit_s``."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        models = httpx.get(url + "/v1/models", timeout=10).json()["models"]
        states = [(m.get("compiled_decoder") or {}).get("state") for m in models]
        if not any(s in ("queued", "compiling") for s in states):
            break
        time.sleep(0.5)
    return time.perf_counter() - t0
