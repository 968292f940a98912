"""Presentation: model cards, Markdown tables and the quality targets they are judged by.

The targets live here once; checkpoint selection (:mod:`training.metrics`), the cards and the README's
results table (``.ci/readme_results.py``) all read them from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.attributes import edit_gain_spec, gain_text
from models.checkpoint import CONFIG_FILE, atomic_write_bytes, read_config
from models.device import machine_description

#: The release's sample grids, JPEG at ``SAMPLES_JPEG_QUALITY``: the four grids of the served models took
#: 7.2 MB as PNG and take 2.2 MB so, which keeps the tracked tree (weights included) small enough to travel
#: to a lent GPU machine with the wheels it lacks (bench/gpu.py).
SAMPLES_FILE = "samples.jpg"
COMBINED_SAMPLES_FILE = "samples-combined.jpg"
SAMPLES_JPEG_QUALITY = 90

#: The issue's quality targets (test split, served setting), higher is better. Every attribute's edit
#: success must also reach ``MIN_ATTRIBUTE_EDIT_SUCCESS``.
QUALITY_TARGETS = {
    "psnr": 30.0,
    "ssim": 0.93,
    "psnr_raw": 30.0,
    "mean_edit_success": 0.85,
    "mean_preservation": 0.93,
}
MIN_ATTRIBUTE_EDIT_SUCCESS = 0.60
#: The issue's realism targets (test split, served setting), lower is better.
REALISM_TARGETS = {
    "kid_x1000": 10.0,
    "kid_x1000_worst": 40.0,
    "kid_x1000_combined": 15.0,
    "background_change_worst": 3.0,
}


def describe_targets() -> str:
    q, r = QUALITY_TARGETS, REALISM_TARGETS
    return (
        f"PSNR ≥ {q['psnr']:g} dB, SSIM ≥ {q['ssim']:g}, decoder-only PSNR ≥ {q['psnr_raw']:g} dB, mean edit "
        f"success ≥ {q['mean_edit_success']:.0%} with every attribute ≥ {MIN_ATTRIBUTE_EDIT_SUCCESS:.0%}, "
        f"preservation ≥ {q['mean_preservation']:.0%}; matched KID×1000 ≤ {r['kid_x1000']:g} "
        f"(worst attribute ≤ {r['kid_x1000_worst']:g}, combined edits ≤ {r['kid_x1000_combined']:g}), "
        f"background change ≤ {r['background_change_worst']:g}"
    )


LABELS = {
    "psnr": "PSNR",
    "ssim": "SSIM",
    "psnr_raw": "decoder-only PSNR",
    "mean_edit_success": "mean edit success",
    "mean_preservation": "mean preservation",
    "kid_x1000": "matched KID×1000",
    "kid_x1000_worst": "worst attribute's matched KID×1000",
    "kid_x1000_combined": "combined edits' matched KID×1000",
    "background_change_worst": "worst background change",
}


def target_misses(metrics: dict) -> list[str]:
    """The targets ``metrics`` (an evaluation, optionally with its realism report) misses, in words."""
    misses = []
    for key, target in QUALITY_TARGETS.items():
        if key in metrics and metrics[key] < target:
            value = metrics[key]
            shown = (
                f"{value:.1%}" if key.startswith("mean_") else f"{value:.2f} dB" if "psnr" in key else f"{value:.3f}"
            )
            misses.append(f"{LABELS[key]} {shown}")
    low = [a for a, v in (metrics.get("edit_success") or {}).items() if v < MIN_ATTRIBUTE_EDIT_SUCCESS]
    if low:
        misses.append(f"edit success below {MIN_ATTRIBUTE_EDIT_SUCCESS:.0%} for {', '.join(low)}")
    realism = metrics.get("realism") or {}
    for key, target in REALISM_TARGETS.items():
        if key in realism and realism[key] > target:
            misses.append(f"{LABELS[key]} {realism[key]:.1f}")
    return misses


def rows_keeping_preservation(rows: list[dict], min_preservation: float) -> list[dict]:
    """The calibration rows whose mean preservation is at least ``min_preservation`` (the gains
    ``training.metrics.choose_gain`` may pick)."""
    return [r for r in rows if r["mean_preservation"] >= min_preservation]


def calibration_table(calibration: dict) -> str:
    rule = (
        f"Edit gain chosen on {calibration['n_images']} {calibration['split']} faces: the highest mean edit "
        f"success, less the realism penalty, with mean preservation ≥ {calibration['min_preservation']:.0%}."
    )
    if not rows_keeping_preservation(calibration["rows"], calibration["min_preservation"]):
        rule += " No gain kept that preservation, so the model serves at ×1, the rule's fallback"
        rule += (
            "; the sliders with a gain of their own (below) serve at it instead."
            if calibration.get("attribute_gains")
            else "."
        )
    lines = [
        rule,
        "",
        "| edit gain | edit success | preservation | matched KID×1000 (probe) | background change, worst |",
        "|---|---|---|---|---|",
    ]
    common = " ← sliders without a gain of their own" if calibration.get("attribute_gains") else " ← served"
    for r in calibration["rows"]:
        mark = common if r["edit_gain"] == calibration["chosen"] else ""
        rz = r.get("realism")
        extra = f"{rz['kid_x1000']:.1f} | {rz['background_change_worst']:.2f}" if rz else "– | –"
        lines.append(
            f"| ×{r['edit_gain']:g}{mark} | {r['mean_edit_success']:.1%} | {r['mean_preservation']:.1%} | {extra} |"
        )
    if calibration.get("per_attribute"):
        lines += ["", attribute_gain_table(calibration)]
    return "\n".join(lines) + "\n"


def attribute_gain_table(calibration: dict) -> str:
    """Per slider, at each candidate gain: edit success, preservation, matched KID×1000 and background change
    of that attribute's edits alone (the probe's), and the gain it serves at."""
    rows, own, base = calibration["rows"], calibration.get("attribute_gains") or {}, calibration["chosen"]
    served_any = ", ".join(f"{a.replace('_', ' ')} ×{g:g}" for a, g in own.items()) or "none"
    head = "| attribute | " + " | ".join(f"×{r['edit_gain']:g}" for r in rows) + " | serves at |"
    lines = [
        "Each slider's own gain (`--per-attribute`): the candidate with the best `0.5 edit + 0.3 preservation "
        "- 0.005 (KID×1000 + background)` on that attribute's edits alone (cells: edit success / preservation "
        f"/ matched KID×1000 / background change). Sliders with their own gain: {served_any}.",
        "",
        head,
        "|---|" + "---|" * (len(rows) + 1),
    ]
    for a in rows[0]["edit_success"]:
        cells = [
            f"{r['edit_success'][a]:.0%} / {r['preservation'][a]:.0%} / "
            f"{r['realism']['kid_x1000_per_attribute'][a]:.1f} / {r['realism']['background_change'][a]:.2f}"
            for r in rows
        ]
        lines.append(f"| {a.replace('_', ' ')} | " + " | ".join(cells) + f" | ×{own.get(a, base):g} |")
    return "\n".join(lines)


def markdown_table(metrics: dict) -> str:
    """Per-attribute table plus the summary line, as it goes into cards and the README."""
    lines = [
        f"Reconstruction (zero difference, {metrics['n_images']} images): "
        f"PSNR **{metrics['psnr']:.2f} dB**, SSIM **{metrics['ssim']:.3f}**",
        "",
    ]
    if "psnr_raw" in metrics:
        lines[-1:-1] = [
            "",
            f"The decoder alone (before the mask blends the input back in): PSNR {metrics['psnr_raw']:.2f} dB, "
            f"SSIM {metrics['ssim_raw']:.3f}.",
        ]
    if "edit_success" in metrics:
        gain = metrics.get("edit_gain", 1.0)
        d_success = metrics.get("d_edit_success")
        d_real = metrics.get("d_real_accuracy")  # absent from reports written before 2026-12-03
        free = metrics.get("preservation_excl_implied")  # absent from reports written before 2026-12-01
        lines += [
            f"Edits flip one attribute with a difference of ±1 (a slider's end), edit gain {gain_text(gain)}."
            + (
                " *D takes for flipped*: the share of the same edits the training discriminator's classifier"
                " accepts; far above the edit success, the generator satisfies D with something that is not"
                " the attribute."
                if d_success
                else ""
            )
            + (
                " *D reads real faces*: its classifier's accuracy on the unedited faces' labels; high while"
                " it rejects edits the independent classifier accepts, D's verdict on fakes has moved away"
                " from the attribute (a training discriminator learns to reject edits)."
                if d_real
                else ""
            )
            + (
                " *Preservation, implied left out*: the same, not counting the attributes the edit implies"
                " in CelebA's labels (`models.attributes.IMPLIED_VALUES`: a moustache comes with No_Beard = 0"
                " and Male = 1); the target is on *preservation*."
                if free
                else ""
            ),
            "",
            "| attribute | edit success | preservation |"
            + (" preservation, implied left out |" if free else "")
            + " mask mean |"
            + (" D takes for flipped |" if d_success else "")
            + (" D reads real faces |" if d_real else ""),
            "|---|---|---|---|" + ("---|" if free else "") + ("---|" if d_success else "") + ("---|" if d_real else ""),
        ]
        for a, v in metrics["edit_success"].items():
            row = f"| {a} | {v:.1%} | {metrics['preservation'][a]:.1%} |"
            row += f" {free[a]:.1%} |" if free else ""
            row += f" {metrics['mask_mean'][a]:.3f} |"
            row += f" {d_success[a]:.1%} |" if d_success else ""
            lines.append(row + (f" {d_real[a]:.1%} |" if d_real else ""))
        lines.append(
            f"| **mean** | **{metrics['mean_edit_success']:.1%}** | **{metrics['mean_preservation']:.1%}** | "
            + (f"**{metrics['mean_preservation_excl_implied']:.1%}** | " if free else "")
            + f"{np.mean(list(metrics['mask_mean'].values())):.3f} |"
            + (f" {metrics['mean_d_edit_success']:.1%} |" if d_success else "")
            + (f" {np.mean(list(d_real.values())):.1%} |" if d_real else "")
        )
    if metrics.get("realism"):
        lines += ["", realism_markdown(metrics["realism"])]
    return "\n".join(lines) + "\n"


def realism_markdown(report: dict) -> str:
    """The realism section of a card / README: pooled, combined, per attribute, against the targets.
    A validation probe (no floor, no combined edits) gets one line."""
    p = report["protocol"]
    if "kid_x1000_floor" not in report:
        return (
            f"Realism probe ({p['n_faces']} {p['split'].rsplit(':', 2)[-2]} faces × 13 single edits, gain "
            f"{gain_text(p['edit_gain'])}): matched KID×1000 {report['kid_x1000']:.1f}, worst attribute "
            f"{report.get('kid_x1000_worst', float('nan')):.1f}, worst background change "
            f"{report['background_change_worst']:.2f}.\n"
        )

    def mark(key: str, value: float) -> str:
        target = REALISM_TARGETS.get(key)
        return "" if target is None else (" ✅" if value <= target else " ❌")

    lines = [
        f"Realism on the {p['split'].rsplit(':', 2)[-2]} split at edit gain {gain_text(p['edit_gain'])}: "
        f"{p['n_faces']} faces × {p['single_edits'] // max(p['n_faces'], 1)} single edits at a slider's end, "
        f"{p['combined_edits']} combined edits (2-4 sliders at random strengths in [0.5, 1]); each edit is "
        f"compared with a real face of the same split that has the edit's target labels. KID×1000: "
        f"polynomial kernel, {p['kid_subsets']} subsets of {p['kid_subset_size_pooled']} (pooled) / "
        f"{p['kid_subset_size_per_attribute']} (per attribute). Floor: real faces of the "
        f"{p['floor_split'].rsplit(':', 2)[-2]} split drawn the same way (a perfect editor).",
        "",
        "| measure | edits | floor | target |",
        "|---|---|---|---|",
        f"| matched KID×1000, single edits, pooled | {report['kid_x1000']:.1f}{mark('kid_x1000', report['kid_x1000'])}"
        f" | {report['kid_x1000_floor']:.1f} | ≤ {REALISM_TARGETS['kid_x1000']:g} |",
        f"| matched KID×1000, worst attribute | {report['kid_x1000_worst']:.1f}"
        f"{mark('kid_x1000_worst', report['kid_x1000_worst'])} | "
        f"{max(report['kid_x1000_floor_per_attribute'].values()):.1f} | ≤ {REALISM_TARGETS['kid_x1000_worst']:g} |",
    ]
    if "kid_x1000_combined" in report:
        c = report["kid_x1000_combined"]
        lines.append(
            f"| matched KID×1000, combined edits | {c:.1f}{mark('kid_x1000_combined', c)} | "
            f"{report['kid_x1000_combined_floor']:.1f} | ≤ {REALISM_TARGETS['kid_x1000_combined']:g} |"
        )
    lines += [
        f"| matched FID, single edits (biased at this size) | {report['fid']:.1f} | {report['fid_floor']:.1f} | |",
        f"| background change, worst attribute (0-255) | {report['background_change_worst']:.2f}"
        f"{mark('background_change_worst', report['background_change_worst'])} | 0 | "
        f"≤ {REALISM_TARGETS['background_change_worst']:g} |",
        "",
        "| attribute | matched KID×1000 | floor | background change |",
        "|---|---|---|---|",
    ]
    for name, value in report["kid_x1000_per_attribute"].items():
        lines.append(
            f"| {name} | {value:.1f} | {report['kid_x1000_floor_per_attribute'][name]:.1f} | "
            f"{report['background_change'][name]:.2f} |"
        )
    return "\n".join(lines) + "\n"


#: Where the hand-written part of a card begins (release notes): kept when the card is rewritten.
NOTES_HEADING = "## Release note"


def write_card(folder: str | Path) -> None:
    """(Re)write ``card.md`` from ``config.json``: training facts, val and test metrics. The hand-written
    release notes of an existing card (from its first ``NOTES_HEADING``) are kept after the new text."""
    folder = Path(folder)
    old_card = folder / "card.md"
    old_text = old_card.read_text() if old_card.is_file() else ""
    notes = old_text[old_text.index(NOTES_HEADING) :] if NOTES_HEADING in old_text else ""
    doc = read_config(folder)
    tr, metrics = doc.get("training", {}), doc.get("metrics", {})
    tc = tr.get("train_config", {})
    cfg = doc["config"]
    parts = [
        f"# {doc['name']}: {doc['architecture'].upper()} attribute editor",
        "",
        f"Architecture `{doc['architecture']}` (preset `{tr.get('preset')}`), {doc['image_size']}×{doc['image_size']}, "
        f"conditioning on the attribute **{doc['conditioning']}**, spatial-attention mask head: "
        f"{'yes' if doc['mask_head'] else 'no'}. "
        f"Base width {cfg.get('base_channels')}, max {cfg.get('max_channels')} channels.",
        "",
        f"Attributes, in order: {', '.join(doc['attributes'])}.",
        "",
        "## Training",
        "",
        f"- steps: {tr.get('steps')} (batch {tr.get('batch_size')}, {tr.get('images_seen')} images seen, "
        f"GAN loss `{tr.get('gan_loss')}`)",
        f"- wall time: {tr.get('wall_hours')} h of training, {tr.get('images_per_s')} images/s "
        f"({tc.get('threads') or 'default'} torch thread(s))",
        f"- losses: GAN `{tc.get('gan_loss')}` with {tc.get('n_critic')} critic step(s); λ_rec {tc.get('lambda_rec')}, "
        f"λ_rec-raw {tc.get('lambda_rec_raw')}, λ_G-cls {tc.get('lambda_g_cls')}, λ_D-cls {tc.get('lambda_d_cls')}, "
        f"λ_mask-L1 {tc.get('lambda_mask_l1')}, λ_mask-TV {tc.get('lambda_mask_tv')}; Adam lr {tc.get('lr_g')} / "
        f"{tc.get('lr_d')}",
        f"- realism and locality terms: λ_G-cls on the changed attributes {tc.get('lambda_g_cls_changed', 0.0)}, "
        f"on the kept attributes (consistency with the input) {tc.get('lambda_g_cls_kept', 0.0)}"
        + (", attributes an edit implies left out of both" if tc.get("free_implied_attributes") else "")
        + ", "
        f"D-cls class balance cap {tc.get('d_cls_balance_max', 1.0)}, differences scaled by U(1, "
        f"{tc.get('diff_scale_max', 1.0)}), mask border weight {tc.get('mask_border_weight', 0.0)}, "
        f"λ_background {tc.get('lambda_background', 0.0)}; up-sampling "
        f"`{cfg.get('upsample', 'deconv')}`; precision {tc.get('precision', 'bf16 autocast (amp)')}",
        f"- machine: {tr.get('machine')}",
        f"- checkpoint: `{tr.get('checkpoint')}`"
        + (" (selected on the val split)" if tr.get("checkpoint") == "best.safetensors" else " (the run's latest)"),
        "- reproduce: `python -m training train --preset "
        f"{tr.get('preset')} --run {tr.get('run') or 'runs/' + doc['name']} --resume` "
        "with the train config stored in config.json",
    ]
    if tc.get("generator_overrides"):
        changed = ", ".join(f"`{k}={v}`" for k, v in tc["generator_overrides"].items())
        parts.append(f"- changed from the `{tr.get('preset')}` preset: {changed}")
    if tc.get("init_from"):
        parts.append(
            f"- warm-started (`--init-from`) from `{tc['init_from']}`; steps, images and wall time above "
            "include the parent run's training (and its parents', where it was warm-started too)"
        )
        parent = Path(tc["init_from"]) / CONFIG_FILE
        if parent.is_file():
            parent_attrs = json.loads(parent.read_text()).get("attributes") or []
            added = [a for a in doc["attributes"] if a not in parent_attrs]
            if added:
                parts.append(f"- attributes added to the parent release's: {', '.join(added)}")
    if tc.get("data"):
        parts.append(f"- data: `{tc['data']}` (cache `{tc.get('cache_dir')}`)")
    parts.append("")
    gain = edit_gain_spec(doc.get("attributes") or [], float(doc.get("edit_gain", 1.0)), doc.get("attribute_gains"))
    own = (
        " Sliders calibrated on their own gain (`attribute_gains` in config.json) use it instead."
        if isinstance(gain, dict)
        else ""
    )
    parts += [
        "## Slider",
        "",
        f"A slider at ±1 asks for an attribute difference of ±1, which the model receives multiplied by its "
        f"**edit gain {gain_text(gain)}** (STGAN's `test_int` at test time; training always uses ×1).{own}",
        "",
    ]
    if metrics.get("calibration"):
        parts += [calibration_table(metrics["calibration"]), ""]
    else:
        parts += ["Not calibrated yet: `python -m training calibrate --model <folder>` picks it on val.", ""]
    if metrics.get("val"):
        val_gain = metrics["val"].get("edit_gain", tc.get("eval_gain", 1.0))
        parts += [
            f"## Validation (at selection, edit gain {gain_text(val_gain)})",
            "",
            markdown_table(metrics["val"]),
            "",
        ]
    if "test" in metrics:
        t = metrics["test"]
        parts += [
            f"## Test split evaluation (`python -m training evaluate --model {folder}`)",
            "",
            markdown_table(t),
            "",
        ]
        misses = target_misses(t)
        verdict = "meets all targets" if not misses else "falls short: " + "; ".join(misses)
        parts += [f"Targets ({describe_targets()}): **{verdict}**.", ""]
    else:
        parts += ["Not yet evaluated on the test split.", ""]
    grids = (
        (SAMPLES_FILE, "Samples", "rows: edit, then its mask"),
        (COMBINED_SAMPLES_FILE, "Combined edits", "the attributes in a column's name flipped together"),
    )
    for file, title, what in grids:
        if (folder / file).is_file():
            parts += [
                f"## {title} (test faces, edit gain {gain_text(gain)}; {what})",
                "",
                f"![{title.lower()}]({file})",
                "",
            ]
    parts += [
        "## Licence",
        "",
        "Trained on CelebA-HQ with CelebA's labels, released for **non-commercial research purposes only**; "
        "these weights inherit that restriction.",
        "",
    ]
    if notes:
        parts += [notes.rstrip("\n"), ""]
    atomic_write_bytes(folder / "card.md", "\n".join(parts).encode())


def classifier_card(name: str, attributes: tuple[str, ...], metrics: dict, training: dict) -> str:
    rows = "\n".join(f"| {a} | {metrics['val_accuracy'][a]:.1%} |" for a in attributes)
    return f"""# {name}: attribute classifier

Predicts the {len(attributes)} CelebA attributes of an aligned 128x128 face. Used by `python -m training
evaluate` to judge edits, and by the server to show a face's current attributes beside the sliders.

Trained with `python -m training classifier` on the train split of celebahq-128; the epoch with
the best mean accuracy on the val split was kept.

- steps: {training["steps"]} (batch {training["batch_size"]}, {training["epochs_run"]} epochs)
- wall time: {training["wall_seconds"] / 60:.1f} min, {training["images_per_s"]} images/s,
  {training["threads"]} CPU threads
- machine: {training.get("machine") or machine_description()}, device {training.get("device", "cpu")}
  (measured by the command above)
- **val mean accuracy: {metrics["val_mean_accuracy"]:.2%}**

Licence: trained on CelebA-HQ / CelebA labels, which are released for non-commercial research
purposes only; these weights inherit that restriction.

| attribute | val accuracy |
|---|---|
{rows}
"""
