"""``python -m training <command>``: prepare, train, classifier, evaluate, calibrate, export, grid, compare."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("training")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs as TrainConfig fields (values read as JSON where they parse)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = _parse_value(value)
    return out


def cmd_prepare(args: argparse.Namespace) -> None:
    from training.data import check_cache_source, prepare_cache, read_meta, write_meta
    from training.template import compute_template

    if not args.template_only:
        if not args.overwrite:
            check_cache_source(args.cache_dir, args.data)
        meta = prepare_cache(args.data, args.cache_dir, args.image_size)
        log.info("cache ready in %s: %s", args.cache_dir, meta["counts"])
    if args.template_samples > 0:
        template = compute_template(args.cache_dir, args.template_samples)
        meta = read_meta(args.cache_dir)
        meta["alignment_template"] = template
        write_meta(args.cache_dir, meta)
        log.info("alignment template from %d faces: %s", template["n_faces"], template["landmarks"])


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from training import distributed
    from training.checkpoints import read_training_checkpoint
    from training.config import TrainConfig
    from training.trainer import Trainer

    run_dir = Path(args.run)
    ckpt = run_dir / "checkpoints" / "last.safetensors"
    overrides = parse_settings(args.set)
    if args.resume and ckpt.is_file():
        _, meta = read_training_checkpoint(ckpt)
        data = json.loads(meta["train_config"]) | overrides
    else:
        if args.resume:
            log.info("no checkpoint in %s yet: starting a new run", run_dir)
        data = json.loads(Path(args.config).read_text()) if args.config else {}
        if args.preset:
            data["preset"] = args.preset
        if args.data:  # the user's own CelebA-format folder, with a cache of its own
            data["data"] = args.data
            data["cache_dir"] = str(Path(".cache/datasets") / Path(args.data).resolve().name)
        data |= overrides
        add = [a.strip() for a in (args.add_attributes or "").split(",") if a.strip()]
        if add and not (args.init_from and Path(args.init_from).is_dir()):
            raise SystemExit("--add-attributes extends a released model: use it with --init-from weights/<name>")
        if args.init_from and Path(args.init_from).is_dir():
            data = release_train_config(Path(args.init_from), data, add)
        if args.init_from:
            data["init_from"] = str(args.init_from)
    if args.threads:
        data["threads"] = args.threads
    cfg = TrainConfig.from_dict(data)  # built once; nothing changes it afterwards (it is frozen)
    if args.data and not (args.resume and ckpt.is_file()):
        ensure_cache(cfg)
    trainer = Trainer(cfg, run_dir)
    if args.resume and ckpt.is_file():
        trainer.load_checkpoint(ckpt)
        log.info("resumed %s at step %d", ckpt, trainer.step)
    elif args.init_from:
        trainer.init_from(args.init_from, fresh_discriminator=args.fresh_discriminator)
        log.info("warm-started from %s at step %d", args.init_from, trainer.step)
    n_params = sum(p.numel() for p in trainer.G.parameters())
    log.info("generator %s: %.2fM parameters; torch threads %d", cfg.preset, n_params / 1e6, torch.get_num_threads())
    try:
        trainer.fit(max_minutes=args.max_minutes, max_steps=args.max_steps)
    finally:
        distributed.shutdown()


def ensure_cache(cfg: Any) -> None:
    """Prepare ``cfg.data`` into ``cfg.cache_dir`` on first use; refuse a cache of another folder and
    images that are not at the model's resolution (nothing is written then)."""
    from PIL import Image

    from models.registry import get_preset
    from training.data import IMAGE_DIR, DatasetError, check_cache_source, prepare_cache, read_index

    if check_cache_source(cfg.cache_dir, cfg.data):
        return
    _, gcfg = get_preset(cfg.preset)
    size = int(cfg.generator_overrides.get("image_size", gcfg.image_size))
    index = read_index(cfg.data)
    with Image.open(index.root / IMAGE_DIR / index.files[0]) as im:
        if im.size != (size, size):
            raise DatasetError(
                f"{cfg.data}: images are {im.size[0]}x{im.size[1]}, the model works on {size}x{size} aligned "
                "faces: align and resize them first (the server's alignment template is in weights/<name>/config.json)"
            )
    log.info("preparing %s into %s (first use)", cfg.data, cfg.cache_dir)
    prepare_cache(cfg.data, cfg.cache_dir, size)


def release_train_config(folder: Path, data: dict[str, Any], add_attributes: list[str] | None = None) -> dict[str, Any]:
    """The TrainConfig fields that make a run build the network of the release in ``folder``: its
    preset (unless one is given), and, as generator overrides, every field of its generator config
    that differs from that preset, except those the caller overrides explicitly."""
    from models.checkpoint import read_config
    from models.config import config_to_dict
    from models.registry import get_preset, parse_config

    doc = read_config(folder)
    data = dict(data)
    preset = data.get("preset") or (doc.get("training") or {}).get("preset")
    if not preset:
        raise SystemExit(f"{folder}: its config.json names no training preset; pass --preset")
    data["preset"] = preset
    _, preset_cfg = get_preset(preset)
    defaults = config_to_dict(preset_cfg)
    release_cfg = config_to_dict(parse_config(doc["architecture"], doc["config"]))
    explicit = dict(data.get("generator_overrides") or {})
    inherited = {k: v for k, v in release_cfg.items() if k != "attributes" and defaults.get(k) != v}
    data["generator_overrides"] = inherited | explicit
    data.setdefault("attributes", release_cfg["attributes"])
    if add_attributes:
        from models.attributes import validate_attributes

        try:
            validate_attributes(add_attributes)
        except ValueError as exc:
            raise SystemExit(f"--add-attributes: {exc}; nothing written") from None
        present = [a for a in add_attributes if a in data["attributes"]]
        if present:
            raise SystemExit(f"--add-attributes: {', '.join(present)} already edited by {folder}; nothing written")
        data["attributes"] = [*data["attributes"], *add_attributes]
    return data


def cmd_classifier(args: argparse.Namespace) -> None:
    from training.classifier import train_classifier

    train_classifier(
        cache_dir=args.cache_dir,
        out_dir=args.out,
        preset=args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_minutes=args.max_minutes,
        threads=args.threads,
        limit=args.limit,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate_command

    evaluate_command(
        args.model,
        args.cache_dir,
        args.split,
        args.classifier,
        args.out,
        args.limit,
        _amp(args),
        gain=args.gain,
        realism_faces=args.realism_faces,
        realism_combined=args.realism_combined,
        realism_only=args.realism_only,
        discriminator=args.discriminator,
    )


def _amp(args: argparse.Namespace) -> bool:
    """bf16 autocast for this command: ``--precision`` (auto: only where the device has bf16 units)."""
    from models.device import pick_device
    from models.precision import resolve_precision

    precision = resolve_precision(args.precision, pick_device("auto"))
    log.info("precision %s -> %s", args.precision, precision)
    return precision == "bf16"


def cmd_calibrate(args: argparse.Namespace) -> None:
    from training.evaluate import calibrate_command

    gains = [float(g) for g in args.gains.split(",")]
    calibrate_command(
        args.model,
        args.cache_dir,
        args.split,
        args.classifier,
        args.limit,
        gains,
        args.min_preservation,
        _amp(args),
        realism_faces=args.realism_faces,
        per_attribute=args.per_attribute,
    )


def cmd_export(args: argparse.Namespace) -> None:
    from training.export import export_run

    export_run(
        args.run, args.out, checkpoint=args.checkpoint, cache_dir=args.cache_dir, name=args.name, notify=args.notify
    )


def cmd_recompute_bn(args: argparse.Namespace) -> None:
    from training.export import recompute_release_batchnorm

    recompute_release_batchnorm(args.model, args.out or args.model, args.cache_dir, args.batches, seed=args.seed)


def cmd_grid(args: argparse.Namespace) -> None:
    from training.evaluate import grid_command

    grid_command(args.model, args.cache_dir, args.split, args.out, args.n, args.offset, args.combined)


def cmd_compare(args: argparse.Namespace) -> None:
    from training.curves import (
        SUMMARY,
        attribute_keys,
        compare_report,
        load_history,
        plot_curves,
        validated_attributes,
    )

    names = args.names.split(",") if args.names else [None] * len(args.runs)
    if len(names) != len(args.runs):
        raise SystemExit(f"--names gives {len(names)} names for {len(args.runs)} runs")
    runs = [load_history(run, name) for run, name in zip(args.runs, names, strict=True)]
    attributes = args.attributes.split(",") if args.attributes else None
    report = compare_report(runs, attributes, args.directions)
    sys.stdout.write(report)
    if args.out:
        Path(args.out).write_text(report)
    if args.plot:
        panels = list(SUMMARY) + attribute_keys(attributes or validated_attributes(runs[0]), args.directions)
        plot_curves(runs, panels).save(args.plot)
        log.info("wrote %s (%d panels, %d runs)", args.plot, len(panels), len(runs))


def _precision_args(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 only with bf16 units"
    )
    s.add_argument("--no-amp", dest="precision", action="store_const", const="fp32", help="same as --precision fp32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    cache = ".cache/datasets/celebahq-128"

    s = sub.add_parser(
        "prepare", help="check a CelebA-format folder, decode it into a cache, compute the alignment template"
    )
    s.add_argument("--data", default="../shared/datasets/celebahq-128")
    s.add_argument("--cache-dir", default=cache)
    s.add_argument("--image-size", type=int, default=128)
    s.add_argument(
        "--template-samples", type=int, default=2000, help="training faces for the landmark template (0: skip)"
    )
    s.add_argument("--template-only", action="store_true", help="only (re)compute the template of an existing cache")
    s.add_argument("--overwrite", action="store_true", help="replace a cache that was prepared from another folder")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train a GAN preset (resumable)")
    s.add_argument("--preset", help="model preset, e.g. stgan-cpu, mugan-cpu (see models.registry)")
    s.add_argument("--config", help="a TrainConfig JSON file")
    s.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="run folder (checkpoints, samples, tensorboard); under torchrun spell it --run-dir",
    )
    s.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.safetensors if present")
    s.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start a new run from another run's networks (a training .safetensors) or from a released "
        "model folder (weights/<name>); ignored when resuming",
    )
    s.add_argument(
        "--add-attributes",
        metavar="A,B",
        help="with --init-from a release: also learn these attributes (CelebA names); the generator's "
        "conditioning inputs and D's attribute head grow, the new weights starting at zero",
    )
    s.add_argument(
        "--fresh-discriminator",
        action="store_true",
        help="with --init-from a release that has no discriminator: accept starting D from scratch",
    )
    s.add_argument(
        "--data",
        metavar="DIR",
        help="your own CelebA-format folder (images/ + list_attr_celeba.txt; list_eval_partition.txt optional: "
        "without it a split is made from file-name hashes); cached in .cache/datasets/<folder name> on first use",
    )
    s.add_argument("--max-minutes", type=float, help="stop (and checkpoint) after this much wall time")
    s.add_argument("--max-steps", type=int, help="stop after this many more steps")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("classifier", help="train the attribute classifier into a weights folder")
    s.add_argument("--cache-dir", default=cache)
    s.add_argument("--out", default="weights/classifier")
    s.add_argument("--preset", default="classifier")
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--max-minutes", type=float)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--limit", type=int, help="use only the first N training images (tests)")
    s.set_defaults(func=cmd_classifier)

    s = sub.add_parser("evaluate", help="edit success, preservation, PSNR/SSIM of a model folder or checkpoint")
    s.add_argument("--model", required=True, help="weights/<name> folder or a training checkpoint .safetensors")
    s.add_argument("--cache-dir", default=cache)
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--classifier", default="weights/classifier")
    s.add_argument(
        "--out",
        help="folder for metrics.json and metrics.md (default: beside a checkpoint; a release folder only "
        "for its recorded report: the full test split at its own gains with its own D)",
    )
    s.add_argument("--limit", type=int, help="only the first N images of the split")
    s.add_argument(
        "--discriminator",
        help="a release folder or training checkpoint whose D reads the edits (default: the model's own); "
        "e.g. an earlier or later D of the same run, to see whether G satisfies D with the attribute",
    )
    _precision_args(s)
    s.add_argument("--gain", type=float, help="edit gain to evaluate at (default: the model's own)")
    s.add_argument("--realism-faces", type=int, default=60, help="faces for the realism report (0: none)")
    s.add_argument("--realism-combined", type=int, default=120, help="combined edits in the realism report")
    s.add_argument(
        "--realism-only",
        action="store_true",
        help="only add the realism report to a released model's recorded test metrics (no classifier run)",
    )
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser(
        "calibrate", help="choose a released model's edit gain (slider ±1 → difference ±gain) on the val split"
    )
    s.add_argument("--model", required=True, help="weights/<name> folder; its config.json gets the gain")
    s.add_argument("--cache-dir", default=cache)
    s.add_argument("--split", default="val", choices=["train", "val"])
    s.add_argument("--classifier", default="weights/classifier")
    s.add_argument("--limit", type=int, default=500, help="first N faces of the split")
    s.add_argument("--gains", default="1,1.25,1.5,1.75,2,2.5", help="comma-separated candidates")
    s.add_argument("--min-preservation", type=float, default=0.92, help="mean preservation a gain must keep")
    _precision_args(s)
    s.add_argument("--realism-faces", type=int, default=20, help="faces of the realism probe per gain (0: none)")
    s.add_argument(
        "--per-attribute",
        action="store_true",
        help="also give a slider its own gain where another candidate scores better on its edits alone "
        "(edit success, preservation, matched KID and background change of that attribute; needs the probe)",
    )
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("export", help="export a run's checkpoint into weights/<name>")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True, help="e.g. weights/stgan")
    s.add_argument("--checkpoint", default="best", help="best | last | a path")
    s.add_argument("--cache-dir", default=cache, help="where the alignment template is read from")
    s.add_argument("--name")
    s.add_argument("--notify", help="URL of a running server's /v1/models/reload to call afterwards")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "recompute-bn",
        help="re-estimate a released generator's BatchNorm statistics from its own activations on training faces",
    )
    s.add_argument("--model", required=True, help="weights/<name> folder")
    s.add_argument("--out", help="folder to write (default: the model's own; its metrics and gain are reset)")
    s.add_argument("--cache-dir", default=cache)
    s.add_argument("--batches", type=int, default=32, help="batches of 16 training faces")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_recompute_bn)

    s = sub.add_parser(
        "compare",
        help="runs' validation histories side by side: table at shared steps, paired differences, curves",
    )
    s.add_argument("runs", nargs="+", help="run folders (or val_metrics.jsonl files); the first is the baseline")
    s.add_argument("--names", help="comma-separated labels for the runs (default: their folder names)")
    s.add_argument("--attributes", help="comma-separated attributes (default: all the first run validated)")
    s.add_argument("--directions", action="store_true", help="edit success of each direction (on / off)")
    s.add_argument("--out", help="also write the markdown here")
    s.add_argument("--plot", help="PNG of the curves: summary measures and each attribute's edit success")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("grid", help="sample grid PNG of a model: every attribute flipped on split faces")
    s.add_argument("--model", required=True)
    s.add_argument("--cache-dir", default=cache)
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=6)
    s.add_argument("--offset", type=int, default=0)
    s.add_argument(
        "--combined", action="store_true", help="several sliders at once (training/visualize.py:COMBINATIONS)"
    )
    s.set_defaults(func=cmd_grid)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from models.checkpoint import CheckpointError
    from models.memory import retain_freed_memory
    from training.data import DatasetError

    retain_freed_memory(1 << 30)  # large activations reused, not page-faulted in at every step
    try:
        args.func(args)
    except (DatasetError, CheckpointError) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
