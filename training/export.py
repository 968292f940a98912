"""Export a run's checkpoint into a released model folder, and write its model card."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from models.attributes import EditGain, edit_gain_spec
from models.checkpoint import (
    CONFIG_FILE,
    DISCRIMINATOR_FILE,
    CheckpointError,
    atomic_save_tensors,
    read_config,
    save_pretrained,
    write_config,
)
from models.device import machine_description
from training.checkpoints import ema_generator_from_checkpoint, read_training_checkpoint
from training.data import CachedFaces, read_meta
from training.reports import COMBINED_SAMPLES_FILE, SAMPLES_FILE, SAMPLES_JPEG_QUALITY, write_card
from training.visualize import combined_grid, edit_grid

log = logging.getLogger(__name__)


def resolve_checkpoint(run: str | Path, checkpoint: str) -> Path:
    run = Path(run)
    if checkpoint in ("best", "last"):
        path = run / "checkpoints" / f"{checkpoint}.safetensors"
        if checkpoint == "best" and not path.is_file():
            log.warning("%s has no best checkpoint yet; exporting last", run)
            path = run / "checkpoints" / "last.safetensors"
        return path
    return Path(checkpoint)


def export_run(
    run: str | Path,
    out: str | Path,
    checkpoint: str = "best",
    cache_dir: str | Path | None = None,
    name: str | None = None,
    notify: str | None = None,
    dtype: torch.dtype = torch.float16,
    n_samples: int = 6,
) -> Path:
    """Write ``model.safetensors`` (EMA generator), ``config.json``, ``card.md`` and the sample grids."""
    ckpt = resolve_checkpoint(run, checkpoint)
    arch, gen, meta = ema_generator_from_checkpoint(ckpt)
    train_cfg = json.loads(meta["train_config"])
    template = None
    if cache_dir is not None:
        template = read_meta(cache_dir, missing_ok=True).get("alignment_template")
    parent = Path(train_cfg["init_from"]) if train_cfg.get("init_from") else None
    if template is None and parent is not None and (parent / CONFIG_FILE).is_file():
        # a fine-tune of a release aligns faces as its parent did
        template = read_config(parent).get("alignment_template")
        if template is not None:
            log.info("alignment template taken from the parent release %s", parent)
    if template is None:
        log.warning("no alignment template in %s: run `python -m training prepare --template-only`", cache_dir)
    step, elapsed, images = int(meta["step"]), float(meta["elapsed_seconds"]), int(meta["images_seen"])
    run_dir = Path(run) if Path(run).is_dir() else ckpt.parent.parent
    training = {
        "preset": train_cfg["preset"],
        "run": run_dir.as_posix(),
        "checkpoint": ckpt.name,
        "steps": step,
        "images_seen": images,
        "wall_hours": round(elapsed / 3600, 2),
        "images_per_s": round(images / elapsed, 2) if elapsed else None,
        "batch_size": train_cfg["batch_size"],
        "gan_loss": train_cfg["gan_loss"],
        "machine": machine_description(),
        "train_config": train_cfg,
    }
    best = json.loads(meta.get("best_metrics") or "{}")
    metrics: dict[str, Any] = {"val": best} if best else {}
    out = Path(out)
    # Keep the calibrated edit gains and test metrics of an earlier export only if they belong to
    # this very checkpoint; a new checkpoint starts at gain 1 until `calibrate` runs.
    edit_gain, attribute_gains = 1.0, {}
    if (out / CONFIG_FILE).is_file():
        try:
            old = read_config(out)
        except CheckpointError:
            old = {}
        if old.get("training", {}).get("steps") == step:
            edit_gain = float(old.get("edit_gain", 1.0))
            attribute_gains = old.get("attribute_gains") or {}
            for key in ("calibration", "test"):
                if key in old.get("metrics", {}):
                    metrics[key] = old["metrics"][key]
    # a copy in the release's dtype: ``gen`` itself stays fp32 (the samples below are drawn from it)
    save_pretrained(
        out,
        copy.deepcopy(gen).to(dtype),
        architecture=arch,
        name=name or out.name,
        alignment_template=template,
        edit_gain=edit_gain,
        attribute_gains=attribute_gains,
        metrics=metrics,
        training=training,
    )
    export_discriminator(ckpt, out, train_cfg, gen.config.image_size, dtype)
    if cache_dir is not None and (Path(cache_dir) / "meta.json").is_file():
        gain = edit_gain_spec(gen.config.attributes, edit_gain, attribute_gains)
        write_release_samples(gen, cache_dir, out / SAMPLES_FILE, n_samples, gain=gain)
        write_release_samples(gen, cache_dir, out / COMBINED_SAMPLES_FILE, n_samples, gain=gain, combined=True)
    elif cache_dir is not None:
        log.warning("no dataset cache in %s: no sample grids (pass --cache-dir)", cache_dir)
    write_card(out)
    log.info("exported %s (step %d) to %s", ckpt, step, out)
    if notify:
        notify_server(notify)
    return out


def export_discriminator(
    ckpt: Path, out: Path, train_cfg: dict[str, Any], image_size: int, dtype: torch.dtype = torch.float16
) -> Path:
    """``discriminator.safetensors`` beside the generator: what ``train --init-from weights/<name>``
    needs to fine-tune without starting D from scratch. Its architecture and config are in the
    file's metadata; the server never reads it."""
    from models.config import config_to_dict
    from models.registry import get_preset

    tensors, _ = read_training_checkpoint(ckpt)
    d_tensors = {k[2:]: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items() if k.startswith("D.")}
    arch, dcfg = get_preset(train_cfg["disc_preset"])
    dcfg = dataclasses.replace(dcfg, n_attrs=len(train_cfg["attributes"]), image_size=image_size)
    meta = {"format": "pt", "architecture": arch, "config": json.dumps(config_to_dict(dcfg))}
    path = out / DISCRIMINATOR_FILE
    atomic_save_tensors(path, {k: v.contiguous() for k, v in d_tensors.items()}, meta)
    return path


def write_release_samples(
    gen: torch.nn.Module,
    cache_dir: str | Path,
    path: Path,
    n: int,
    split: str = "test",
    offset: int = 0,
    gain: EditGain = 1.0,
    combined: bool = False,
) -> None:
    """A grid of ``n`` faces of ``split``: every attribute flipped, or (``combined``) several at once."""
    data = CachedFaces(cache_dir, split, tuple(gen.config.attributes), limit=offset + n)
    idx = torch.arange(offset, min(offset + n, len(data)))
    x, c = data.get(idx)
    attributes = tuple(gen.config.attributes)
    grid = combined_grid(gen, x, c, attributes, gain=gain) if combined else edit_grid(gen, x, c, attributes, gain=gain)
    grid.save(path, quality=SAMPLES_JPEG_QUALITY)  # the format follows the suffix (SAMPLES_FILE: JPEG)


def notify_server(url: str) -> None:
    import httpx

    token = os.environ.get("FACE_EDITOR_ADMIN_TOKEN", "")
    try:
        resp = httpx.post(url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    except httpx.HTTPError as exc:
        raise SystemExit(f"export done, but notifying {url} failed: {exc}") from None
    if resp.status_code != 200:
        raise SystemExit(f"export done, but {url} answered {resp.status_code}: {resp.text[:200]}")
    log.info("notified %s: %s", url, resp.text[:200])


def update_metrics(folder: str | Path, key: str, metrics: dict) -> None:
    folder = Path(folder)
    doc = read_config(folder)
    doc.setdefault("metrics", {})[key] = metrics
    write_config(folder, doc)
    write_card(folder)


def recompute_release_batchnorm(
    model: str | Path,
    out: str | Path,
    cache_dir: str | Path,
    batches: int = 32,
    batch_size: int = 16,
    seed: int = 0,
) -> Path:
    """Re-estimate a released generator's BatchNorm statistics from its own activations on training
    faces (:mod:`training.batchnorm`) and write the result to ``out`` (a copy of the folder; ``out`` may
    be ``model``). Edits are drawn as the release's recipe drew them (single-flip fraction, flip weights,
    difference scale). The metrics and calibrated gain measured with the old statistics are dropped
    (gain back to 1): run ``calibrate`` and ``evaluate`` again."""
    import shutil

    from models.attributes import exclusive_groups_for
    from models.checkpoint import WEIGHTS_FILE, load_pretrained, read_tensors
    from training.batchnorm import edit_batches, recompute_batchnorm
    from training.data import sample_targets

    model, out = Path(model), Path(out)
    gen, info = load_pretrained(model)
    if info.kind != "generator":
        raise SystemExit(f"{model} holds a {info.kind}, not a generator")
    dtype = next(t.dtype for t in read_tensors(model / WEIGHTS_FILE).values() if t.is_floating_point())
    gen = gen.float()
    doc = read_config(model)
    recipe = (doc.get("training") or {}).get("train_config") or {}
    if recipe.get("freeze_batchnorm"):
        raise SystemExit(
            f"{model} was trained with its BatchNorm statistics fixed (freeze_batchnorm): they are part of "
            "what it learned, and re-estimating them would change its edits"
        )
    attributes = tuple(gen.config.attributes)
    faces = CachedFaces(cache_dir, "train", attributes)
    rng = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(faces), generator=rng)[: batches * batch_size]
    batch_size = min(batch_size, len(idx))
    idx = idx[: len(idx) // batch_size * batch_size]  # whole batches: a short last one skews the average
    x, c_src = faces.get(idx, torch.rand(len(idx), generator=rng) < 0.5)
    flip_weights = recipe.get("flip_weights") or {}
    weights = torch.tensor([float(flip_weights.get(a, 1.0)) for a in attributes]) if flip_weights else None
    groups = exclusive_groups_for(list(attributes))
    c_trg = sample_targets(c_src, rng, groups, float(recipe.get("single_flip_fraction", 0.5)), weights)
    scale = 1.0 + (float(recipe.get("diff_scale_max", 1.0)) - 1.0) * torch.rand(len(idx), 1, generator=rng)
    joint = bool(recipe.get("joint_decode", False))  # releases trained before it decoded apart
    n = recompute_batchnorm(gen, edit_batches(gen, x, c_src, c_trg, batch_size, scale), joint)  # type: ignore[arg-type]
    if n == 0:
        raise SystemExit(f"{model} has no BatchNorm layers: nothing to recompute")
    if out.resolve() != model.resolve():
        shutil.copytree(model, out, dirs_exist_ok=True)
    training = dict(doc.get("training") or {})
    training["batchnorm"] = {
        "recomputed_on": "train",
        "images": len(idx),
        "batch_size": batch_size,
        "seed": seed,
        "from": model.as_posix(),
    }
    save_pretrained(
        out,
        copy.deepcopy(gen).to(dtype),
        architecture=info.architecture,
        name=out.name,
        alignment_template=info.alignment_template,
        edit_gain=1.0,
        metrics={},
        training=training,
        extra=doc.get("extra") or {},
    )
    if (Path(cache_dir) / "meta.json").is_file():
        write_release_samples(gen.eval(), cache_dir, out / SAMPLES_FILE, 6)
        write_release_samples(gen, cache_dir, out / COMBINED_SAMPLES_FILE, 6, combined=True)
    write_card(out)
    log.info("%s: BatchNorm statistics re-estimated on %d batches (%d training faces) -> %s", model, n, len(idx), out)
    return out
