"""The networks a :class:`~training.config.TrainConfig` trains, built from its presets."""

from __future__ import annotations

import dataclasses

from torch import nn

from models.generators import AttributeGenerator
from models.registry import build, get_preset
from training.config import TrainConfig


def build_generator(cfg: TrainConfig) -> tuple[str, AttributeGenerator]:
    arch, gcfg = get_preset(cfg.preset)
    gcfg = dataclasses.replace(gcfg, attributes=tuple(cfg.attributes), **cfg.generator_overrides)
    return arch, build(arch, gcfg)  # type: ignore[return-value]


def build_discriminator(cfg: TrainConfig, image_size: int) -> nn.Module:
    arch, dcfg = get_preset(cfg.disc_preset)
    dcfg = dataclasses.replace(dcfg, n_attrs=len(cfg.attributes), image_size=image_size)
    return build(arch, dcfg)
