"""``evaluate`` and ``grid`` commands on a released model folder or a training checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from models.checkpoint import load_pretrained
from models.generators import AttributeGenerator
from training.data import CachedFaces
from training.evaluation import evaluate_generator, markdown_table
from training.export import update_metrics, write_samples
from training.trainer import ema_generator_from_checkpoint, pick_device

log = logging.getLogger(__name__)


def load_generator(model: str | Path) -> AttributeGenerator:
    path = Path(model)
    if path.is_dir():
        gen, info = load_pretrained(path)
        if info.kind != "generator":
            raise SystemExit(f"{path} holds a {info.kind}, not a generator")
        return gen.float()  # type: ignore[return-value]
    _, gen, _ = ema_generator_from_checkpoint(path)
    return gen


def evaluate_command(
    model: str, cache_dir: str, split: str, classifier: str, out: str | None, limit: int | None, amp: bool
) -> dict:
    device = pick_device("auto")
    gen = load_generator(model).to(device)
    attributes = tuple(gen.config.attributes)
    clf, clf_attrs = None, ()
    if classifier and (Path(classifier) / "config.json").is_file():
        clf, info = load_pretrained(classifier, device)
        clf_attrs = info.attributes
    else:
        log.warning("no classifier at %s: only PSNR/SSIM", classifier)
    data = CachedFaces(cache_dir, split, attributes, limit=limit)
    x, c = data.get(torch.arange(len(data)))
    metrics = evaluate_generator(
        gen, x, c, attributes, clf, clf_attrs, batch_size=50, device=device, amp=amp, progress=True
    )
    metrics["split"] = split
    out_dir = Path(out) if out else (Path(model) if Path(model).is_dir() else Path(model).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "metrics.md").write_text(markdown_table(metrics))
    if Path(model).is_dir() and split == "test" and limit is None:
        update_metrics(model, "test", metrics)
    log.info("\n%s", markdown_table(metrics))
    return metrics


def grid_command(model: str, cache_dir: str, split: str, out: str, n: int, offset: int) -> None:
    gen = load_generator(model)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_samples(gen, cache_dir, Path(out), n, split=split, offset=offset)
    log.info("wrote %s", out)
