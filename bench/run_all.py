"""Run every benchmark and write bench/RESULTS.md (the README quotes it).

Run: ``python bench/run_all.py [--weights weights] [--quick] [--only slider,train_step]``. Stop (or
``kill -STOP``) training runs first: the numbers are only meaningful on an otherwise idle machine.
Each section's title ends with the machine's kind (CPU model, bf16 units): a run replaces this kind's
sections of RESULTS.md and keeps those of other machines; ``--only`` re-runs just the named benchmarks.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import detect, encode, memory, photo_http, slider, startup, throughput, train_ab, train_step
from bench.common import machine_kind


def benchmarks(weights: Path, quick: bool) -> dict[str, Callable[[], str]]:
    q = quick
    return {
        "slider": lambda: slider.run(weights, 30 if q else 200, compiled=not q),
        "photo_http": lambda: photo_http.run(weights, 3 if q else 10, 1 if q else 3),
        "throughput": lambda: throughput.run(weights, 3.0 if q else 10.0, None),
        "train_step": lambda: train_step.run(2 if q else 6, 16),
        "train_ab": lambda: train_ab.run(rounds=2 if q else 8),
        "memory": lambda: memory.run(weights, 20 if q else 200),
        "startup": lambda: startup.run(weights, 8, 8.0 if q else 20.0),
        "encode": lambda: encode.run(3 if q else 10),
        "detect": lambda: detect.run(3 if q else 12),
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
    names = args.only.split(",") if args.only else list(runs)
    unknown = set(names) - set(runs)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(runs)}")
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
