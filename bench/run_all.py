"""Run every benchmark and write bench/RESULTS.md (the README quotes it).

Run: ``python bench/run_all.py [--weights weights] [--quick] [--only slider,train_step]``. Stop (or
``kill -STOP``) training runs first: the numbers are only meaningful on an otherwise idle machine.
Each section's title ends with the machine's kind (CPU model, bf16 units): a run replaces this kind's
sections of RESULTS.md and keeps those of other machines; ``--only`` re-runs just the named benchmarks.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from bench.common import machine_kind


def _bench(name: str) -> Any:
    """A benchmark module, imported when it runs: ``--only cuda`` then needs none of the HTTP layer's
    packages, which the lent GPU machine lacks (bench/gpu.py)."""
    return importlib.import_module(f"bench.{name}")


#: Benchmarks left out of a run without ``--only`` where the machine has no CUDA device.
NEEDS_CUDA = ("cuda",)


def benchmarks(weights: Path, quick: bool) -> dict[str, Callable[[], str]]:
    q = quick
    return {
        "slider": lambda: _bench("slider").run(weights, 30 if q else 200, compiled=not q),
        "photo_http": lambda: _bench("photo_http").run(weights, 3 if q else 10, 1 if q else 3),
        "throughput": lambda: _bench("throughput").run(weights, 3.0 if q else 10.0, None),
        "train_step": lambda: _bench("train_step").run(2 if q else 6, 16),
        "train_ab": lambda: _bench("train_ab").run(rounds=2 if q else 8),
        "memory": lambda: _bench("memory").run(weights, 20 if q else 200),
        "startup": lambda: _bench("startup").run(weights, 8, 8.0 if q else 20.0),
        "encode": lambda: _bench("encode").run(3 if q else 10),
        "detect": lambda: _bench("detect").run(3 if q else 12),
        "r1_precision": lambda: _bench("r1_precision").run(2 if q else 6),
        "g_precision": lambda: _bench("g_precision").run(weights, batches=1 if q else 3),
        "cuda": lambda: _bench("gpu").run_for_results(weights, quick=q),
    }


def header() -> str:
    return f"# Benchmarks\n\nWritten by `python bench/run_all.py` on {datetime.date.today()}.\n"


def replace_section(text: str, section: str) -> str:
    """Swap the section of ``text`` whose ``### Title`` line is exactly ``section``'s first line (append
    it if absent); a title that only begins the same way is another section."""
    title = section.splitlines()[0]
    pattern = "^" + re.escape(title) + r"$.*?(?=\n### |\Z)"
    if re.search(pattern, text, flags=re.S | re.M):
        return re.sub(pattern, lambda _: section.rstrip("\n") + "\n", text, count=1, flags=re.S | re.M)
    return text.rstrip("\n") + "\n\n" + section


def for_machine(section: str, kind: str) -> str:
    """``section`` with ``kind`` (:func:`bench.common.machine_kind`) appended to its title line."""
    title, _, rest = section.partition("\n")
    return f"{title} — {kind}\n{rest}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights"))
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--only", help="comma-separated: " + ", ".join(benchmarks(Path(), False)))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    runs = benchmarks(args.weights, args.quick)
    has_cuda = torch.cuda.is_available()
    names = args.only.split(",") if args.only else [n for n in runs if has_cuda or n not in NEEDS_CUDA]
    unknown = set(names) - set(runs)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(runs)}")
    if not has_cuda and set(names) & set(NEEDS_CUDA):
        p.error("`cuda` needs a CUDA device (for a smoke run here: python bench/gpu.py --device cpu --quick)")
    # Sections are titled with the machine's kind: a run replaces this kind's tables and keeps the others'.
    text = args.out.read_text() if args.out.is_file() else header()
    text = re.sub(r"Written by `python bench/run_all.py` on [0-9-]+", header().splitlines()[2][:-1], text)
    kind = machine_kind()
    for name in names:
        text = replace_section(text, for_machine(runs[name](), kind))
    args.out.write_text(text.rstrip("\n") + "\n")
    logging.getLogger(__name__).info("wrote %s", args.out)


if __name__ == "__main__":
    main()
