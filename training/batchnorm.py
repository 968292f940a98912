"""BatchNorm statistics that belong to the weights they are used with.

The EMA generator's weights are an average over the last ~1/(1 - decay) steps, but BatchNorm's running
mean and variance are the live generator's (copied every step, as StyleGAN and most GAN code do). When
the live generator moves fast, the averaged weights normalised with someone else's statistics produce
something neither network would: MU-GAN's candidate at step 9985 edited 9.8 % of val faces at ×2 with
the copied statistics and 35.6 % at ×1.5 fifteen steps after a warm start, when the statistics had been
re-estimated from its own activations. :func:`recompute_batchnorm` re-estimates them on training
batches, as ``torch.optim.swa_utils.update_bn`` does for SWA, through the generator's own
encode / decode calls (an edit and a reconstruction per batch, as in a training step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from models.attributes import condition_vector
from models.generators import AttributeGenerator
from training.losses import generator_pass

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x_real, cond (the edit), cond_rec (zero difference)


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def freeze_batchnorm(module: nn.Module) -> int:
    """Put every BatchNorm layer of ``module`` in eval mode (fixed running statistics, not updated),
    leaving the rest of it as it is; returns how many. ``module.train()`` undoes it."""
    layers = batchnorm_layers(module)
    for m in layers:
        m.eval()
    return len(layers)


@torch.no_grad()
def recompute_batchnorm(generator: AttributeGenerator, batches: Iterable[Batch], joint: bool = True) -> int:
    """Replace every BatchNorm layer's running statistics by their plain average over ``batches``
    (momentum ``None``), computed in the generator's training-time passes (``joint``: the edit and the
    reconstruction decoded as one batch, as :func:`training.losses.generator_pass` does); the
    generator's mode and the layers' momenta are restored. Returns how many batches were used (0: no
    BatchNorm layers)."""
    layers = batchnorm_layers(generator)
    if not layers:
        return 0
    was_training = generator.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
    generator.eval()
    for m in layers:
        m.train()
    n = 0
    try:
        for x_real, cond, cond_rec in batches:
            generator_pass(generator, x_real, cond, cond_rec, contextlib.nullcontext, joint)
            n += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        generator.train(was_training)
    if n == 0:
        raise ValueError("no batches to estimate BatchNorm statistics from")
    return n


def edit_batches(
    generator: AttributeGenerator,
    images: torch.Tensor,
    c_src: torch.Tensor,
    c_trg: torch.Tensor,
    batch_size: int,
    scale: torch.Tensor | None = None,
) -> Iterable[Batch]:
    """(x_real, cond, cond_rec) batches of given faces and targets, conditioned as the trainer does
    (``scale``: per-face multipliers of the difference, the recipe's ``diff_scale_max``)."""
    mode = generator.config.conditioning
    for i in range(0, len(images) - batch_size + 1, batch_size):
        sl = slice(i, i + batch_size)
        s = 1.0 if scale is None else scale[sl]
        cond = condition_vector(c_src[sl], c_trg[sl] - c_src[sl], mode, s)
        cond_rec = condition_vector(c_src[sl], torch.zeros_like(c_src[sl]), mode)
        yield images[sl], cond, cond_rec
