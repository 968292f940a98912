"""Rewrite the README's "Served models" table from the shipped weights' config.json files.

Everything in the table is read from ``weights/*/config.json`` (written by ``python -m training
export`` and ``python -m training evaluate``); nothing is typed by hand. The issue's targets (test split,
judged by the project's classifier) are checked per model.

Run: ``python .ci/readme_results.py`` (after ``evaluate``), then commit README.md.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
sys.path.insert(0, str(ROOT))
from models.attributes import gain_text  # noqa: E402
from training.reports import COMBINED_SAMPLES_FILE, SAMPLES_FILE  # noqa: E402
from training.reports import QUALITY_TARGETS as TARGETS  # noqa: E402 - the targets are written once, there
from training.reports import REALISM_TARGETS as REALISM  # noqa: E402

log = logging.getLogger("readme_results")


def _mark(value: float, key: str) -> str:
    return "✅" if value >= TARGETS[key] else "❌"


def generator_rows(weights: Path) -> list[str]:
    rows = [
        f"| model | training | split | PSNR (≥ {TARGETS['psnr']:g} dB) | SSIM (≥ {TARGETS['ssim']:g}) "
        f"| decoder-only PSNR (≥ {TARGETS['psnr_raw']:g} dB) | edit gain "
        f"| edit success (≥ {TARGETS['mean_edit_success']:.0%}) | preservation (≥ {TARGETS['mean_preservation']:.0%}) "
        f"| matched KID×1000 (≤ {REALISM['kid_x1000']:g}) | worst attribute (≤ {REALISM['kid_x1000_worst']:g}) "
        f"| combined edits (≤ {REALISM['kid_x1000_combined']:g}) "
        f"| background change (≤ {REALISM['background_change_worst']:g}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config_path in sorted(weights.glob("*/config.json")):
        cfg = json.loads(config_path.read_text())
        if cfg.get("kind") != "generator":
            continue
        metrics = cfg.get("metrics", {})
        split = "test" if "test" in metrics else "val"
        m = metrics.get(split)
        if not m:
            continue
        t = cfg.get("training", {})
        training = (
            f"{t.get('steps', '?')} steps, {t.get('wall_hours', '?')} h, {t.get('images_per_s', '?')} img/s"
            f" ({t.get('threads', t.get('train_config', {}).get('threads', '?'))} thread)"
        )
        raw = f"{m['psnr_raw']:.2f} dB {_mark(m['psnr_raw'], 'psnr_raw')}" if "psnr_raw" in m else "—"
        gain = gain_text(m.get("edit_gain", 1.0))
        unit = [r for r in metrics.get("calibration", {}).get("rows", []) if r["edit_gain"] == 1.0]
        at_one = ""
        if unit and m.get("edit_gain", 1.0) != 1.0:
            at_one = f" (at ×1: {unit[0]['mean_edit_success']:.1%} / {unit[0]['mean_preservation']:.1%} on val)"
        free = ""  # preservation without the attributes an edit implies in the labels (reports since 2026-12-01)
        if "mean_preservation_excl_implied" in m:
            free = f" ({m['mean_preservation_excl_implied']:.1%} with implied attributes left out)"
        rows.append(
            f"| [{cfg['name']}](weights/{config_path.parent.name}/card.md) ({cfg['architecture']}) | {training} "
            f"| {split} ({m['n_images']}) | {m['psnr']:.2f} dB {_mark(m['psnr'], 'psnr')} "
            f"| {m['ssim']:.3f} {_mark(m['ssim'], 'ssim')} | {raw} | {gain}{at_one} "
            f"| {m['mean_edit_success']:.1%} {_mark(m['mean_edit_success'], 'mean_edit_success')} "
            f"| {m['mean_preservation']:.1%} {_mark(m['mean_preservation'], 'mean_preservation')}{free} "
            f"| {realism_cells(m.get('realism'))} |"
        )
    return rows


def realism_cells(report: dict | None) -> str:
    """The four realism cells of a row (from ``python -m training evaluate``'s realism report)."""
    if not report:
        return " | ".join(["—"] * len(REALISM))
    cells = []
    for key, target in REALISM.items():
        value = report.get(key)
        cells.append("—" if value is None else f"{value:.1f} {'✅' if value <= target else '❌'}")
    return " | ".join(cells)


def classifier_line(weights: Path) -> str:
    path = weights / "classifier" / "config.json"
    if not path.is_file():
        return ""
    cfg = json.loads(path.read_text())
    m, t = cfg.get("metrics", {}), cfg.get("training", {})
    acc = m.get("val_accuracy", {})
    gens = [json.loads(p.read_text()) for p in weights.glob("*/config.json")]
    edited = sorted({a for g in gens if g.get("kind") == "generator" for a in g.get("attributes", [])})
    acc_edited = sum(acc[a] for a in edited) / len(edited) if edited and all(a in acc for a in edited) else None
    line = (
        f"The judge, [`weights/classifier`](weights/classifier/card.md): val accuracy "
        f"{m.get('val_mean_accuracy', float('nan')):.1%} over the 40 attributes"
    )
    if acc_edited is not None:
        line += f", {acc_edited:.1%} over the {len(edited)} edited ones"
    return line + f" ({t.get('epochs_run', '?')} epochs, {t.get('wall_seconds', '?')} s)."


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    weights = ROOT / "weights"
    block = "\n".join(
        [
            START,
            *generator_rows(weights),
            "",
            classifier_line(weights),
            "",
            "Sample grids (test faces; every attribute flipped at the model's edit gain, each edit above its "
            "mask), written by `python -m training export` / `calibrate` (or `python -m training grid`):",
            "",
            *[
                f"**{p.parent.name}**\n\n![{p.parent.name} samples]({p.relative_to(ROOT).as_posix()})\n"
                for p in sorted(weights.glob(f"*/{SAMPLES_FILE}"))
            ],
            "Combined edits (several attributes flipped together, the columns' names; "
            "`python -m training grid --combined`):",
            "",
            *[
                f"**{p.parent.name}**\n\n![{p.parent.name} combined edits]({p.relative_to(ROOT).as_posix()})\n"
                for p in sorted(weights.glob(f"*/{COMBINED_SAMPLES_FILE}"))
            ],
            END,
        ]
    )
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text:
        raise SystemExit(f"README.md has no {START} … {END} block")
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))
    log.info("updated %s", readme)


if __name__ == "__main__":
    main()
