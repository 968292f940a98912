"""Run every benchmark and write bench/RESULTS.md (the README quotes it).

Run: ``python bench/run_all.py [--weights weights] [--quick]``. Stop training runs first: the
numbers are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import memory, photo_http, slider, throughput, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights"))
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    q = args.quick
    parts = [
        f"# Benchmarks\n\nWritten by `python bench/run_all.py` on {datetime.date.today()}.\n",
        slider.run(args.weights, 30 if q else 200),
        photo_http.run(args.weights, 3 if q else 10, 1 if q else 3),
        throughput.run(args.weights, 3.0 if q else 10.0, None),
        train_step.run(2 if q else 6, 16),
        memory.run(args.weights, 20 if q else 200),
    ]
    args.out.write_text("\n".join(parts))
    logging.getLogger(__name__).info("wrote %s", args.out)


if __name__ == "__main__":
    main()
