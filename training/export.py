"""Export a run's checkpoint into a released model folder, and write its model card."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import (
    CONFIG_FILE,
    DISCRIMINATOR_FILE,
    CheckpointError,
    atomic_save_tensors,
    atomic_write_bytes,
    read_config,
    save_pretrained,
    write_config,
)
from models.device import machine_description
from training.data import CachedFaces, read_meta
from training.evaluation import calibration_table, markdown_table
from training.trainer import ema_generator_from_checkpoint, read_training_checkpoint
from training.visualize import edit_grid

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.png"


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
    """Write ``model.safetensors`` (EMA generator), ``config.json``, ``card.md`` and ``samples.png``."""
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
    training = {
        "preset": train_cfg["preset"],
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
    # Keep the calibrated edit gain and test metrics of an earlier export only if they belong to
    # this very checkpoint; a new checkpoint starts at gain 1 until `calibrate` runs.
    edit_gain = 1.0
    if (out / CONFIG_FILE).is_file():
        try:
            old = read_config(out)
        except CheckpointError:
            old = {}
        if old.get("training", {}).get("steps") == step:
            edit_gain = float(old.get("edit_gain", 1.0))
            for key in ("calibration", "test"):
                if key in old.get("metrics", {}):
                    metrics[key] = old["metrics"][key]
    state_dtype_model = gen.to(dtype) if dtype != torch.float32 else gen
    save_pretrained(
        out,
        state_dtype_model,
        architecture=arch,
        name=name or out.name,
        alignment_template=template,
        edit_gain=edit_gain,
        metrics=metrics,
        training=training,
    )
    gen.float()
    export_discriminator(ckpt, out, train_cfg, gen.config.image_size, dtype)
    if cache_dir is not None and (Path(cache_dir) / "meta.json").is_file():
        write_samples(gen, cache_dir, out / SAMPLES_FILE, n_samples, gain=edit_gain)
    elif cache_dir is not None:
        log.warning("no dataset cache in %s: no samples.png (pass --cache-dir)", cache_dir)
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


def write_samples(
    gen: torch.nn.Module,
    cache_dir: str | Path,
    path: Path,
    n: int,
    split: str = "test",
    offset: int = 0,
    gain: float = 1.0,
) -> None:
    data = CachedFaces(cache_dir, split, tuple(gen.config.attributes), limit=offset + n)
    idx = torch.arange(offset, min(offset + n, len(data)))
    x, c = data.get(idx)
    edit_grid(gen, x, c, tuple(gen.config.attributes), gain=gain).save(path)


def write_card(folder: str | Path) -> None:
    """(Re)write ``card.md`` from ``config.json``: training facts, val and test metrics."""
    folder = Path(folder)
    doc = read_config(folder)
    tr, metrics = doc.get("training", {}), doc.get("metrics", {})
    tc = tr.get("train_config", {})
    cfg = doc["config"]
    targets = "PSNR ≥ 30 dB, SSIM ≥ 0.93, mean edit success ≥ 70 %, preservation ≥ 90 %"
    parts = [
        f"# {doc['name']}: {doc['architecture'].upper()} attribute editor",
        "",
        f"Architecture `{doc['architecture']}` (preset `{tr.get('preset')}`), {doc['image_size']}×{doc['image_size']}, "
        f"conditioning on the attribute **{doc['conditioning']}**, spatial-attention mask head: "
        f"{'yes' if doc['mask_head'] else 'no'}. "
        f"Base width {cfg.get('base_channels')}, max {cfg.get('max_channels')} channels.",
        "",
        f"Attributes, in order: {', '.join(doc['attributes'])}.",
        "",
        "## Training",
        "",
        f"- steps: {tr.get('steps')} (batch {tr.get('batch_size')}, {tr.get('images_seen')} images seen, "
        f"GAN loss `{tr.get('gan_loss')}`)",
        f"- wall time: {tr.get('wall_hours')} h of training, {tr.get('images_per_s')} images/s "
        f"({tc.get('threads') or 'default'} torch thread(s))",
        f"- losses: GAN `{tc.get('gan_loss')}` with {tc.get('n_critic')} critic step(s); λ_rec {tc.get('lambda_rec')}, "
        f"λ_rec-raw {tc.get('lambda_rec_raw')}, λ_G-cls {tc.get('lambda_g_cls')}, λ_D-cls {tc.get('lambda_d_cls')}, "
        f"λ_mask-L1 {tc.get('lambda_mask_l1')}, λ_mask-TV {tc.get('lambda_mask_tv')}; Adam lr {tc.get('lr_g')} / "
        f"{tc.get('lr_d')}",
        f"- realism and locality terms: λ_G-cls on the changed attributes {tc.get('lambda_g_cls_changed', 0.0)}, "
        f"D-cls class balance cap {tc.get('d_cls_balance_max', 1.0)}, differences scaled by U(1, "
        f"{tc.get('diff_scale_max', 1.0)}), mask border weight {tc.get('mask_border_weight', 0.0)}, "
        f"λ_background {tc.get('lambda_background', 0.0)}; up-sampling "
        f"`{cfg.get('upsample', 'deconv')}`; precision {tc.get('precision', 'bf16 autocast (amp)')}",
        f"- machine: {tr.get('machine')}",
        f"- checkpoint: `{tr.get('checkpoint')}`"
        + (" (selected on the val split)" if tr.get("checkpoint") == "best.safetensors" else " (the run's latest)"),
        "- reproduce: `python -m training train --preset "
        f"{tr.get('preset')} --run runs/{doc['name']} --resume` with the train config stored in config.json",
    ]
    if tc.get("generator_overrides"):
        changed = ", ".join(f"`{k}={v}`" for k, v in tc["generator_overrides"].items())
        parts.append(f"- changed from the `{tr.get('preset')}` preset: {changed}")
    if tc.get("init_from"):
        parts.append(
            f"- warm-started (`--init-from`) from `{tc['init_from']}`; steps, images and wall time above "
            "include the parent run's training (and its parents', where it was warm-started too)"
        )
        parent = Path(tc["init_from"]) / CONFIG_FILE
        if parent.is_file():
            parent_attrs = json.loads(parent.read_text()).get("attributes") or []
            added = [a for a in doc["attributes"] if a not in parent_attrs]
            if added:
                parts.append(f"- attributes added to the parent release's: {', '.join(added)}")
    if tc.get("data"):
        parts.append(f"- data: `{tc['data']}` (cache `{tc.get('cache_dir')}`)")
    parts.append("")
    gain = float(doc.get("edit_gain", 1.0))
    parts += [
        "## Slider",
        "",
        f"A slider at ±1 asks for an attribute difference of ±1, which the model receives multiplied by its "
        f"**edit gain ×{gain:g}** (STGAN's `test_int` at test time; training always uses ×1).",
        "",
    ]
    if metrics.get("calibration"):
        parts += [calibration_table(metrics["calibration"]), ""]
    else:
        parts += ["Not calibrated yet: `python -m training calibrate --model <folder>` picks it on val.", ""]
    if metrics.get("val"):
        val_gain = float(metrics["val"].get("edit_gain", tc.get("eval_gain", 1.0)))
        parts += [f"## Validation (at selection, edit gain ×{val_gain:g})", "", markdown_table(metrics["val"]), ""]
    if "test" in metrics:
        t = metrics["test"]
        parts += [
            f"## Test split evaluation (`python -m training evaluate --model {folder}`)",
            "",
            markdown_table(t),
            "",
        ]
        misses = []
        if t["psnr"] < 30:
            misses.append(f"PSNR {t['psnr']:.2f} < 30 dB")
        if t["ssim"] < 0.93:
            misses.append(f"SSIM {t['ssim']:.3f} < 0.93")
        if "mean_edit_success" in t and t["mean_edit_success"] < 0.70:
            misses.append(f"edit success {t['mean_edit_success']:.1%} < 70 %")
        if "mean_preservation" in t and t["mean_preservation"] < 0.90:
            misses.append(f"preservation {t['mean_preservation']:.1%} < 90 %")
        verdict = "meets all targets" if not misses else "falls short: " + "; ".join(misses)
        parts += [f"Targets ({targets}): **{verdict}**.", ""]
    else:
        parts += ["Not yet evaluated on the test split.", ""]
    if (folder / SAMPLES_FILE).is_file():
        parts += [
            f"## Samples (test faces, edit gain ×{gain:g}; rows: edit, then its mask)",
            "",
            f"![samples]({SAMPLES_FILE})",
            "",
        ]
    parts += [
        "## Licence",
        "",
        "Trained on CelebA-HQ with CelebA's labels, released for **non-commercial research purposes only**; "
        "these weights inherit that restriction.",
        "",
    ]
    atomic_write_bytes(folder / "card.md", "\n".join(parts).encode())


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
