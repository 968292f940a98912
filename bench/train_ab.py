"""Benchmark 4b — training throughput of this tree against an earlier commit, interleaved.

A shared VM's speed moves by tens of percent from hour to hour (bench/RESULTS.md), more than the
changes to be measured, so two runs of ``bench/train_step.py`` an hour apart compare the hours, not the
code. Here both codes train side by side: one worker process per code (the other commit checked out
with ``git worktree`` in a temp dir), each holding its trainer, take turns running ``--steps`` steps
while the other waits, for ``--rounds`` rounds in alternating order. The table gives each code's
median images/s, the ratio of the medians, in how many rounds the newer code was faster and the median of
the per-round ratios (robust to the VM's swings between rounds), and the
FLOPs of a step (``torch.utils.flop_counter``) with its share of the measured peak.

Run: ``python bench/train_ab.py [--against 616a571] [--rounds 8] [--steps 2] [--precision fp32]
[--set rec_fraction=0.25]``. The default baseline is the code when the training-speed target was set
(issue 15; fp32 on a CPU without bf16 units); ``--set`` changes this tree's recipe only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from bench.common import ROOT, machine, table
from bench.train_step import peak_flops
from training.cli import parse_settings

log = logging.getLogger(__name__)

#: The code whose training speed issue 15 asks to beat by 1.5x (bench/RESULTS.md, "Before").
BASELINE = "616a571"
PRESETS = ("stgan-cpu", "mugan-cpu")

# The worker runs inside the other commit's tree: it may use only what that tree's training code had
# (Trainer, TrainConfig, prepare_cache, make_celeba_folder), so it is kept here as source.
WORKER = r"""
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, os.environ["TRAIN_AB_TREE"])
import torch
from torch.utils.flop_counter import FlopCounterMode
from training.config import TrainConfig
from training.data import prepare_cache
from training.synthetic import make_celeba_folder
from training.trainer import Trainer
try:
    from models.memory import retain_freed_memory
    retain_freed_memory(1 << 30)
except ImportError:
    pass
preset, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tmp = Path(tempfile.mkdtemp())
prepare_cache(make_celeba_folder(tmp / "data", n=4 * batch, size=size), tmp / "cache", image_size=size)
cfg = TrainConfig(preset=preset, cache_dir=str(tmp / "cache"), batch_size=batch, eval_every=10**9,
                  sample_every=10**9, classifier=str(tmp / "none"), **json.loads(sys.argv[4]))
trainer = Trainer(cfg, tmp / "run")
trainer.train_step()
with FlopCounterMode(display=False) as counter:
    trainer.train_step()
print(json.dumps({"flops": counter.get_total_flops(), "precision": trainer.precision}), flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    for _ in range(int(line)):
        trainer.train_step()
    print(json.dumps({"seconds": (time.perf_counter() - t0) / int(line)}), flush=True)
"""


class Worker:
    """A process training ``preset`` with the code in ``tree``; :meth:`time` runs steps on request."""

    def __init__(self, tree: Path, preset: str, batch: int, size: int, overrides: dict[str, Any]) -> None:
        env = dict(os.environ, TRAIN_AB_TREE=str(tree), PYTHONPATH="")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, preset, str(batch), str(size), json.dumps(overrides)],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self._read()
        self.flops, self.precision = float(first["flops"]), str(first["precision"])

    def _read(self) -> dict[str, float | str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"training worker exited with {self.proc.wait()}")
        return json.loads(line)

    def time(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


@dataclass
class Timings:
    seconds: list[float]  # per step, one entry per round
    flops: float  # of one step
    precision: str


def compare(
    trees: dict[str, Path],
    preset: str,
    rounds: int,
    steps: int,
    batch: int,
    size: int = 128,
    overrides: dict[str, Any] | None = None,
    tree_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Timings]:
    """Each tree's seconds per step, ``rounds`` turns each, the order alternating from round to round.
    ``size``: the preset's image size; ``overrides``: TrainConfig fields of both (e.g. a tiny discriminator);
    ``tree_overrides``: fields of one tree's config only (a recipe change the other code does not know)."""
    tree_overrides = tree_overrides or {}
    workers = {
        name: Worker(tree, preset, batch, size, (overrides or {}) | tree_overrides.get(name, {}))
        for name, tree in trees.items()
    }
    out = {name: Timings([], w.flops, w.precision) for name, w in workers.items()}
    try:
        names = list(trees)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                out[name].seconds.append(workers[name].time(steps))
            log.info("%s round %d: %s", preset, r, {n: f"{batch / t.seconds[-1]:.2f} img/s" for n, t in out.items()})
    finally:
        for worker in workers.values():
            worker.close()
    return out


def per_round_speedup(old: list[float], new: list[float]) -> float:
    """The median over rounds of ``old / new`` seconds a step in the same round. The VM's speed swings by up to
    2× within minutes (bench/RESULTS.md), so the ratio of the two codes' medians can pair a slow turn of one
    with a fast turn of the other; turns of one round ran a few seconds apart."""
    return statistics.median(a / b for a, b in zip(old, new, strict=True))


def run(
    against: str = BASELINE,
    rounds: int = 8,
    steps: int = 2,
    batch: int = 16,
    presets: tuple[str, ...] = PRESETS,
    precision: str = "auto",
    settings: dict[str, Any] | None = None,
) -> str:
    """``precision``: both codes' ``TrainConfig.precision`` (``fp32`` times the path of a CPU without bf16 units
    on one that has them); ``settings``: TrainConfig fields of this tree's trainer only (``--set``, e.g. a
    recipe's ``rec_fraction``), named in the table's title."""
    settings = settings or {}
    rows, peaks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), against], cwd=ROOT, check=True)
        try:
            trees = {against: old_tree, "this tree": ROOT}
            for preset in presets:
                overrides = {} if precision == "auto" else {"precision": precision}
                result = compare(
                    trees, preset, rounds, steps, batch, overrides=overrides, tree_overrides={"this tree": settings}
                )
                old, new = result[against].seconds, result["this tree"].seconds
                wins = sum(b < a for a, b in zip(old, new, strict=True))
                for name, r in result.items():
                    if r.precision not in peaks:  # measured once per precision, after the workers closed
                        peaks[r.precision] = max(peak_flops(torch.bfloat16 if r.precision == "bf16" else torch.float32))
                    med = statistics.median(r.seconds)
                    ratio = (
                        f"**{statistics.median(old) / med:.2f}x**, faster in {wins}/{rounds} rounds, per-round "
                        f"median {per_round_speedup(old, new):.2f}x"
                    )
                    rows.append(
                        [
                            preset,
                            name,
                            r.precision,
                            batch / med,
                            med * 1000,
                            r.flops / 1e9,
                            f"{r.flops / med / peaks[r.precision]:.0%}",
                            ratio if name == "this tree" else "",
                        ]
                    )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    header = ["preset", "code", "precision", "images/s (median)", "ms/step", "GFLOP/step", "share of peak"]
    header.append("vs " + against)
    peak_text = ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items())
    command = f"python bench/train_ab.py --against {against} --rounds {rounds} --steps {steps}"
    if presets != PRESETS:
        command += " --presets " + ",".join(presets)
    if precision != "auto":
        command += f" --precision {precision}"
    command += "".join(f" --set {k}={v}" for k, v in settings.items())
    note = (
        f"Batch {batch}, {rounds} rounds of {steps} steps per code, turns alternating (`{command}`); peak: the best "
        f"of a 2048² matmul and a 3x3 conv ({peak_text})."
    )
    forced = "" if precision == "auto" else f", {precision} in both"
    recipe = "".join(f", this tree with {k}={v}" for k, v in settings.items())
    title = f"### Training step against {against} (interleaved, batch {batch}{forced}{recipe})"
    return f"{title}\n\n{machine()}\n\n{note}\n\n" + table(header, rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--against", default=BASELINE, help="git revision to compare with (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="both codes' precision")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field of this tree's trainer only (a recipe change, e.g. rec_fraction=0.25); repeatable",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    presets = tuple(args.presets.split(","))
    settings = parse_settings(args.set)
    log.info("\n%s", run(args.against, args.rounds, args.steps, args.batch, presets, args.precision, settings))


if __name__ == "__main__":
    main()
