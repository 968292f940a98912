"""Attribute-editing generators.

Every generator exposes ``encode(x) -> Encoded`` and ``decode(encoded, c) -> (image, mask)`` so a
caller can keep a photo's encoder features and re-run only the decoder when a slider moves; the
one-call ``forward(x, c)`` is exactly ``decode(encode(x), c)``. ``c`` is the model's condition vector
(see :func:`models.attributes.condition_vector`). Images are in [-1, 1], masks in [0, 1].

With ``mask_head`` the decoder predicts a spatial attention mask ``b`` next to the edited image and
returns ``b * x_edit + (1 - b) * x`` (SaGAN / AttentionGAN). Without it, the returned mask is the
per-pixel change normalised to [0, 1], so callers always get something to overlay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from models.blocks import (
    AttentionUNetConnection,
    ConvBlock,
    ResidualBlock,
    ResizeConv,
    SelectiveTransferUnit,
    SelfAttention,
    UpBlock,
    cat_condition,
    conv_trunk,
    resize_weight_from_deconv,
    up_conv,
    upsample_with_condition,
)
from models.config import EncoderDecoderConfig, StarGANConfig


class Encoded(NamedTuple):
    """What ``encode`` returns: the input image and the encoder features (shallow to deep), and, once
    :meth:`AttributeGenerator.prepare_decode` has run, the decoder's terms that do not depend on the
    condition (computed once per face, reused by every slider move)."""

    x: torch.Tensor
    features: tuple[torch.Tensor, ...]
    decoder_terms: tuple[torch.Tensor, ...] = ()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor held, batch first."""
        return (self.x, *self.features, *self.decoder_terms)

    def select(self, index: torch.Tensor | slice | int) -> Encoded:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Encoded(
            self.x[index], tuple(f[index] for f in self.features), tuple(t[index] for t in self.decoder_terms)
        )

    @staticmethod
    def cat(items: list[Encoded]) -> Encoded:
        n, m = len(items[0].features), len(items[0].decoder_terms)
        if any(len(e.decoder_terms) != m for e in items):
            raise ValueError("cannot merge prepared and unprepared encodings")
        return Encoded(
            torch.cat([e.x for e in items]),
            tuple(torch.cat([e.features[i] for e in items]) for i in range(n)),
            tuple(torch.cat([e.decoder_terms[i] for e in items]) for i in range(m)),
        )


def change_mask(x_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean absolute change, normalised per image to [0, 1] (for models without a mask head)."""
    d = (x_out.float() - x.float()).abs().mean(dim=1, keepdim=True)
    return d / d.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)


class AttributeGenerator(nn.Module):
    """Common interface and output head of all generators."""

    config: EncoderDecoderConfig | StarGANConfig

    def encode(self, x: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def decode(self, encoded: Encoded, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output image, mask): the blended image with a mask head, else the raw edit and its change map."""
        x_edit, mask = self.decode_parts(encoded, c)
        return self.blend(x_edit, mask, encoded.x)

    @staticmethod
    def blend(x_edit: torch.Tensor, mask: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode`'s output from :meth:`decode_parts`' for input ``x``: the mask head's blend of the
        raw edit and the input, or (no mask head) the raw edit and its change map."""
        if mask is not None:
            return mask * x_edit + (1 - mask) * x.to(x_edit.dtype), mask
        return x_edit, change_mask(x_edit, x)

    def decode_parts(self, encoded: Encoded, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(raw edited image before blending, mask from the head or None)."""
        raise NotImplementedError

    def prepare_decode(self, encoded: Encoded) -> Encoded:
        """``encoded`` with the decoder's condition-independent terms precomputed, for a caller that
        decodes one face under many conditions (slider moves, evaluation). :meth:`decode` gives the
        same result with or without them. This generator has none: returned as it is."""
        return encoded

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.encode(x), c)

    def _split_head(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_edit = torch.tanh(raw[:, :3])
        return x_edit, torch.sigmoid(raw[:, 3:4]) if self.config.mask_head else None


class EncoderDecoderGenerator(AttributeGenerator):
    """AttGAN-shaped encoder/decoder with concat, STU or AUC skips and optional self-attention."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        n, a = cfg.n_layers, cfg.n_attrs
        self.encoder, enc_ch = conv_trunk(3, cfg.base_channels, cfg.max_channels, n, cfg.norm)
        self.enc_attention = nn.ModuleDict({str(i): SelfAttention(enc_ch[i]) for i in cfg.enc_attention})

        # STU chain from the bottleneck outwards (independent of the decoder's own features).
        self.stus = nn.ModuleList()
        if cfg.skip == "stu":
            state_ch = enc_ch[n - 1]
            for j in range(cfg.n_skip_layers):
                skip_ch = enc_ch[n - 2 - j]
                self.stus.append(SelectiveTransferUnit(skip_ch, state_ch, a, cfg.stu_kernel, cfg.upsample))
                state_ch = skip_ch

        self.decoder = nn.ModuleList()
        self.aucs = nn.ModuleList()
        self.skip_blocks = nn.ModuleList()
        self.dec_attention = nn.ModuleDict()
        in_ch = enc_ch[n - 1] + a
        for j in range(n - 1):
            out_ch = min(cfg.base_channels * 2 ** (n - 1 - j), cfg.max_channels)
            self.decoder.append(UpBlock(in_ch, out_ch, upsample=cfg.upsample, norm=cfg.norm, act="relu"))
            in_ch = out_ch
            if cfg.skip != "none" and j < cfg.n_skip_layers:
                skip_ch = enc_ch[n - 2 - j]
                if cfg.skip == "auc":
                    self.aucs.append(AttentionUNetConnection(skip_ch, out_ch, max(skip_ch // 2, 1), cfg.norm))
                if cfg.is_late_skip(j):
                    late_ch = skip_ch  # appended after the condition and self-attention, below
                else:
                    in_ch += skip_ch
                    if cfg.skip_conv_block:
                        self.skip_blocks.append(
                            nn.Sequential(
                                ConvBlock(in_ch, out_ch, kernel=3, stride=1, padding=1, norm=cfg.norm, act="relu"),
                                ConvBlock(out_ch, out_ch, kernel=3, stride=1, padding=1, norm=cfg.norm, act="relu"),
                            )
                        )
                        in_ch = out_ch
            if j < cfg.n_inject_layers:
                in_ch += a
            if j in cfg.dec_attention:
                self.dec_attention[str(j)] = SelfAttention(in_ch)
            if cfg.is_late_skip(j):
                in_ch += late_ch
        out_channels = 4 if cfg.mask_head else 3
        self.to_image = up_conv(in_ch, out_channels, cfg.upsample)

    def encode(self, x: torch.Tensor) -> Encoded:
        feats, h = [], x
        for i, layer in enumerate(self.encoder):
            h = layer(h)
            if str(i) in self.enc_attention:
                h = self.enc_attention[str(i)](h)
            feats.append(h)
        return Encoded(x, tuple(feats))

    def prepare_decode(self, encoded: Encoded) -> Encoded:
        """The decoder's terms that no condition changes, once per face. With STU skips: each STU's gate
        terms on its encoder feature (half of the gates' multiply-adds, a quarter of a decode), see
        :meth:`SelectiveTransferUnit.encoder_terms`. With resize up-sampling: the first decoder layer's
        convolution of the bottleneck feature, and the first STU's, to which the condition only adds a
        bias (:meth:`ResizeConv.image_term`)."""
        cfg = self.config
        if encoded.decoder_terms:
            return encoded
        n = cfg.n_layers
        terms = [stu.encoder_terms(encoded.features[n - 2 - j]) for j, stu in enumerate(self.stus)]
        if cfg.upsample == "resize":
            bottleneck = encoded.features[n - 1]
            terms.append(self.decoder[0][0].image_term(bottleneck))
            if self.stus:
                terms.append(self.stus[0].upsample.image_term(bottleneck))
        return encoded._replace(decoder_terms=tuple(terms)) if terms else encoded

    def decode_parts(self, encoded: Encoded, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg, feats = self.config, encoded.features
        n = cfg.n_layers
        # a prepared encoding: the STUs' gate terms, then the bottleneck's terms (first decoder layer, first STU)
        stu_terms, bottleneck_terms = encoded.decoder_terms[: len(self.stus)], encoded.decoder_terms[len(self.stus) :]
        skips = list(feats[n - 2 - j] for j in range(cfg.n_skip_layers)) if cfg.skip != "none" else []
        if cfg.skip == "stu":
            state, transferred = feats[n - 1], []
            for j, stu in enumerate(self.stus):
                if stu_terms:
                    state_term = bottleneck_terms[1] if j == 0 and bottleneck_terms else None
                    f_t, state = stu.forward_from_terms(stu_terms[j], state, c, state_term)
                else:
                    f_t, state = stu(skips[j], state, c)
                transferred.append(f_t)
            skips = transferred
        # The condition is handed to the next up-sampling layer rather than concatenated where nothing
        # reads it before that layer: a resize conv takes it as a bias (models.blocks.ResizeConv).
        h, pending = feats[n - 1], c
        for j, layer in enumerate(self.decoder):
            if j == 0 and bottleneck_terms:
                h = layer.after_upsample(layer[0].from_image_term(bottleneck_terms[0], c))
            else:
                h = layer(h, pending)
            pending, late = None, None
            if j < len(skips):
                skip = skips[j]
                if cfg.skip == "auc":
                    skip, _ = self.aucs[j](skip, h)
                if cfg.is_late_skip(j):
                    late = skip
                else:
                    h = torch.cat([h, skip.to(h.dtype)], dim=1)
                    if cfg.skip_conv_block:
                        h = self.skip_blocks[j](h)
            if j < cfg.n_inject_layers:
                if str(j) in self.dec_attention or late is not None:
                    h = cat_condition(h, c)  # attention mixes it, or a late skip follows it
                else:
                    pending = c
            if str(j) in self.dec_attention:
                h = self.dec_attention[str(j)](h)
            if late is not None:
                h = torch.cat([h, late.to(h.dtype)], dim=1)
        return self._split_head(upsample_with_condition(self.to_image, h, pending))


class StarGANGenerator(AttributeGenerator):
    """StarGAN: labels tiled onto the input, down-sampling, residual blocks, up-sampling.

    The condition enters at the input, so ``encode`` can only keep the image itself; every slider
    move re-runs the whole network.
    """

    def __init__(self, config: StarGANConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.base_channels
        layers: list[nn.Module] = [
            ConvBlock(3 + cfg.n_attrs, ch, kernel=7, stride=1, padding=3, norm=cfg.norm, act="relu")
        ]
        for _ in range(cfg.n_down):
            layers.append(ConvBlock(ch, ch * 2, kernel=4, stride=2, padding=1, norm=cfg.norm, act="relu"))
            ch *= 2
        layers += [ResidualBlock(ch, cfg.norm) for _ in range(cfg.n_res_blocks)]
        for _ in range(cfg.n_down):
            layers.append(ConvBlock(ch, ch // 2, norm=cfg.norm, act="relu", transposed=True))
            ch //= 2
        self.body = nn.Sequential(*layers)
        self.to_image = nn.Conv2d(ch, 4 if cfg.mask_head else 3, 7, 1, 3)

    def encode(self, x: torch.Tensor) -> Encoded:
        return Encoded(x, ())

    def decode_parts(self, encoded: Encoded, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.body(cat_condition(encoded.x, c))
        return self._split_head(self.to_image(h))


def convert_upsampling(state_dict: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """A ``deconv`` generator's state dict made to fit ``target``, a generator that up-samples with
    :class:`ResizeConv`: each transposed-conv kernel becomes its least-squares 3×3 resize kernel
    (:func:`models.blocks.resize_weight_from_deconv`); every other tensor is kept as it is."""
    out = dict(state_dict)
    for name, module in target.named_modules():
        if not isinstance(module, ResizeConv):
            continue
        key = f"{name}.weight"
        weight = out.get(key)
        if weight is not None and weight.dim() == 4 and weight.shape[2:] == (4, 4):
            out[key] = resize_weight_from_deconv(weight)
    return out


def _zero_padded(
    state_dict: dict[str, torch.Tensor],
    target: nn.Module,
    fits: Callable[[torch.Size, torch.Size], bool],
    verb: str,
    participle: str,
    new_modules: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``target``'s state dict filled from ``state_dict``: a tensor of the same shape as it is, one whose
    shapes ``fits(have, want)`` with its values in the leading corner and zeros elsewhere (their names
    are returned); a tensor of a module named in ``new_modules`` that ``state_dict`` lacks keeps
    ``target``'s own value (its name is returned too); anything else raises ``ValueError``."""
    target_state = target.state_dict()
    unexpected = sorted(set(state_dict) - set(target_state))
    if unexpected:
        raise ValueError(f"{', '.join(unexpected[:3])}: not in the network being {participle}")
    out: dict[str, torch.Tensor] = {}
    padded = []
    for key, want in target_state.items():
        have = state_dict.get(key)
        if have is None and any(key.startswith(m + ".") for m in new_modules):
            out[key] = want.detach().clone()
            padded.append(key)
            continue
        if have is None:
            raise ValueError(f"{key}: missing from the network being {participle}")
        if have.shape == want.shape:
            out[key] = have
            continue
        if have.dim() != want.dim() or not fits(have.shape, want.shape):
            raise ValueError(f"{key}: shape {tuple(have.shape)} cannot {verb} to {tuple(want.shape)}")
        new = torch.zeros(want.shape, dtype=have.dtype)
        new[tuple(slice(0, n) for n in have.shape)] = have
        out[key] = new
        padded.append(key)
    return out, padded


def grow_state_dict(
    state_dict: dict[str, torch.Tensor], target: nn.Module, n_old: int, n_new: int
) -> dict[str, torch.Tensor]:
    """A state dict for ``target``, a network like the one ``state_dict`` came from but conditioned on
    (or classifying) ``n_new`` attributes where it had ``n_old``, the new ones appended after the old.

    Every tensor whose shape differs only by ``n_new - n_old`` in one dimension is the weight of an
    input that carries the condition (tiled attribute channels come last in every concatenation) or
    of an attribute head (one row per attribute): the old values keep their places and the new
    attributes' slots start at **zero**, so at step 0 the grown network computes exactly what the old
    one did for the old attributes, whatever the new attributes' inputs. Anything else must match.
    """

    def one_dimension_grown(have: torch.Size, want: torch.Size) -> bool:
        diff = [d for d in range(len(want)) if want[d] != have[d]]
        return len(diff) == 1 and want[diff[0]] - have[diff[0]] == n_new - n_old

    return _zero_padded(state_dict, target, one_dimension_grown, "grow", "grown")[0]


def widen_state_dict(
    state_dict: dict[str, torch.Tensor], target: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A state dict for ``target``, a network like the one ``state_dict`` came from but with the
    condition injected after more decoder layers (a larger ``n_inject_layers``) or more late AUC skip
    levels (a larger ``n_skip_layers`` past ``n_skip_conv_layers``), and the names of the tensors that
    grew or are new.

    Each injection appends the tiled condition to the decoder's feature (last in the concatenation),
    so the layers after it gain input channels, and a self-attention there gains channels too; a late
    skip level appends its gated encoder feature last, so the next layer gains input channels and the
    level's attention gate is a new module. Every grown tensor is at least as large as the parent's in
    every dimension: the parent's values keep the leading corner and the rest starts at **zero**, so at
    step 0 the widened network computes exactly what the parent did (new inputs are multiplied by zero
    weights; an attention's new value rows are zero, so its new channels pass through; a new gate's
    output only reaches zero weights). Anything else must match.
    """

    def no_smaller(have: torch.Size, want: torch.Size) -> bool:
        return all(h <= w for h, w in zip(have, want, strict=True))

    cfg = getattr(target, "config", None)
    new_gates: tuple[str, ...] = ()
    if isinstance(cfg, EncoderDecoderConfig):
        new_gates = tuple(f"aucs.{j}" for j in range(cfg.n_skip_layers) if cfg.is_late_skip(j))
    return _zero_padded(state_dict, target, no_smaller, "widen", "widened", new_gates)
