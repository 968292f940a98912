"""The training configuration: one typed dataclass, saved inside every checkpoint (nanoGPT style)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.attributes import STGAN_ATTRIBUTES
from models.config import config_from_dict, config_to_dict


@dataclass
class TrainConfig:
    # what to train
    preset: str = "stgan-cpu"
    disc_preset: str = "discriminator-cpu"
    #: Overrides applied to the generator preset, e.g. {"base_channels": 16}.
    generator_overrides: dict[str, Any] = field(default_factory=dict)
    attributes: tuple[str, ...] = STGAN_ATTRIBUTES
    # data
    data: str = "../shared/datasets/celebahq-128"
    cache_dir: str = ".cache/datasets/celebahq-128"
    batch_size: int = 32
    hflip: bool = True
    #: Fraction of the batch whose target flips one random attribute (the rest get the labels of
    #: another image of the batch, as STGAN/AttGAN sample them).
    single_flip_fraction: float = 0.5
    # optimisation
    total_steps: int = 200_000
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    #: Multiply both learning rates by 0.1 from this step on (STGAN: after half the epochs).
    lr_decay_step: int = 100_000
    n_critic: int = 1
    #: "nsgan" (logistic loss + lazy R1) or "wgan" (Wasserstein + gradient penalty, as the papers).
    gan_loss: str = "nsgan"
    lambda_gp: float = 10.0
    r1_gamma: float = 1.0
    r1_interval: int = 4
    lambda_rec: float = 100.0
    #: With a mask head: L1 of the raw (unblended) decoder output against the input at zero difference.
    lambda_rec_raw: float = 100.0
    lambda_g_cls: float = 10.0
    lambda_d_cls: float = 1.0
    lambda_mask_l1: float = 0.2
    lambda_mask_tv: float = 1.0
    #: Per edited image, the mask's mean is pushed above this floor (see losses.mask_regularisation).
    mask_floor: float = 0.05
    lambda_mask_floor: float = 10.0
    ema_decay: float = 0.999
    # machinery
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    threads: int = 0
    log_every: int = 10
    sample_every: int = 500
    eval_every: int = 1000
    eval_images: int = 500
    #: Edit gain the val selection measures at (released models are served at a calibrated gain > 1).
    eval_gain: float = 1.0
    #: Training checkpoint this run was warm-started from (``train --init-from``); "" for a fresh run.
    init_from: str = ""
    checkpoint_every_minutes: float = 10.0
    classifier: str = "weights/classifier"

    def __post_init__(self) -> None:
        if self.gan_loss not in ("nsgan", "wgan"):
            raise ValueError(f"gan_loss must be 'nsgan' or 'wgan', got {self.gan_loss!r}")
        self.attributes = tuple(self.attributes)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        overrides = data.pop("generator_overrides", {})
        cfg = config_from_dict(cls, data)
        cfg.generator_overrides = dict(overrides)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
