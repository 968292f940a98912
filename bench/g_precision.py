"""Benchmark 4d — how close is a generator step's gradient under bf16 autocast to fp32's?

For each release in weights/ (its stored train config, its G and D as released), G's gradient of the
training objective (``Trainer.generator_objective``: the generator pass and loss of one step's batch, eager,
D fixed) on the same batches in fp32 and under bf16 autocast: the cosine of the whole gradient, the ratio of
the norms, and the parameters that agree least, with each one's gradient norm in both. A parameter whose
exact gradient is zero (a self-attention key's bias: softmax ignores a constant added to all of a query's
logits) gets the rounding's noise for a gradient, and Adam turns any gradient into a step the size of the
learning rate, so those rows say where bf16 training moves weights that fp32 training leaves alone.

Run: ``python bench/g_precision.py [--models mugan,stgan] [--batches 3]`` (needs the dataset cache of
``python -m training prepare``; about a minute a model on 2 cores). On a CPU without bf16 units bf16 is
emulated (slow), and training never chooses it there (``precision=auto``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from bench.common import ROOT, machine, table
from training.config import TrainConfig
from training.trainer import Trainer

log = logging.getLogger(__name__)

#: Rows of the least agreeing parameters per model.
WORST = 6


def release_config(release: Path, precision: str) -> TrainConfig:
    """A release's stored train config in ``precision``, eager (a compiled pass would time, not differ)."""
    stored = json.loads((release / "config.json").read_text())["training"]["train_config"]
    return TrainConfig.from_dict(
        stored | {"precision": precision, "compile_generator": "off", "compile_discriminator": "off"}
    )


def generator_gradients(trainer: Trainer, steps: list[int]) -> dict[str, torch.Tensor]:
    """G's gradient of the objective summed over ``steps`` (each its own batch), in float64."""
    trainer.G.zero_grad(set_to_none=True)
    for step in steps:
        g_loss, _ = trainer.generator_objective(step)
        g_loss.backward()
    return {name: p.grad.double().clone() for name, p in trainer.G.named_parameters() if p.grad is not None}


def agreement(
    reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]
) -> tuple[float, float, list[tuple[str, float, float, float]]]:
    """Cosine of the whole gradients, ``|other| / |reference|``, and per parameter (cosine, |reference|,
    |other|), least agreeing first."""
    names = list(reference)
    flat_ref = torch.cat([reference[n].flatten() for n in names])
    flat_other = torch.cat([other[n].flatten() for n in names])
    cosine = torch.nn.functional.cosine_similarity(flat_ref, flat_other, dim=0).item()
    ratio = (flat_other.norm() / flat_ref.norm()).item()
    rows = [
        (
            n,
            torch.nn.functional.cosine_similarity(reference[n].flatten(), other[n].flatten(), dim=0).item(),
            reference[n].norm().item(),
            other[n].norm().item(),
        )
        for n in names
    ]
    return cosine, ratio, sorted(rows, key=lambda row: row[1])


def compare_precisions(configs: dict[str, TrainConfig], steps: list[int], init_from: Path | None) -> tuple:
    """:func:`agreement` of bf16's gradient with fp32's: ``configs`` maps "fp32" and "bf16" to the same
    config in each precision; both trainers are seeded alike and, with ``init_from``, load that release."""
    grads = {}
    for precision, cfg in configs.items():
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, run_dir)
            if init_from is not None:
                trainer.init_from(init_from)
            grads[precision] = generator_gradients(trainer, [trainer.step + s for s in steps])
    return agreement(grads["fp32"], grads["bf16"])


def run(weights: Path, models: tuple[str, ...] = ("mugan", "stgan"), batches: int = 3) -> str:
    header = ("model", "parameter", "cosine bf16 / fp32", "|g| fp32", "|g| bf16")
    rows = []
    totals = []
    for name in models:
        release = weights / name
        if not (release / "config.json").is_file():
            log.warning("no release at %s", release)
            continue
        configs = {p: release_config(release, p) for p in ("fp32", "bf16")}
        cosine, ratio, worst = compare_precisions(configs, list(range(batches)), release)
        totals.append(f"{name}: cosine {cosine:.4f}, norm ratio {ratio:.4f}")
        rows += [(name, n, f"{c:.3f}", f"{a:.2e}", f"{b:.2e}") for n, c, a, b in worst[:WORST]]
        log.info("%s", totals[-1])
    return (
        f"### G's training gradient under bf16 autocast against fp32 (the served releases)\n\n{machine()}\n\n"
        f"G's gradient of the objective summed over {batches} training batches of 16 from the release's step, "
        f"eager, D as released (`python bench/g_precision.py --batches {batches}`). Whole gradient: "
        f"{'; '.join(totals)}. The {WORST} least agreeing parameters of each:\n\n" + table(header, rows) + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--models", default="mugan,stgan", help="comma-separated release names in --weights")
    p.add_argument("--batches", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    log.info("\n%s", run(args.weights, tuple(args.models.split(",")), args.batches))


if __name__ == "__main__":
    main()
