"""Training the project's attribute classifier (evaluation judge, and the server's attribute estimate)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import save_pretrained
from models.device import machine_description, pick_device
from models.registry import build, get_preset
from training.data import CachedFaces, StepSampler, read_meta, step_generator
from training.reports import classifier_card

log = logging.getLogger(__name__)


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, data: CachedFaces, device: torch.device, amp: bool, batch_size: int = 128
) -> np.ndarray:
    """Per-attribute accuracy of ``model`` on ``data``."""
    model.eval()
    correct = torch.zeros(len(data.attributes))
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x, c = data.get(idx)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.to(device).contiguous(memory_format=torch.channels_last))
        correct += ((logits.float() > 0).float().cpu() == c).float().sum(0)
    return (correct / len(data)).numpy()


def train_classifier(
    cache_dir: str,
    out_dir: str,
    preset: str = "classifier",
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 1e-3,
    max_minutes: float | None = None,
    threads: int = 0,
    limit: int | None = None,
    amp: bool = True,
    seed: int = 0,
) -> dict:
    """Train on the train split (all attributes of the preset), pick the best epoch on val, save."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = pick_device("auto")
    arch, cfg = get_preset(preset)
    meta = read_meta(cache_dir)
    cfg = dataclasses.replace(cfg, attributes=tuple(a for a in cfg.attributes if a in meta["attr_names"]))
    train = CachedFaces(cache_dir, "train", cfg.attributes, limit=limit)
    val = CachedFaces(cache_dir, "val", cfg.attributes, limit=limit)
    if train.image_size != cfg.image_size:
        cfg = dataclasses.replace(cfg, image_size=train.image_size)
    model = build(arch, cfg).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sampler = StepSampler(len(train), batch_size, seed)
    total = epochs * sampler.batches_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else math.inf
    best_acc, best_state, history = -1.0, None, []
    t_start, step = time.monotonic(), 0
    for epoch in range(epochs):
        model.train()
        bar = tqdm(range(sampler.batches_per_epoch), desc=f"classifier epoch {epoch + 1}/{epochs}", mininterval=5.0)
        for _ in bar:
            gen = step_generator(seed, step)
            x, c = train.get(sampler.indices(step), torch.rand(batch_size, generator=gen) < 0.5)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x.to(device).contiguous(memory_format=torch.channels_last))
            loss = F.binary_cross_entropy_with_logits(logits.float(), c.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0:
                bar.set_postfix(
                    loss=f"{loss.item():.3f}", img_s=f"{step * batch_size / (time.monotonic() - t_start):.0f}"
                )
            if time.monotonic() > deadline:
                break
        acc = accuracy(model, val, device, amp)
        history.append({"epoch": epoch + 1, "val_mean_accuracy": float(acc.mean())})
        log.info("epoch %d: val mean accuracy %.4f", epoch + 1, acc.mean())
        if acc.mean() > best_acc:
            best_acc, best_acc_per = float(acc.mean()), acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if time.monotonic() > deadline:
            log.info("time limit reached after epoch %d", epoch + 1)
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    wall = time.monotonic() - t_start
    metrics = {
        "split": "val",
        "val_mean_accuracy": best_acc,
        "val_accuracy": {a: float(v) for a, v in zip(cfg.attributes, best_acc_per, strict=True)},
    }
    training = {
        "steps": step,
        "epochs_run": len(history),
        "batch_size": batch_size,
        "wall_seconds": round(wall, 1),
        "images_per_s": round(step * batch_size / wall, 1),
        "history": history,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "machine": machine_description(),
    }
    save_pretrained(
        out_dir,
        model,
        architecture=arch,
        name=Path(out_dir).name,
        metrics=metrics,
        training=training,
        card=classifier_card(Path(out_dir).name, cfg.attributes, metrics, training),
    )
    log.info("saved %s (val mean accuracy %.4f)", out_dir, best_acc)
    return metrics
