"""Losses as pure functions returning ``(loss, logs)``; logs hold detached floats for the bar/TensorBoard."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Logs = dict[str, float]


def d_adversarial(real_logit: torch.Tensor, fake_logit: torch.Tensor, kind: str) -> tuple[torch.Tensor, Logs]:
    """Critic loss: ``wgan`` (Wasserstein, pair it with a gradient penalty) or ``nsgan`` (logistic)."""
    real_logit, fake_logit = real_logit.float(), fake_logit.float()
    if kind == "wgan":
        loss = fake_logit.mean() - real_logit.mean()
        return loss, {"d_adv": loss.item(), "d_wdist": -loss.item()}
    if kind == "nsgan":
        loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
        return loss, {"d_adv": loss.item(), "d_real": real_logit.mean().item(), "d_fake": fake_logit.mean().item()}
    raise ValueError(f"unknown GAN loss {kind!r}")


def g_adversarial(fake_logit: torch.Tensor, kind: str) -> tuple[torch.Tensor, Logs]:
    fake_logit = fake_logit.float()
    loss = -fake_logit.mean() if kind == "wgan" else F.softplus(-fake_logit).mean()
    return loss, {"g_adv": loss.item()}


def attribute_bce(logits: torch.Tensor, labels: torch.Tensor, name: str) -> tuple[torch.Tensor, Logs]:
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return loss, {name: loss.item()}


def reconstruction_l1(x_rec: torch.Tensor, x_real: torch.Tensor) -> tuple[torch.Tensor, Logs]:
    loss = (x_rec.float() - x_real.float()).abs().mean()
    return loss, {"g_rec": loss.item()}


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    x_real: torch.Tensor,
    x_fake: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, Logs]:
    """WGAN-GP: ``(||grad D(x_hat)|| - 1)^2`` on random interpolates of real and fake."""
    eps = torch.rand(x_real.shape[0], 1, 1, 1, generator=generator).to(x_real.device)
    x_hat = (eps * x_real + (1 - eps) * x_fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.float().sum(), x_hat, create_graph=True)
    norm = grad.float().flatten(1).norm(dim=1)
    loss = ((norm - 1) ** 2).mean()
    return loss, {"d_gp": loss.item(), "d_grad_norm": norm.mean().item()}


def r1_penalty(real_logit: torch.Tensor, x_real: torch.Tensor) -> tuple[torch.Tensor, Logs]:
    """R1 (Mescheder et al. 2018): squared gradient norm of D on real images (``x_real`` needs grad)."""
    (grad,) = torch.autograd.grad(real_logit.float().sum(), x_real, create_graph=True)
    loss = grad.float().pow(2).flatten(1).sum(1).mean()
    return loss, {"d_r1": loss.item()}


def mask_regularisation(
    mask: torch.Tensor, edited: torch.Tensor, floor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Logs]:
    """Terms that keep a (B, 1, H, W) attention mask from saturating to 1 or collapsing to 0.

    Returns (sparsity, total variation, floor hinge): the mean of the mask; its total variation; and
    ``relu(floor - mean)`` per image, for the images whose target differs from the source (``edited``),
    so an edit can never be done by a mask that is nowhere open. Without the floor the reconstruction
    loss closes the mask everywhere within tens of steps and the sigmoid's gradient starves.
    """
    mask = mask.float()
    per_image = mask.mean(dim=(1, 2, 3))
    l1 = per_image.mean()
    tv = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().mean() + (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().mean()
    hinge = (torch.relu(floor - per_image) * edited.float()).sum() / edited.float().sum().clamp_min(1.0)
    return l1, tv, hinge, {"mask_mean": l1.item(), "mask_tv": tv.item(), "mask_floor": hinge.item()}
