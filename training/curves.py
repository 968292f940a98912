"""Runs' validation histories (``val_metrics.jsonl``) side by side: a markdown table of every
validated step, the paired differences against the first run (over the steps each pair shares), and a
chart of each attribute's edit success over the steps (``python -m training compare``).

The question this answers is the one an A/B of two recipes, or a continuation of a release, asks:
"did the other run do better at the same step, by more than the runs' own noise?", and where a mean
moves, which attribute moved it (session 32: two continuations lost ten points of mean edit success,
all of it in Male, No_Beard and Mustache)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

#: The summary measures of a validation, as (label, getter); KID and background from the realism probe.
SUMMARY: tuple[tuple[str, str], ...] = (
    ("edit %", "mean_edit_success"),
    ("preservation %", "mean_preservation"),
    ("KID×1000", "realism.kid_x1000"),
    ("score", "score"),
)

#: One colour per run in the chart (the first run is the baseline).
COLOURS: tuple[str, ...] = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


@dataclass
class RunHistory:
    name: str
    #: step → that validation's metrics (the last line wins where a step was validated twice).
    by_step: dict[int, dict]

    @property
    def steps(self) -> list[int]:
        return sorted(self.by_step)


def load_history(run: str | Path, name: str | None = None) -> RunHistory:
    """A run folder's (or a ``val_metrics.jsonl`` file's) validations, by step."""
    path = Path(run)
    if path.is_dir():
        path = path / "val_metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no validation history (a run folder has val_metrics.jsonl)")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            metrics = json.loads(line)
            by_step[int(metrics["step"])] = metrics
    label = name or (path.parent.name if path.name == "val_metrics.jsonl" else path.stem)
    return RunHistory(label, by_step)


def metric(metrics: dict, key: str) -> float | None:
    """``key`` of one validation; dotted keys reach into nested dicts (``realism.kid_x1000``,
    ``edit_success.Male``). Fractions (edit success, preservation) come back as percentages."""
    value: object = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    if _is_fraction(key):
        number *= 100.0
    return number


def _is_fraction(key: str) -> bool:
    head = key.split(".")[0]
    return head.startswith(("edit_success", "d_edit_success", "d_real_accuracy", "preservation")) or head in (
        "mean_edit_success",
        "mean_d_edit_success",
        "mean_preservation",
        "mean_preservation_excl_implied",
    )


SUMMARY_SCALARS = (
    "psnr",
    "ssim",
    "mean_edit_success",
    "mean_d_edit_success",
    "mean_preservation",
    "mean_preservation_excl_implied",
    "score",
)
#: Per-attribute measures of a validation, each a TensorBoard group of its own (``val_edit_success/Male``).
PER_ATTRIBUTE = (
    "edit_success",
    "edit_success_on",
    "edit_success_off",
    "d_edit_success",
    "d_edit_success_on",
    "d_edit_success_off",
    "d_real_accuracy",
    "preservation",
)


def validation_scalars(metrics: dict) -> dict[str, float]:
    """The TensorBoard scalars of one validation: the summary measures under ``val/`` and each
    attribute's edit success (both directions), D's verdict and preservation under ``val_<measure>/``,
    so a mean that moves can be traced to the attribute that moved it. Missing or None values are
    left out (a direction no face asked for)."""
    out: dict[str, float] = {}
    for key in SUMMARY_SCALARS:
        if metrics.get(key) is not None:
            out[f"val/{key}"] = float(metrics[key])
    for key in ("kid_x1000", "background_change_worst"):
        value = (metrics.get("realism") or {}).get(key)
        if value is not None:
            out[f"val/{key}"] = float(value)
    for group in PER_ATTRIBUTE:
        for name, value in (metrics.get(group) or {}).items():
            if value is not None:
                out[f"val_{group}/{name}"] = float(value)
    return out


def validated_attributes(run: RunHistory) -> list[str]:
    """The attributes a run's first validation reported edit success for."""
    return list(next(iter(run.by_step.values()), {}).get("edit_success", {}))


def _digits(key: str) -> int:
    return 3 if key == "score" else 1


def attribute_keys(attributes: list[str], directions: bool) -> list[tuple[str, str]]:
    """(label, key) columns for each attribute's edit success, or for both of its directions."""
    out: list[tuple[str, str]] = []
    for name in attributes:
        short = name.replace("_", " ")
        if directions:
            out += [(f"{short} on %", f"edit_success_on.{name}"), (f"{short} off %", f"edit_success_off.{name}")]
        else:
            out.append((f"{short} %", f"edit_success.{name}"))
    return out


def shared_steps(runs: list[RunHistory]) -> list[int]:
    steps = set(runs[0].by_step)
    for run in runs[1:]:
        steps &= set(run.by_step)
    return sorted(steps)


def _cell(values: list[float | None], key: str) -> str:
    return " / ".join("–" if v is None else f"{v:.{_digits(key)}f}" for v in values)


def comparison_table(runs: list[RunHistory], columns: list[tuple[str, str]]) -> str:
    """Markdown: one row per step any run validated, each cell ``first / second / …`` (– where a run
    has no such validation or measure)."""
    head = "| step | " + " | ".join(label for label, _ in columns) + " |"
    lines = [f"Runs: {' / '.join(r.name for r in runs)}", "", head, "|---" * (len(columns) + 1) + "|"]
    for step in sorted({s for run in runs for s in run.by_step}):
        found = [run.by_step.get(step) for run in runs]
        cells = [_cell([None if m is None else metric(m, key) for m in found], key) for _, key in columns]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class PairedDifference:
    """``other - base`` of one measure over the steps both runs validated with it."""

    mean: float
    sd: float
    n: int


def paired_difference(base: RunHistory, other: RunHistory, key: str) -> PairedDifference | None:
    diffs = []
    for step in shared_steps([base, other]):
        a, b = metric(base.by_step[step], key), metric(other.by_step[step], key)
        if a is not None and b is not None:
            diffs.append(b - a)
    if not diffs:
        return None
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return PairedDifference(statistics.fmean(diffs), sd, len(diffs))


def paired_summary(runs: list[RunHistory], columns: list[tuple[str, str]]) -> str:
    """Markdown: each later run against the first, per column: mean ± sd of the paired differences over
    the steps the two share. No significance test: validations 250 steps apart of two runs that drift
    apart are not independent samples, so read a mean well inside its sd as "no difference seen"."""
    base = runs[0]
    lines = [
        f"Paired differences against {base.name} (later − first, mean ± sd over the steps each pair shares)",
        "",
        "| run | " + " | ".join(label for label, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for other in runs[1:]:
        cells = []
        for _, key in columns:
            diff = paired_difference(base, other, key)
            if diff is None:
                cells.append("–")
                continue
            d = _digits(key)
            cells.append(f"{diff.mean:+.{d}f} ± {diff.sd:.{d}f} (n {diff.n})")
        lines.append(f"| {other.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    runs: list[RunHistory], panels: list[tuple[str, str]], columns: int = 4, size: tuple[int, int] = (300, 190)
) -> Image.Image:
    """Small multiples: one panel per (label, key), one line per run over all its validated steps,
    the x axis shared by every panel (first to last step of any run). A legend on top."""
    width, height = size
    legend = 18
    rows = math.ceil(len(panels) / columns)
    canvas = Image.new("RGB", (columns * width, legend + rows * height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 4
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle((x, 6, x + 14, 12), fill=colour)
        draw.text((x + 18, 3), run.name, fill="black")
        x += 28 + 6 * len(run.name)
    all_steps = [s for run in runs for s in run.steps]
    if not all_steps:
        return canvas
    s_min, s_max = min(all_steps), max(all_steps)
    for p, (label, key) in enumerate(panels):
        left, top = (p % columns) * width, legend + (p // columns) * height
        _panel(draw, runs, label, key, (left, top, width, height), (s_min, s_max))
    return canvas


def _panel(
    draw: ImageDraw.ImageDraw,
    runs: list[RunHistory],
    label: str,
    key: str,
    box: tuple[int, int, int, int],
    step_range: tuple[int, int],
) -> None:
    left, top, width, height = box
    plot_l, plot_r, plot_t, plot_b = left + 44, left + width - 10, top + 16, top + height - 22
    draw.text((left + 44, top + 2), label.replace("×", "x"), fill="black")  # the bitmap font has no ×
    draw.rectangle((plot_l, plot_t, plot_r, plot_b), outline="#999999")
    series = [[(s, v) for s in run.steps if (v := metric(run.by_step[s], key)) is not None] for run in runs]
    values = [v for points in series for _, v in points]
    if not values:
        draw.text((plot_l + 6, plot_t + 6), "not recorded", fill="#999999")
        return
    v_min, v_max = min(values), max(values)
    pad = (v_max - v_min) * 0.08 or max(abs(v_max) * 0.05, 1e-3)
    v_min, v_max = v_min - pad, v_max + pad
    s_min, s_max = step_range
    s_span = max(s_max - s_min, 1)

    def to_xy(step: int, value: float) -> tuple[float, float]:
        x = plot_l + (step - s_min) / s_span * (plot_r - plot_l)
        y = plot_b - (value - v_min) / (v_max - v_min) * (plot_b - plot_t)
        return x, y

    for value in (v_min + pad, v_max - pad):
        _, y = to_xy(s_min, value)
        draw.line((plot_l - 3, y, plot_l, y), fill="#666666")
        draw.text((left + 2, y - 6), f"{value:.{_digits(key)}f}", fill="#444444")
    for step in (s_min, s_max):
        x, _ = to_xy(step, v_min)
        draw.text((min(x, plot_r - 30) - 4, plot_b + 4), str(step), fill="#444444")
    for i, points in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        xy = [to_xy(s, v) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)


def compare_report(runs: list[RunHistory], attributes: list[str] | None = None, directions: bool = False) -> str:
    """The markdown ``python -m training compare`` prints: the summary measures, each attribute's edit
    success (or both directions), and with two runs or more the paired differences of them all."""
    if attributes is None:
        attributes = validated_attributes(runs[0])
    summary = list(SUMMARY)
    per_attribute = attribute_keys(attributes, directions)
    parts = [comparison_table(runs, summary), comparison_table(runs, per_attribute)]
    if len(runs) > 1:
        parts.append(paired_summary(runs, summary + per_attribute))
    return "\n\n".join(parts) + "\n"
