"""Run every benchmark and write bench/RESULTS.md (the README quotes it).

Run: ``python bench/run_all.py [--weights weights] [--quick] [--only slider,train_step]``. Stop (or
``kill -STOP``) training runs first: the numbers are only meaningful on an otherwise idle machine.
``--only`` re-runs the named benchmarks and replaces just their sections of an existing RESULTS.md.
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
from bench import encode, memory, photo_http, slider, startup, throughput, train_step


def benchmarks(weights: Path, quick: bool) -> dict[str, Callable[[], str]]:
    q = quick
    return {
        "slider": lambda: slider.run(weights, 30 if q else 200),
        "photo_http": lambda: photo_http.run(weights, 3 if q else 10, 1 if q else 3),
        "throughput": lambda: throughput.run(weights, 3.0 if q else 10.0, None),
        "train_step": lambda: train_step.run(2 if q else 6, 16),
        "memory": lambda: memory.run(weights, 20 if q else 200),
        "startup": lambda: startup.run(weights, 8, 8.0 if q else 20.0),
        "encode": lambda: encode.run(3 if q else 10),
    }


def header() -> str:
    return f"# Benchmarks\n\nWritten by `python bench/run_all.py` on {datetime.date.today()}.\n"


def replace_section(text: str, section: str) -> str:
    """Swap the ``### Title`` section of ``text`` that ``section`` starts with (append it if absent)."""
    title = section.splitlines()[0]
    pattern = re.escape(title) + r".*?(?=\n### |\Z)"
    if re.search(pattern, text, flags=re.S):
        return re.sub(pattern, lambda _: section.rstrip("\n") + "\n", text, flags=re.S)
    return text.rstrip("\n") + "\n\n" + section


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
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - set(runs)
        if unknown:
            p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(runs)}")
        text = args.out.read_text() if args.out.is_file() else header()
        text = re.sub(r"Written by `python bench/run_all.py` on [0-9-]+", header().splitlines()[2][:-1], text)
        for name in names:
            text = replace_section(text, runs[name]())
        args.out.write_text(text.rstrip("\n") + "\n")
    else:
        args.out.write_text("\n".join([header(), *(run() for run in runs.values())]))
    logging.getLogger(__name__).info("wrote %s", args.out)


if __name__ == "__main__":
    main()
