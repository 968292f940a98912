"""Edit success, attribute preservation and reconstruction PSNR / SSIM of a generator.

Edit success: flip one attribute (hair colours stay exclusive), does the classifier see the new
value? Preservation: do the classifier's predictions for the other attributes stay what they were on
the unedited image? Also reported without the attributes the edit implies in the data
(``preservation_excl_implied``, ``models.attributes.IMPLIED_VALUES``: a moustache on a woman may
read as a man's); ``preservation``, over every attribute not asked to change, is the one targets,
selection and calibration use. Reconstruction: zero difference, images quantised to 8 bits as a PNG would be.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from models.attributes import (
    EditGain,
    condition_vector,
    exclusive_groups_for,
    gain_record,
    gain_vector,
    implied_changes,
)
from models.generators import AttributeGenerator
from training.realism import realism_penalty
from training.reports import QUALITY_TARGETS, rows_keeping_preservation


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def psnr_ssim(a: np.ndarray, b: np.ndarray) -> tuple[list[float], list[float]]:
    psnrs, ssims = [], []
    for x, y in zip(a, b, strict=True):
        # identical images have an infinite PSNR; 100 dB stands for it so means stay finite
        psnrs.append(100.0 if np.array_equal(x, y) else float(peak_signal_noise_ratio(x, y, data_range=255)))
        ssims.append(float(structural_similarity(x, y, channel_axis=2, data_range=255)))
    return psnrs, ssims


def flip_targets(c_src: torch.Tensor, attr: int, groups: list[list[int]]) -> torch.Tensor:
    """Flip attribute ``attr``; turning on a member of an exclusive group turns the others off."""
    c_trg = c_src.clone()
    c_trg[:, attr] = 1 - c_trg[:, attr]
    for group in groups:
        if attr in group:
            others = [g for g in group if g != attr]
            on = c_trg[:, attr] > 0.5
            c_trg[on.nonzero(as_tuple=True)[0].unsqueeze(1), torch.tensor(others)] = 0
    return c_trg


@torch.no_grad()
def evaluate_generator(
    generator: AttributeGenerator,
    images: torch.Tensor,
    labels: torch.Tensor,
    attributes: tuple[str, ...],
    classifier: nn.Module | None = None,
    classifier_attributes: tuple[str, ...] = (),
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
    gain: EditGain = 1.0,
    discriminator: nn.Module | None = None,
    kept_flips: bool = False,
) -> dict:
    """Metrics on ``images`` (N, 3, H, W in [-1, 1]) with ground-truth ``labels`` (N, n_attrs in {0,1}).

    Each attribute is flipped with a difference of ±1 scaled by the edit ``gain`` (one for all, or each
    attribute's own: what the served model does at a slider's end); reconstruction uses a zero difference. With
    the run's ``discriminator`` (its classifier head over ``attributes``), ``d_edit_success`` is the share of
    the same edits D's classifier takes for flipped: far above ``edit_success``, the generator satisfies D with
    something the independent classifier does not accept as the attribute. ``edit_success_on`` and
    ``edit_success_off`` split ``edit_success`` by the edit's direction (attribute turned on / off).
    ``kept_flips`` adds, per edit, the share of faces whose reading of each kept attribute changed (which
    ones cost preservation; ``.ci/preservation_flips.py``).
    """
    from tqdm import tqdm

    device = torch.device(device)
    generator.eval()
    d_was_training = discriminator is not None and discriminator.training
    if discriminator is not None:
        discriminator.eval()  # a BatchNorm D must not learn statistics from the validation edits
    mode = generator.config.conditioning
    groups = exclusive_groups_for(list(attributes))
    n_attr = len(attributes)
    gains = gain_vector(attributes, gain, device)
    cls_idx = [classifier_attributes.index(a) for a in attributes] if classifier is not None else []
    psnrs: list[float] = []
    ssims: list[float] = []
    psnrs_raw: list[float] = []
    ssims_raw: list[float] = []
    # edits asked for, and those the classifier (D's classifier) reads as asked, by direction:
    # [attribute, target value] (off = 0, on = 1)
    count_to = np.zeros((n_attr, 2))
    success_to = np.zeros((n_attr, 2))
    d_success_to = np.zeros((n_attr, 2))
    d_real_correct = np.zeros(n_attr)  # D's classifier on the real faces, against their labels
    preserved = np.zeros(n_attr)
    preserved_count = np.zeros(n_attr)
    preserved_free = np.zeros(n_attr)  # the same, leaving out the attributes the edit implies
    preserved_free_count = np.zeros(n_attr)
    flipped = np.zeros((n_attr, n_attr))  # [edit, kept attribute]: faces whose reading changed
    flipped_count = np.zeros((n_attr, n_attr))
    mask_means = np.zeros(n_attr)
    n_total = 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def classify(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = classifier(x)  # type: ignore[misc]
        return (logits.float()[:, cls_idx] > 0).float()

    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc="evaluate", disable=not progress, unit="batch"):
        x = images[start : start + batch_size].to(device)
        c_src = labels[start : start + batch_size].to(device)
        n_total += len(x)
        with autocast:
            encoded = generator.prepare_decode(generator.encode(x))
            c_zero = condition_vector(c_src, torch.zeros_like(c_src), mode)
            x_rec, _ = generator.decode(encoded, c_zero)
            x_rec_raw, _ = generator.decode_parts(encoded, c_zero)
        p, s = psnr_ssim(to_uint8(x_rec), to_uint8(x))
        psnrs += p
        ssims += s
        # the decoder's own reconstruction, before the mask blends the input back in
        p, s = psnr_ssim(to_uint8(x_rec_raw), to_uint8(x))
        psnrs_raw += p
        ssims_raw += s
        pred_src = classify(x) if classifier is not None else None
        if discriminator is not None:
            with autocast:
                d_real = discriminator(x)[1]
            d_real_correct += ((d_real.float() > 0).float() == c_src).float().sum(0).cpu().numpy()
        for i in range(n_attr):
            c_trg = flip_targets(c_src, i, groups)
            with autocast:
                x_edit, mask = generator.decode(encoded, condition_vector(c_src, c_trg - c_src, mode, gains))
            mask_means[i] += mask.float().mean(dim=(1, 2, 3)).sum().item()
            turned_on = c_trg[:, i] > 0.5
            count_to[i] += ((~turned_on).sum().item(), turned_on.sum().item())
            if discriminator is not None:
                with autocast:
                    d_logits = discriminator(x_edit)[1]
                d_success_to[i] += _hits_by_direction(d_logits.float()[:, i] > 0, turned_on)
            if pred_src is None:
                continue
            pred = classify(x_edit.float())
            success_to[i] += _hits_by_direction(pred[:, i] > 0.5, turned_on)
            keep = (c_trg == c_src).float()  # attributes this edit does not ask to change
            keep[:, i] = 0
            preserved[i] += ((pred == pred_src).float() * keep).sum().item()
            preserved_count[i] += keep.sum().item()
            keep_free = keep * (1 - implied_changes(c_src, c_trg, attributes))
            preserved_free[i] += ((pred == pred_src).float() * keep_free).sum().item()
            preserved_free_count[i] += keep_free.sum().item()
            flipped[i] += ((pred != pred_src).float() * keep).sum(0).cpu().numpy()
            flipped_count[i] += keep.sum(0).cpu().numpy()
    out: dict = {
        "n_images": n_total,
        "edit_gain": gain_record(gain),
        "psnr": float(np.mean(psnrs)),
        "ssim": float(np.mean(ssims)),
        "psnr_raw": float(np.mean(psnrs_raw)),
        "ssim_raw": float(np.mean(ssims_raw)),
        "mask_mean": {a: mask_means[i] / n_total for i, a in enumerate(attributes)},
    }
    if discriminator is not None:
        discriminator.train(d_was_training)
        out["d_edit_success"] = {a: float(d_success_to[i].sum()) / n_total for i, a in enumerate(attributes)}
        out["mean_d_edit_success"] = float(np.mean(d_success_to.sum(1) / n_total))
        out |= _by_direction("d_edit_success", d_success_to, count_to, attributes)
        # D's classifier on the real faces: high while it rejects the edits means D's verdict on fakes,
        # not its reading of faces, is what G's classification loss follows
        out["d_real_accuracy"] = {a: float(d_real_correct[i]) / n_total for i, a in enumerate(attributes)}
    if classifier is not None:
        out["edit_success"] = {a: float(success_to[i].sum()) / n_total for i, a in enumerate(attributes)}
        out["preservation"] = {a: preserved[i] / max(preserved_count[i], 1) for i, a in enumerate(attributes)}
        out["mean_edit_success"] = float(np.mean(list(out["edit_success"].values())))
        # the two directions apart (an attribute turned on, turned off): where an edit works only one way
        # round, the mean hides it
        out |= _by_direction("edit_success", success_to, count_to, attributes)
        out["mean_preservation"] = float(np.mean(list(out["preservation"].values())))
        out["preservation_excl_implied"] = {
            a: preserved_free[i] / max(preserved_free_count[i], 1) for i, a in enumerate(attributes)
        }
        out["mean_preservation_excl_implied"] = float(np.mean(list(out["preservation_excl_implied"].values())))
        if kept_flips:
            share = flipped / np.maximum(flipped_count, 1)
            out["kept_flips"] = {
                a: {b: float(share[i, j]) for j, b in enumerate(attributes) if flipped_count[i, j]}
                for i, a in enumerate(attributes)
            }
    return out


def _hits_by_direction(read_on: torch.Tensor, turned_on: torch.Tensor) -> tuple[float, float]:
    """Edits read as asked (the attribute read as present exactly where it was turned on), as
    (among those turning it off, among those turning it on)."""
    hit = (read_on == turned_on).float()
    return hit[~turned_on].sum().item(), hit[turned_on].sum().item()


def _by_direction(
    name: str, hits: np.ndarray, counts: np.ndarray, attributes: tuple[str, ...]
) -> dict[str, dict[str, float | None]]:
    """``<name>_on`` / ``<name>_off``: per attribute, the share of the edits turning it on (off) that
    were read as asked; None where no face asked for that direction. ``hits`` and ``counts`` are
    (attributes, 2) with column 0 for off, 1 for on."""
    return {
        f"{name}_{direction}": {
            a: float(hits[i, column] / counts[i, column]) if counts[i, column] else None
            for i, a in enumerate(attributes)
        }
        for direction, column in (("on", 1), ("off", 0))
    }


#: The reconstruction targets: a checkpoint that misses them ranks below every one that meets them.
RECONSTRUCTION_TARGETS = {k: QUALITY_TARGETS[k] for k in ("psnr", "ssim")}


def selection_score(metrics: dict) -> float:
    """One number to pick checkpoints on the val split: edit success and preservation first, then PSNR.

    Missing a reconstruction target (PSNR or SSIM of the served output) costs 1, more than the rest
    of the score can make up, so selection never trades the reconstruction targets for edits.
    """
    psnr_term = min(metrics["psnr"] / RECONSTRUCTION_TARGETS["psnr"], 1.0)
    misses = any(metrics[k] < v for k, v in RECONSTRUCTION_TARGETS.items())
    score = psnr_term
    if "mean_edit_success" in metrics:
        score = 0.5 * metrics["mean_edit_success"] + 0.3 * metrics["mean_preservation"] + 0.2 * psnr_term
    # realism (matched KID, background change) where it was measured: edits are not bought with artifacts
    score -= realism_penalty(metrics)
    return score - 1.0 if misses else score


def choose_gain(rows: list[dict], min_preservation: float) -> float:
    """The edit gain with the highest mean edit success, less the realism penalty where a row has a
    realism probe, among rows whose mean preservation is at least ``min_preservation``; the smaller
    gain on ties; 1.0 when no row qualifies."""
    ok = rows_keeping_preservation(rows, min_preservation)
    if not ok:
        return 1.0
    best = max(ok, key=lambda r: (round(r["mean_edit_success"] - realism_penalty(r), 6), -r["edit_gain"]))
    return float(best["edit_gain"])


def attribute_gain_value(row: dict, attribute: str) -> float:
    """How good a gain's row is for one slider: :func:`selection_score`'s weights on that attribute's
    edits alone, ``0.5 edit success + 0.3 preservation - 0.005 (matched KID×1000 + background change)``."""
    realism = row["realism"]
    return (
        0.5 * row["edit_success"][attribute]
        + 0.3 * row["preservation"][attribute]
        - 0.005 * realism["kid_x1000_per_attribute"][attribute]
        - 0.005 * realism["background_change"][attribute]
    )


def choose_attribute_gains(rows: list[dict], base: float, attributes: tuple[str, ...]) -> dict[str, float]:
    """Sliders that get a gain of their own: for each attribute, the row's gain with the best
    :func:`attribute_gain_value` (on ties ``base``, else the smaller gain), where it is not ``base``.

    An attribute's single edits move only its own difference (and those its exclusive group implies),
    so each slider is scored on its own edits; a gain that makes the attribute's matched KID or
    background change worse pays for it, as a checkpoint does in selection. Rows need the per-attribute
    ``edit_success`` and ``preservation`` and a realism probe with per-attribute KID and background change.
    """
    missing = [r["edit_gain"] for r in rows if not (r.get("realism") or {}).get("kid_x1000_per_attribute")]
    if missing:
        raise ValueError(f"per-attribute gains need a realism probe with per-attribute KID at every gain: {missing}")
    own = {}
    for a in attributes:
        best = max(
            rows, key=lambda r: (round(attribute_gain_value(r, a), 6), float(r["edit_gain"]) == base, -r["edit_gain"])
        )
        if float(best["edit_gain"]) != float(base):
            own[a] = float(best["edit_gain"])
    return own
