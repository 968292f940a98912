"""Tiny served models for server and browser tests (made on the fly, never downloaded)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from models.checkpoint import save_pretrained
from models.registry import build, get_preset
from server.faces import DEFAULT_TEMPLATE

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos"


def make_weights(
    root: Path, generators: tuple[str, ...] = ("stgan-tiny",), seed: int = 0, classifier: bool = True
) -> Path:
    """A weights folder with tiny 32-px generators (mask head on) and a tiny 40-attribute classifier."""
    torch.manual_seed(seed)
    for preset in generators:
        arch, cfg = get_preset(preset)
        if hasattr(cfg, "mask_head"):
            cfg = dataclasses.replace(cfg, mask_head=True)
        gen = build(arch, cfg)
        with torch.no_grad():  # make the random network do visible edits: open its mask
            gen.to_image.bias.data[-1:] = 2.0 if cfg.mask_head else gen.to_image.bias.data[-1:]
        save_pretrained(
            root / preset.split("-")[0],
            gen,
            architecture=arch,
            alignment_template={"landmarks": DEFAULT_TEMPLATE},
            metrics={"test": {"psnr": 20.0, "ssim": 0.5, "mean_edit_success": 0.5, "mean_preservation": 0.9}},
        )
    if classifier:
        arch, cfg = get_preset("classifier-tiny")
        save_pretrained(root / "classifier", build(arch, cfg), architecture=arch, metrics={"val_mean_accuracy": 0.5})
    return root
