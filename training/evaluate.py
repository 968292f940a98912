"""``evaluate``, ``calibrate`` and ``grid`` commands on a released model folder or a training checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from models.attributes import EditGain, edit_gain_spec, gain_record, gain_text
from models.checkpoint import (
    CONFIG_FILE,
    DISCRIMINATOR_FILE,
    CheckpointError,
    check_state_dict,
    load_pretrained,
    read_config,
    read_tensors,
    write_config,
)
from models.device import pick_device
from models.generators import AttributeGenerator
from training.checkpoints import ema_generator_from_checkpoint, read_training_checkpoint
from training.config import TrainConfig
from training.data import CachedFaces
from training.export import update_metrics, write_release_samples
from training.metrics import choose_attribute_gains, choose_gain, evaluate_generator
from training.networks import build_discriminator
from training.realism import RealismConfig, RealismInputs, RealismUnavailableError, realism_inputs, realism_on_split
from training.reports import COMBINED_SAMPLES_FILE, SAMPLES_FILE, markdown_table, write_card

log = logging.getLogger(__name__)


def load_generator(model: str | Path) -> tuple[AttributeGenerator, EditGain]:
    """The generator (fp32) of a released folder or a training checkpoint, and its edit gain (one for
    every slider, or each attribute's where it has sliders calibrated on their own)."""
    path = Path(model)
    if path.is_dir():
        gen, info = load_pretrained(path)
        if info.kind != "generator":
            raise SystemExit(f"{path} holds a {info.kind}, not a generator")
        return gen.float(), info.gain()  # type: ignore[return-value]
    _, gen, _ = ema_generator_from_checkpoint(path)
    return gen, 1.0


def load_discriminator(model: str | Path, gen: AttributeGenerator) -> torch.nn.Module | None:
    """The discriminator of a released folder (``discriminator.safetensors``, built from its training
    config) or of a training checkpoint (its ``D``), or None (a release without one). ``gen`` gives the
    attributes and image size; the discriminator must have been trained for the same attributes."""
    path = Path(model)
    if path.is_dir():
        if not (path / DISCRIMINATOR_FILE).is_file():
            return None
        train_config = (read_config(path).get("training") or {}).get("train_config") or {}
        tensors = {k: v.float() for k, v in read_tensors(path / DISCRIMINATOR_FILE).items()}
    else:
        all_tensors, meta = read_training_checkpoint(path)
        train_config = json.loads(meta.get("train_config") or "{}")
        tensors = {k[len("D.") :]: v.float() for k, v in all_tensors.items() if k.startswith("D.")}
    disc_preset = train_config.get("disc_preset", TrainConfig.disc_preset)
    cfg = TrainConfig(attributes=tuple(gen.config.attributes), disc_preset=disc_preset)
    discriminator = build_discriminator(cfg, gen.config.image_size)
    try:
        check_state_dict(discriminator.state_dict(), tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: its discriminator does not fit this generator's attributes ({exc})") from None
    discriminator.load_state_dict(tensors)
    return discriminator.eval().to(gen_device(gen))


def _classifier(classifier: str, device: torch.device) -> tuple[torch.nn.Module | None, tuple[str, ...]]:
    if classifier and (Path(classifier) / CONFIG_FILE).is_file():
        clf, info = load_pretrained(classifier, device)
        return clf, info.attributes
    log.warning("no classifier at %s: only PSNR/SSIM", classifier)
    return None, ()


def evaluate_command(
    model: str,
    cache_dir: str,
    split: str,
    classifier: str,
    out: str | None,
    limit: int | None,
    amp: bool,
    gain: EditGain | None = None,
    realism_faces: int = 60,
    realism_combined: int = 120,
    realism_only: bool = False,
    discriminator: str | None = None,
) -> dict:
    """Evaluate at ``gain`` (default: the model's own edit gains). Only a full test-split run at the
    model's own gain is recorded in its config.json and card. ``realism_faces`` > 0 adds the
    realism report (:mod:`training.realism`) on that many faces of the split. ``discriminator`` (a
    release folder or a training checkpoint; default: the model's own) is the D whose verdict on the
    edits is reported beside the classifier's; with another model's D the report is not recorded."""
    device = pick_device("auto")
    gen, own_gain = load_generator(model)
    gen = gen.to(device)
    gain = own_gain if gain is None else gain
    if realism_only:
        return _realism_only(model, gen, cache_dir, split, gain, realism_faces, realism_combined, amp)
    attributes = tuple(gen.config.attributes)
    clf, clf_attrs = _classifier(classifier, device)
    data = CachedFaces(cache_dir, split, attributes, limit=limit)
    x, c = data.get(torch.arange(len(data)))
    metrics = evaluate_generator(
        gen,
        x,
        c,
        attributes,
        clf,
        clf_attrs,
        batch_size=50,
        device=device,
        amp=amp,
        progress=True,
        gain=gain,
        discriminator=load_discriminator(discriminator or model, gen),
    )
    metrics["split"] = split
    if discriminator:
        metrics["discriminator"] = str(discriminator)
    if realism_faces > 0:
        metrics["realism"] = _realism(
            gen, cache_dir, split, gain, RealismConfig(n_faces=realism_faces, n_combined=realism_combined), amp
        )
    release = Path(model).is_dir()
    recorded = release and split == "test" and limit is None and gain == own_gain and not discriminator
    # a release folder's metrics.json / metrics.md are its recorded test report: any other evaluation
    # of it writes files only where --out says (a checkpoint's go beside it)
    out_dir = Path(out) if out else (Path(model) if recorded else None if release else Path(model).parent)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (out_dir / "metrics.md").write_text(markdown_table(metrics))
    if recorded:
        recorded = (read_config(Path(model)).get("metrics") or {}).get("test") or {}
        if "realism" not in metrics and recorded.get("realism") and recorded.get("edit_gain", 1.0) == gain_record(gain):
            # the realism report depends on the generator and the gain only: a classifier-only re-run keeps it
            metrics["realism"] = recorded["realism"]
        update_metrics(model, "test", metrics)
    log.info("\n%s", markdown_table(metrics))
    return metrics


def _realism_only(
    model: str,
    gen: AttributeGenerator,
    cache_dir: str,
    split: str,
    gain: EditGain,
    faces: int,
    combined: int,
    amp: bool,
) -> dict:
    """Add the realism report to a released model's recorded test metrics (measured at the same gain)
    without re-running the classifier's evaluation."""
    folder = Path(model)
    recorded = (read_config(folder).get("metrics") or {}).get("test") if folder.is_dir() else None
    if split != "test" or recorded is None or recorded.get("edit_gain", 1.0) != gain_record(gain):
        raise SystemExit("--realism-only adds to a released model's test metrics at its own gain: run evaluate first")
    report = _realism(gen, cache_dir, split, gain, RealismConfig(n_faces=faces, n_combined=combined), amp)
    if report is None:
        raise SystemExit("no realism report: the Inception weights are missing")
    update_metrics(folder, "test", recorded | {"realism": report})
    log.info("\n%s", markdown_table(recorded | {"realism": report}))
    return report


def _realism(
    gen: AttributeGenerator,
    cache_dir: str,
    split: str,
    gain: EditGain,
    config: RealismConfig,
    amp: bool,
    inputs: RealismInputs | None = None,
) -> dict | None:
    try:
        return realism_on_split(
            gen,
            cache_dir,
            split,
            gain,
            config,
            precision="bf16" if amp else "fp32",
            device=gen_device(gen),
            progress=True,
            inputs=inputs,
        )
    except RealismUnavailableError as exc:
        log.warning("no realism report: %s", exc)
        return None


def gen_device(gen: torch.nn.Module) -> torch.device:
    return next(gen.parameters()).device


def calibrate_command(
    model: str,
    cache_dir: str,
    split: str,
    classifier: str,
    limit: int | None,
    gains: list[float],
    min_preservation: float,
    amp: bool,
    n_samples: int = 6,
    realism_faces: int = 20,
    per_attribute: bool = False,
) -> EditGain:
    """Pick the edit gain of a released model on the val split and write it into its config.json.

    The chosen gain is the one with the highest mean edit success, less a realism penalty measured
    on ``realism_faces`` faces (matched KID and background change, see ``realism_penalty``), among
    those whose mean preservation stays at or above ``min_preservation`` (1.0 if none does).
    ``per_attribute`` then gives a slider its own gain where another candidate scores better on that
    attribute's edits alone (:func:`training.metrics.choose_attribute_gains`). Test metrics measured at
    other gains are dropped (they no longer describe the served model); the sample grids and the card are
    rewritten.
    """
    if per_attribute and realism_faces <= 0:
        raise SystemExit("--per-attribute needs the realism probe (--realism-faces > 0)")
    folder = Path(model)
    if not folder.is_dir():
        raise SystemExit(f"calibrate needs a released model folder (weights/<name>), not {model}")
    device = pick_device("auto")
    gen, _ = load_generator(folder)
    gen = gen.to(device)
    attributes = tuple(gen.config.attributes)
    clf, clf_attrs = _classifier(classifier, device)
    if clf is None:
        raise SystemExit("calibrate needs the attribute classifier (--classifier)")
    data = CachedFaces(cache_dir, split, attributes, limit=limit)
    x, c = data.get(torch.arange(len(data)))
    rows = []
    try:  # the splits and the Inception network once, for every gain's probe
        probe_inputs = realism_inputs(cache_dir, split, attributes) if realism_faces > 0 else None
    except RealismUnavailableError as exc:
        if per_attribute:
            raise SystemExit(f"--per-attribute needs the realism probe: {exc}") from None
        log.warning("no realism probe: %s", exc)
        probe_inputs, realism_faces = None, 0
    for g in gains:
        m = evaluate_generator(gen, x, c, attributes, clf, clf_attrs, batch_size=50, device=device, amp=amp, gain=g)
        log.info(
            "gain %.2f: edit success %.1f%%, preservation %.1f%%",
            g,
            100 * m["mean_edit_success"],
            100 * m["mean_preservation"],
        )
        row = {k: m[k] for k in ("edit_gain", "mean_edit_success", "mean_preservation", "edit_success", "preservation")}
        if realism_faces > 0:
            probe = RealismConfig(n_faces=realism_faces, n_combined=0, subset_size=realism_faces * 13)
            report = _realism(gen, cache_dir, split, g, probe, amp, probe_inputs)
            if report is not None:
                keys = (
                    "kid_x1000",
                    "background_change_worst",
                    "kid_x1000_per_attribute",
                    "background_change",
                    "protocol",
                )
                row["realism"] = {k: report[k] for k in keys}
                log.info(
                    "gain %.2f: matched KID×1000 %.1f, worst background change %.2f",
                    g,
                    report["kid_x1000"],
                    report["background_change_worst"],
                )
        rows.append(row)
    chosen = choose_gain(rows, min_preservation)
    own = choose_attribute_gains(rows, chosen, attributes) if per_attribute else {}
    gain = edit_gain_spec(attributes, chosen, own)
    doc = read_config(folder)
    doc["edit_gain"] = chosen
    doc.pop("attribute_gains", None)
    if own:
        doc["attribute_gains"] = own
    metrics = doc.setdefault("metrics", {})
    metrics["calibration"] = {
        "split": split,
        "n_images": len(data),
        "min_preservation": min_preservation,
        "chosen": chosen,
        "per_attribute": per_attribute,
        "attribute_gains": own,
        "rows": rows,
    }
    if "test" in metrics and metrics["test"].get("edit_gain", 1.0) != gain_record(gain):
        log.info("dropping the test metrics measured at gain %s", metrics["test"].get("edit_gain", 1.0))
        del metrics["test"]
    write_config(folder, doc)
    write_release_samples(gen.cpu(), cache_dir, folder / SAMPLES_FILE, n_samples, gain=gain)
    write_release_samples(gen.cpu(), cache_dir, folder / COMBINED_SAMPLES_FILE, n_samples, gain=gain, combined=True)
    write_card(folder)
    log.info("edit gain of %s: %s", folder, gain_text(gain))
    return gain


def grid_command(model: str, cache_dir: str, split: str, out: str, n: int, offset: int, combined: bool = False) -> None:
    gen, gain = load_generator(model)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_release_samples(gen, cache_dir, Path(out), n, split=split, offset=offset, gain=gain, combined=combined)
    log.info("wrote %s", out)
