"""Registry: architecture names -> network class, config class and named presets.

Presets ``<arch>`` are the paper-size configs; ``<arch>-cpu`` the ones this project trains on a
2-core CPU; ``<arch>-tiny`` the ones tests build in milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from models.classifier import AttributeClassifier
from models.config import (
    ClassifierConfig,
    DiscriminatorConfig,
    EncoderDecoderConfig,
    StarGANConfig,
    config_from_dict,
)
from models.discriminator import Discriminator
from models.generators import EncoderDecoderGenerator, StarGANGenerator


@dataclass(frozen=True)
class Architecture:
    name: str
    kind: str  # "generator" | "classifier" | "discriminator"
    config_cls: type
    build: Callable[[Any], nn.Module]
    presets: dict[str, Any] = field(default_factory=dict)


def _tiny(config: Any, **changes: Any) -> Any:
    return dataclasses.replace(config, **changes)


_STGAN = EncoderDecoderConfig(
    conditioning="diff", skip="stu", n_skip_layers=4, n_inject_layers=4, base_channels=64, max_channels=1024
)
_ATTGAN = EncoderDecoderConfig(
    conditioning="target", skip="concat", n_skip_layers=1, n_inject_layers=1, base_channels=64, max_channels=1024
)
# MU-GAN: self-attention after the 64- and 128-channel encoder layers and the 128- and 64-channel
# decoder layers, AUCs at 8x8 and 16x16 each followed by two 3x3 conv blocks.
_MUGAN = EncoderDecoderConfig(
    conditioning="target",
    skip="auc",
    n_skip_layers=2,
    n_inject_layers=1,
    skip_conv_block=True,
    base_channels=64,
    max_channels=1024,
    enc_attention=(0, 1),
    dec_attention=(2, 3),
)
_STARGAN = StarGANConfig()

# CPU presets: 32 base channels capped at 256, spatial-attention head on, resize + 3x3 conv
# up-sampling (no checkerboard; the released models of the first campaign up-sample with 4x4
# transposed convs and say so in their config.json). Self-attention for MU-GAN is moved one level
# down (32x32 and 16x16 instead of 64x64 and 32x32), where it costs ~16x less, and MU-GAN-cpu is
# conditioned on the attribute difference, as STGAN is (measured in the first campaign: the target-
# conditioned MU-GAN stopped editing; see the README).
_CPU = dict(base_channels=32, max_channels=256, mask_head=True, upsample="resize")
_TINY = dict(image_size=32, base_channels=4, max_channels=16, n_layers=3, upsample="resize")

ARCHITECTURES: dict[str, Architecture] = {
    "stgan": Architecture(
        "stgan",
        "generator",
        EncoderDecoderConfig,
        EncoderDecoderGenerator,
        {
            "stgan": _STGAN,
            "stgan-cpu": _tiny(_STGAN, **_CPU),
            "stgan-tiny": _tiny(_STGAN, **_TINY, n_skip_layers=2, n_inject_layers=2, mask_head=True),
        },
    ),
    "attgan": Architecture(
        "attgan",
        "generator",
        EncoderDecoderConfig,
        EncoderDecoderGenerator,
        {
            "attgan": _ATTGAN,
            "attgan-cpu": _tiny(_ATTGAN, **_CPU),
            "attgan-tiny": _tiny(_ATTGAN, **_TINY),
        },
    ),
    "mugan": Architecture(
        "mugan",
        "generator",
        EncoderDecoderConfig,
        EncoderDecoderGenerator,
        {
            "mugan": _MUGAN,
            "mugan-cpu": _tiny(_MUGAN, **_CPU, conditioning="diff", enc_attention=(1, 2), dec_attention=(1, 2)),
            "mugan-tiny": _tiny(_MUGAN, **_TINY, enc_attention=(0, 1), dec_attention=(0, 1), mask_head=True),
        },
    ),
    "stargan": Architecture(
        "stargan",
        "generator",
        StarGANConfig,
        StarGANGenerator,
        {
            "stargan": _STARGAN,
            "stargan-cpu": _tiny(_STARGAN, base_channels=32, n_res_blocks=4, mask_head=True),
            "stargan-tiny": _tiny(_STARGAN, image_size=32, base_channels=4, n_res_blocks=1),
        },
    ),
    "discriminator": Architecture(
        "discriminator",
        "discriminator",
        DiscriminatorConfig,
        Discriminator,
        {
            "discriminator": DiscriminatorConfig(),
            "discriminator-cpu": DiscriminatorConfig(base_channels=32, max_channels=256, fc_dim=256),
            "discriminator-tiny": DiscriminatorConfig(
                image_size=32, base_channels=4, max_channels=16, n_layers=3, fc_dim=8
            ),
        },
    ),
    "classifier": Architecture(
        "classifier",
        "classifier",
        ClassifierConfig,
        AttributeClassifier,
        {
            "classifier": ClassifierConfig(),
            "classifier-tiny": ClassifierConfig(image_size=32, base_channels=4, max_channels=16, n_layers=3),
        },
    ),
}

GENERATOR_ARCHITECTURES = tuple(name for name, arch in ARCHITECTURES.items() if arch.kind == "generator")


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def all_presets() -> dict[str, tuple[str, Any]]:
    """Preset name -> (architecture name, config)."""
    return {p: (a.name, cfg) for a in ARCHITECTURES.values() for p, cfg in a.presets.items()}


def get_preset(name: str) -> tuple[str, Any]:
    """(architecture name, a fresh copy of the preset's config)."""
    presets = all_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}")
    arch, cfg = presets[name]
    return arch, dataclasses.replace(cfg)


def build(architecture: str, config: Any) -> nn.Module:
    arch = get_architecture(architecture)
    if not isinstance(config, arch.config_cls):
        raise TypeError(f"{architecture} needs a {arch.config_cls.__name__}, got {type(config).__name__}")
    return arch.build(config)


def parse_config(architecture: str, data: dict[str, Any]) -> Any:
    return config_from_dict(get_architecture(architecture).config_cls, data)
