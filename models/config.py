"""Typed configurations of every network, serialisable to and from JSON-friendly dicts."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from models.attributes import CELEBA_ATTRIBUTES, CONDITIONING_MODES, STGAN_ATTRIBUTES, validate_attributes

NORMS = ("batch", "instance", "none")
SKIPS = ("none", "concat", "stu", "auc")
UPSAMPLING = ("deconv", "resize")


@dataclass
class GeneratorConfig:
    """What every generator config has: the attributes it edits, the image size and how the
    condition is fed (``diff``: target − source, ``target``: the target labels)."""

    attributes: tuple[str, ...] = STGAN_ATTRIBUTES
    image_size: int = 128
    conditioning: str = "diff"
    #: An attention-mask head: the output is ``mask * raw + (1 - mask) * input``.
    mask_head: bool = False

    def __post_init__(self) -> None:
        self.attributes = validate_attributes(self.attributes)
        _check_choice("conditioning", self.conditioning, CONDITIONING_MODES)

    @property
    def n_attrs(self) -> int:
        return len(self.attributes)


@dataclass
class EncoderDecoderConfig(GeneratorConfig):
    """AttGAN-shaped generator. AttGAN, STGAN and MU-GAN are configurations of it.

    Encoder: ``n_layers`` conv 4x4 stride 2 (+norm, LeakyReLU), channels ``base * 2**i`` capped at
    ``max_channels``. Decoder: mirrored transposed convs with the paper's widths (twice the matching
    encoder feature), tanh output. The condition vector is tiled at the bottleneck and after the
    first ``n_inject_layers`` decoder layers. ``skip`` picks one kind of skip connection for the first
    ``n_skip_layers`` decoder layers: plain concat (AttGAN), STU (STGAN) or AUC (MU-GAN).
    """

    base_channels: int = 64
    max_channels: int = 1024
    n_layers: int = 5
    norm: str = "batch"
    skip: str = "stu"
    n_skip_layers: int = 4
    n_inject_layers: int = 4
    stu_kernel: int = 3
    #: MU-GAN: two 3x3 conv + norm + ReLU after each skip concatenation.
    skip_conv_block: bool = False
    #: With ``skip_conv_block``: only the first this many skip levels have the conv block (-1: all).
    #: The skip levels after them (AUCs only) append their gated encoder feature last, after the
    #: level's condition and self-attention, so the next layer reads it through new input channels:
    #: a generator with more such levels warm-starts from one with fewer by zero-widening
    #: (:func:`models.generators.widen_state_dict`). MU-GAN's paper has two skip levels (8x8, 16x16);
    #: its decoder then rebuilds 32x32 and 64x64 detail from a 16x16 feature (decoder-only PSNR ~24 dB).
    n_skip_conv_layers: int = -1
    #: Encoder layer indices (0 = first, highest resolution) followed by SAGAN self-attention.
    enc_attention: tuple[int, ...] = ()
    #: Decoder layer indices (0 = first, lowest resolution) followed by self-attention.
    dec_attention: tuple[int, ...] = ()
    #: How the decoder (and STGAN's STUs) up-sample: ``deconv`` (4x4 stride-2 transposed conv, the
    #: papers') or ``resize`` (nearest x2 + 3x3 conv: no checkerboard). Released models without the
    #: field are ``deconv``.
    upsample: str = "deconv"

    def is_late_skip(self, j: int) -> bool:
        """Whether decoder skip level ``j`` appends its gated feature last (see ``n_skip_conv_layers``)."""
        return 0 <= self.n_skip_conv_layers <= j < self.n_skip_layers

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("norm", self.norm, NORMS)
        _check_choice("skip", self.skip, SKIPS)
        _check_choice("upsample", self.upsample, UPSAMPLING)
        if self.image_size % (2**self.n_layers):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**n_layers ({2**self.n_layers})")
        if not 0 <= self.n_skip_layers <= self.n_layers - 1:
            raise ValueError(f"n_skip_layers must be in [0, {self.n_layers - 1}]")
        if not -1 <= self.n_skip_conv_layers <= self.n_skip_layers:
            raise ValueError(f"n_skip_conv_layers must be -1 (all) or in [0, n_skip_layers={self.n_skip_layers}]")
        if self.n_skip_conv_layers != -1 and not (self.skip == "auc" and self.skip_conv_block):
            raise ValueError("n_skip_conv_layers applies to AUC skips with skip_conv_block")
        if not 0 <= self.n_inject_layers <= self.n_layers - 1:
            raise ValueError(f"n_inject_layers must be in [0, {self.n_layers - 1}]")
        for name, idx in (("enc_attention", self.enc_attention), ("dec_attention", self.dec_attention)):
            bad = [i for i in idx if not 0 <= i < self.n_layers - 1]
            if bad:
                raise ValueError(f"{name} indices {bad} out of range [0, {self.n_layers - 2}]")


@dataclass
class StarGANConfig(GeneratorConfig):
    """StarGAN generator: target labels tiled and concatenated to the input image."""

    conditioning: str = "target"
    base_channels: int = 64
    n_down: int = 2
    n_res_blocks: int = 6
    norm: str = "instance"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("norm", self.norm, NORMS)


@dataclass
class DiscriminatorConfig:
    """Conv trunk with an adversarial head and an attribute-classification head (AttGAN/STGAN)."""

    n_attrs: int = 13
    image_size: int = 128
    base_channels: int = 64
    max_channels: int = 1024
    n_layers: int = 5
    fc_dim: int = 1024
    norm: str = "instance"

    def __post_init__(self) -> None:
        _check_choice("norm", self.norm, NORMS)


@dataclass
class ClassifierConfig:
    """The project's attribute classifier (evaluation, and the server's current-attribute estimate)."""

    attributes: tuple[str, ...] = CELEBA_ATTRIBUTES
    image_size: int = 128
    base_channels: int = 32
    max_channels: int = 256
    n_layers: int = 5
    dropout: float = 0.2
    norm: str = field(default="batch")

    def __post_init__(self) -> None:
        self.attributes = validate_attributes(self.attributes)
        _check_choice("norm", self.norm, NORMS)

    @property
    def n_attrs(self) -> int:
        return len(self.attributes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


@functools.cache
def _adapter(config_cls: type) -> TypeAdapter[Any]:
    return TypeAdapter(config_cls)


def config_from_dict(config_cls: type[C], data: dict[str, Any]) -> C:
    """Build ``config_cls`` from JSON-like ``data`` with pydantic's strict JSON rules (lists for
    tuples, ints for floats, nothing else converted); unknown keys or wrong types raise ``ValueError``
    naming them, and the config's own checks (``__post_init__``) run as usual."""
    known = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{config_cls.__name__}: unknown field(s) {', '.join(unknown)}")
    try:
        return _adapter(config_cls).validate_json(json.dumps(data), strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            if err["loc"]
            else err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise ValueError(f"{config_cls.__name__}: {problems}") from None
