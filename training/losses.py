"""Losses as pure functions returning ``(loss, logs)``; logs hold detached floats for the bar/TensorBoard.

The terms first, then :func:`discriminator_loss`, :func:`generator_pass` and :func:`generator_loss`,
which run the networks and sum the terms of one training step (stargan-v2's ``compute_d_loss`` / ``compute_g_loss``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.attributes import implied_changes
from models.generators import Encoded
from training.config import TrainConfig

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


def attribute_bce(
    logits: torch.Tensor, labels: torch.Tensor, name: str, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, Logs]:
    """Mean BCE over samples and attributes; ``weight`` (broadcast to ``labels``) scales each term."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), weight=weight)
    return loss, {name: loss.item()}


def balanced_label_weights(labels: torch.Tensor, frequency: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-term weights that give each attribute's positives and negatives equal total weight:
    ``0.5 / p`` for a positive and ``0.5 / (1 - p)`` for a negative, capped at ``cap``."""
    p = frequency.clamp(1e-4, 1 - 1e-4).to(labels.device)
    w = torch.where(labels > 0.5, 0.5 / p, 0.5 / (1 - p))
    return w.clamp(max=cap)


def changed_attribute_bce(logits: torch.Tensor, c_trg: torch.Tensor, c_src: torch.Tensor) -> tuple[torch.Tensor, Logs]:
    """BCE towards the target over only the attributes an edit changes, per sample, then averaged
    over the samples that change anything (0 when none does)."""
    changed = (c_trg != c_src).float()
    terms = F.binary_cross_entropy_with_logits(logits.float(), c_trg.float(), reduction="none")
    loss = _masked_mean_per_sample(terms, changed)
    return loss, {"g_cls_changed": loss.item()}


def _masked_mean_per_sample(terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``terms`` over each sample's masked attributes, then over the samples with any (0 if none)."""
    per_sample = (terms * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    has_any = (mask.sum(1) > 0).float()
    return (per_sample * has_any).sum() / has_any.sum().clamp_min(1.0)


def kept_attribute_consistency(
    fake_logits: torch.Tensor,
    real_logits: torch.Tensor,
    c_trg: torch.Tensor,
    c_src: torch.Tensor,
    implied: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Logs]:
    """BCE of D's classifier on the edit towards D's own (detached) reading of the input face, over
    only the attributes each edit keeps, per sample, then averaged over the samples that keep any.

    Minimal when the edit reads as the input does on every kept attribute: an edit to Bald should not
    make the face read as more male or older than it did. Soft targets from the same face, not its
    labels, so a face the classifier found ambiguous is not pushed to either side. ``implied``
    (``models.attributes.implied_changes``) marks attributes the edit implies: not kept."""
    kept = (c_trg == c_src).float()
    if implied is not None:
        kept = kept * (1 - implied)
    target = torch.sigmoid(real_logits.detach().float())
    terms = F.binary_cross_entropy_with_logits(fake_logits.float(), target, reduction="none")
    # Subtract the target's own entropy, so a perfect match costs 0 and the log reads as a divergence.
    entropy = F.binary_cross_entropy_with_logits(real_logits.detach().float(), target, reduction="none")
    loss = _masked_mean_per_sample(terms - entropy, kept)
    return loss, {"g_cls_kept": loss.item()}


def fake_attribute_bce(
    logits: torch.Tensor, c_trg: torch.Tensor, c_src: torch.Tensor, covered: torch.Tensor | None = None
) -> tuple[torch.Tensor, Logs]:
    """D's classifier on edits: BCE towards the *source* value over only the attributes each edit
    changes (mean over those terms; 0 when nothing changes), so an edit is not taken for the attribute
    until it looks like real faces that have it. ``covered`` (n_attrs,) of 0/1 limits it to some
    attributes (``TrainConfig.d_cls_fake_attributes``): the same terms, the others left out, still
    divided by the count of all changed entries. Divided by the covered ones' count instead, one rare
    attribute's terms weigh several times what they do in the full term (session 33: on Bald alone
    that way, D rejected the Bald edits and the served MU-GAN's Bald slider fell 49 -> 8 % in 500 steps)."""
    changed = (c_trg != c_src).float()
    weight = changed if covered is None else changed * covered.to(changed)
    terms = F.binary_cross_entropy_with_logits(logits.float(), c_src.float(), reduction="none") * weight
    loss = terms.sum() / changed.sum().clamp_min(1.0)
    return loss, {"d_cls_fake": loss.item()}


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


def real_pass_with_r1(
    discriminator: nn.Module, x_real: torch.Tensor, autocast: Callable[[], AbstractContextManager[Any]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D on the real faces and R1 (:func:`r1_penalty`'s value) as one function of D's parameters:
    ``torch.func.grad`` takes the input gradient inside the forward, so the whole needs one backward and
    compiles (AOTAutograd has no double backward). Returns (adversarial logits, attribute logits, R1)."""

    def adversarial_sum(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        with autocast():
            adv, cls = discriminator(x)
        return adv.float().sum(), (adv, cls)

    grad, (real_adv, real_cls) = torch.func.grad(adversarial_sum, has_aux=True)(x_real.detach())
    return real_adv, real_cls, grad.float().pow(2).flatten(1).sum(1).mean()


def border_weight_map(size: int, border_weight: float) -> torch.Tensor:
    """(1, 1, size, size) weights ``1 + border_weight * r^2``, r the distance from the centre scaled
    to 1 at the corners: the background of an aligned face crop lies along its borders."""
    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    r2 = (xx**2 + yy**2) / 2.0
    return (1.0 + border_weight * r2).view(1, 1, size, size)


def background_map(size: int, inner: float = 0.55, ramp: float = 0.3) -> torch.Tensor:
    """(1, 1, size, size) weights that are 0 over the face and rise to 1 towards the crop's borders:
    ``clamp((r - inner) / ramp, 0, 1)``, r the distance from the centre scaled to 1 at the corners
    (the middle of an edge is at 0.71). In CelebA-HQ's alignment the borders hold background."""
    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    r = ((xx**2 + yy**2) / 2.0).sqrt()
    return ((r - inner) / ramp).clamp(0.0, 1.0).view(1, 1, size, size)


def background_change(x_fake: torch.Tensor, x_real: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, Logs]:
    """Mean |edit − input| weighted by :func:`background_map`: what an edit changes off the face."""
    loss = ((x_fake.float() - x_real.float()).abs() * weight.to(x_fake.device)).mean()
    return loss, {"g_background": loss.item()}


def mask_regularisation(
    mask: torch.Tensor, edited: torch.Tensor, floor: float, weight_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Logs]:
    """Terms that keep a (B, 1, H, W) attention mask from saturating to 1 or collapsing to 0.

    Returns (sparsity, total variation, floor hinge): the mean of the mask; its total variation; and
    ``relu(floor - mean)`` per image, for the images whose target differs from the source (``edited``),
    so an edit can never be done by a mask that is nowhere open. ``weight_map`` (see
    :func:`border_weight_map`) makes the sparsity term cost more where it is large. Without the floor the reconstruction
    loss closes the mask everywhere within tens of steps and the sigmoid's gradient starves.
    """
    mask = mask.float()
    per_image = mask.mean(dim=(1, 2, 3))
    l1 = per_image.mean() if weight_map is None else (mask * weight_map.to(mask.device)).mean()
    tv = (mask[:, :, 1:, :] - mask[:, :, :-1, :]).abs().mean() + (mask[:, :, :, 1:] - mask[:, :, :, :-1]).abs().mean()
    hinge = (torch.relu(floor - per_image) * edited.float()).sum() / edited.float().sum().clamp_min(1.0)
    logs = {
        "mask_mean": per_image.mean().item(),
        "mask_l1": l1.item(),
        "mask_tv": tv.item(),
        "mask_floor": hinge.item(),
    }
    return l1, tv, hinge, logs


# ---------------------------------------------------------------------------- the loss sums of one step
def discriminator_loss(
    discriminator: nn.Module,
    x_real: torch.Tensor,
    x_fake: torch.Tensor,
    c_src: torch.Tensor,
    cfg: TrainConfig,
    *,
    label_frequency: torch.Tensor,
    use_r1: bool,
    rng: torch.Generator,
    autocast: Callable[[], AbstractContextManager[Any]],
    c_trg: torch.Tensor | None = None,
    joint_batches: bool = False,
    r1_pass: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, Logs]:
    """D's loss on a real batch and a (detached) fake one: adversarial, attribute classification of the
    real faces (class-balanced when ``cfg.d_cls_balance_max > 1``), with ``cfg.lambda_d_cls_fake`` the
    edits' changed attributes classified as their source (needs ``c_trg``, the edits' targets), and the
    gradient penalty (WGAN-GP) or lazy R1 (``use_r1``: this step is an R1 step). ``joint_batches``: D
    reads both batches in one pass, the same result where D normalises each image on its own (no batch
    norm), with larger convolutions. ``r1_pass``: :func:`real_pass_with_r1` (compiled) for an R1 step's real
    batch, in place of the double backward through ``discriminator``."""
    logs: Logs = {}
    x_in = x_real.detach().requires_grad_(use_r1 and r1_pass is None)
    r1 = None
    with autocast():
        if use_r1 and r1_pass is not None:
            real_adv, real_cls, r1 = r1_pass(x_real)
            fake_adv, fake_cls = discriminator(x_fake)
        elif joint_batches:
            adv, cls = discriminator(torch.cat([x_in, x_fake]))
            (real_adv, fake_adv), (real_cls, fake_cls) = adv.split(len(x_in)), cls.split(len(x_in))
        else:
            real_adv, real_cls = discriminator(x_in)
            fake_adv, fake_cls = discriminator(x_fake)
    d_adv, lg = d_adversarial(real_adv, fake_adv, cfg.gan_loss)
    logs |= lg
    weight = (
        balanced_label_weights(c_src, label_frequency, cfg.d_cls_balance_max) if cfg.d_cls_balance_max > 1.0 else None
    )
    d_cls, lg = attribute_bce(real_cls, c_src, "d_cls", weight)
    logs |= lg
    d_loss = d_adv + cfg.lambda_d_cls * d_cls
    if cfg.lambda_d_cls_fake > 0:
        if c_trg is None:
            raise ValueError("lambda_d_cls_fake needs the edits' targets (c_trg)")
        covered = None
        if cfg.d_cls_fake_attributes:
            names = set(cfg.d_cls_fake_attributes)
            covered = torch.tensor([float(a in names) for a in cfg.attributes], device=fake_cls.device)
        d_cls_fake, lg = fake_attribute_bce(fake_cls, c_trg, c_src, covered)
        logs |= lg
        d_loss = d_loss + cfg.lambda_d_cls_fake * d_cls_fake
    if cfg.gan_loss == "wgan":

        def critic(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return discriminator(x)[0]

        gp, lg = gradient_penalty(critic, x_real, x_fake, rng)
        logs |= lg
        d_loss = d_loss + cfg.lambda_gp * gp
    elif use_r1:
        if r1 is None:
            r1, lg = r1_penalty(real_adv, x_in)
        else:
            lg = {"d_r1": r1.item()}
        logs |= lg
        d_loss = d_loss + 0.5 * cfg.r1_gamma * cfg.r1_interval * r1
    return d_loss, logs


@dataclass(frozen=True)
class GeneratorPass:
    """One step's generator outputs (with their graph): the edit, and the reconstruction at zero
    difference from the same encoding (of the batch's first faces where ``rec_fraction`` < 1). D's
    update reads ``x_fake`` detached and G's loss reads it whole, so a step runs the generator once
    (n_critic 1)."""

    x_fake: torch.Tensor
    mask_fake: torch.Tensor
    x_rec_raw: torch.Tensor
    mask_rec: torch.Tensor | None  # None: the generator has no mask head


def generator_pass(
    generator: nn.Module,
    x_real: torch.Tensor,
    cond: torch.Tensor,
    cond_rec: torch.Tensor,
    autocast: Callable[[], AbstractContextManager[Any]],
    joint: bool = True,
) -> GeneratorPass:
    """Encode ``x_real`` once, decode it with the edit's condition and, for its first
    ``len(cond_rec)`` faces, with the reconstruction's.

    ``joint``: both decodes run as one batch, so the decoder's BatchNorm layers normalise edits and
    reconstructions with the same statistics, as they do at inference with their running (or
    recomputed) statistics, which mix the two. Decoded apart, each half was normalised with its own
    batch statistics in training and with the mixture's at inference: MU-GAN at step 12156 opened its
    mask to a mean of 0.37 at zero difference in eval mode (zero-edit PSNR 30.9 dB) where training
    mode closed it to 0.002.
    """
    with autocast():
        # the decoder's condition-free terms (STU gate terms, the bottleneck's first convolutions) once
        # per face, shared by the edit and the reconstruction: the same sums, fewer multiply-adds
        encoded = generator.prepare_decode(generator.encode(x_real))
        n, n_rec = x_real.shape[0], cond_rec.shape[0]
        encoded_rec = encoded if n_rec == n else encoded.select(slice(0, n_rec))
        if joint:
            raw, mask = generator.decode_parts(Encoded.cat([encoded, encoded_rec]), torch.cat([cond, cond_rec]))
            x_fake, mask_fake = generator.blend(raw[:n], None if mask is None else mask[:n], encoded.x)
            return GeneratorPass(x_fake, mask_fake, raw[n:], None if mask is None else mask[n:])
        x_fake, mask_fake = generator.decode(encoded, cond)
        x_rec_raw, mask_rec = generator.decode_parts(encoded_rec, cond_rec)
    return GeneratorPass(x_fake, mask_fake, x_rec_raw, mask_rec)


def generator_loss(
    g_pass: GeneratorPass,
    discriminator: nn.Module,
    x_real: torch.Tensor,
    c_src: torch.Tensor,
    c_trg: torch.Tensor,
    cfg: TrainConfig,
    *,
    background_weight: torch.Tensor,
    mask_weight_map: torch.Tensor | None,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[torch.Tensor, Logs]:
    """G's loss on its pass (:func:`generator_pass`): fool D, be classified as the target (over all
    attributes and over the changed ones), reconstruct at zero difference, leave the background
    alone, and, with a mask head, the raw decoder reconstruction and the mask's regularisers."""
    logs: Logs = {}
    x_fake, mask_fake, x_rec_raw, mask_rec = g_pass.x_fake, g_pass.mask_fake, g_pass.x_rec_raw, g_pass.mask_rec
    with autocast():
        fake_adv, fake_cls = discriminator(x_fake)
    x_real_rec = x_real[: x_rec_raw.shape[0]]  # the faces reconstructed (``rec_fraction``)
    x_rec = x_rec_raw if mask_rec is None else mask_rec * x_rec_raw + (1 - mask_rec) * x_real_rec
    g_adv, lg = g_adversarial(fake_adv, cfg.gan_loss)
    logs |= lg
    implied = implied_changes(c_src, c_trg, cfg.attributes) if cfg.free_implied_attributes else None
    g_cls, lg = attribute_bce(fake_cls, c_trg, "g_cls", weight=None if implied is None else 1 - implied)
    logs |= lg
    g_rec, lg = reconstruction_l1(x_rec, x_real_rec)
    logs |= lg
    g_loss = g_adv + cfg.lambda_g_cls * g_cls + cfg.lambda_rec * g_rec
    if cfg.lambda_background > 0:
        g_bg, lg = background_change(x_fake, x_real, background_weight)
        logs |= lg
        g_loss = g_loss + cfg.lambda_background * g_bg
    if cfg.lambda_g_cls_changed > 0:
        g_cls_changed, lg = changed_attribute_bce(fake_cls, c_trg, c_src)
        logs |= lg
        g_loss = g_loss + cfg.lambda_g_cls_changed * g_cls_changed
    if cfg.lambda_g_cls_kept > 0:
        with torch.no_grad(), autocast():
            _, real_cls = discriminator(x_real)
        g_cls_kept, lg = kept_attribute_consistency(fake_cls, real_cls, c_trg, c_src, implied)
        logs |= lg
        g_loss = g_loss + cfg.lambda_g_cls_kept * g_cls_kept
    if mask_rec is not None:  # a mask head
        # The raw decoder output must reconstruct too: then opening the mask costs the
        # reconstruction nothing, and the mask is free to mark only what an edit changes.
        g_rec_raw, _ = reconstruction_l1(x_rec_raw, x_real_rec)
        logs["g_rec_raw"] = g_rec_raw.item()
        g_loss = g_loss + cfg.lambda_rec_raw * g_rec_raw
        edited = (c_trg != c_src).any(dim=1)
        m_l1, m_tv, m_floor, lg = mask_regularisation(mask_fake, edited, cfg.mask_floor, mask_weight_map)
        logs |= lg
        g_loss = g_loss + cfg.lambda_mask_l1 * m_l1 + cfg.lambda_mask_tv * m_tv + cfg.lambda_mask_floor * m_floor
        m_rec = mask_rec.float().mean()
        logs["mask_rec_mean"] = m_rec.item()
        if cfg.lambda_mask_rec > 0:
            g_loss = g_loss + cfg.lambda_mask_rec * m_rec
    return g_loss, logs
