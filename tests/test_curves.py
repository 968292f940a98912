"""``python -m training compare``: validation histories side by side, paired differences, the chart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageColor

from training.cli import main as cli
from training.curves import (
    COLOURS,
    SUMMARY,
    attribute_keys,
    compare_report,
    load_history,
    metric,
    paired_difference,
    plot_curves,
    validation_scalars,
)


def _validation(step: int, edit: float, male: float, male_on: float | None = None, kid: float = 8.0) -> dict:
    out = {
        "step": step,
        "mean_edit_success": edit,
        "mean_preservation": 0.9,
        "score": edit - kid / 100,
        "edit_success": {"Male": male, "Bald": 0.5},
        "realism": {"kid_x1000": kid},
    }
    if male_on is not None:
        out["edit_success_on"] = {"Male": male_on, "Bald": 0.4}
        out["edit_success_off"] = {"Male": 1.0, "Bald": 0.6}
    return out


def _write_run(folder: Path, validations: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "val_metrics.jsonl").write_text("".join(json.dumps(v) + "\n" for v in validations))
    return folder


def test_history_keeps_the_last_validation_of_a_step_and_reads_nested_keys_as_percentages(tmp_path: Path) -> None:
    run = _write_run(
        tmp_path / "a",
        [_validation(200, 0.5, 0.4), _validation(100, 0.8, 0.9), _validation(200, 0.6, 0.7, male_on=0.25)],
    )
    history = load_history(run)
    assert history.name == "a"
    assert history.steps == [100, 200]
    assert metric(history.by_step[200], "mean_edit_success") == pytest.approx(60.0)
    assert metric(history.by_step[200], "edit_success.Male") == pytest.approx(70.0)
    assert metric(history.by_step[200], "edit_success_on.Male") == pytest.approx(25.0)
    assert metric(history.by_step[200], "realism.kid_x1000") == pytest.approx(8.0)  # not a fraction
    assert metric(history.by_step[200], "score") == pytest.approx(0.6 - 0.08)
    assert metric(history.by_step[100], "edit_success_on.Male") is None  # older lines lack directions
    with pytest.raises(FileNotFoundError):
        load_history(tmp_path / "missing")


def test_paired_difference_uses_only_the_steps_both_runs_validated(tmp_path: Path) -> None:
    base = load_history(
        _write_run(tmp_path / "a", [_validation(s, 0.9, m) for s, m in ((100, 0.9), (200, 0.8), (300, 0.7))])
    )
    other = load_history(
        _write_run(tmp_path / "b", [_validation(s, 0.9, m) for s, m in ((200, 0.9), (300, 0.6), (400, 0.1))])
    )
    diff = paired_difference(base, other, "edit_success.Male")
    assert diff is not None and diff.n == 2  # steps 200 and 300 only
    assert diff.mean == pytest.approx(0.0)  # +10 and -10 points
    assert diff.sd == pytest.approx(np.std([10.0, -10.0], ddof=1))
    assert paired_difference(base, other, "edit_success_on.Male") is None


def test_report_rows_are_every_validated_step_and_directions_are_columns(tmp_path: Path) -> None:
    a = load_history(_write_run(tmp_path / "a", [_validation(s, 0.9, 0.9, male_on=0.8) for s in (100, 200, 300)]))
    b = load_history(_write_run(tmp_path / "b", [_validation(s, 0.7, 0.5, male_on=0.3) for s in (200, 300)]), "bf16")
    report = compare_report([a, b], ["Male"], directions=True)
    assert "| 200 |" in report and "| 300 |" in report
    assert "| 100 | 90.0 / – |" in report  # a step only the first run validated
    assert "Male on %" in report and "Male off %" in report and "Bald" not in report
    assert "80.0 / 30.0" in report  # Male on, first / second
    assert "| bf16 | -20.0 ± 0.0 (n 2)" in report  # mean edit, paired
    single = compare_report([a])
    assert "Paired" not in single and "Bald %" in single  # default: every attribute the run validated


def test_chart_has_a_panel_per_measure_and_draws_each_run_in_its_colour(tmp_path: Path) -> None:
    a = load_history(_write_run(tmp_path / "a", [_validation(s, 0.9 - s / 1000, 0.9) for s in (100, 200, 300)]))
    b = load_history(_write_run(tmp_path / "b", [_validation(s, 0.5, 0.2) for s in (100, 200, 300)]))
    panels = list(SUMMARY) + attribute_keys(["Male", "Bald"], directions=False)
    image = plot_curves([a, b], panels, columns=3, size=(200, 120))
    assert image.size == (3 * 200, 18 + 2 * 120)  # 6 panels in 2 rows, legend on top
    pixels = np.asarray(image)[18:]  # below the legend
    for colour in COLOURS[:2]:
        assert (pixels == ImageColor.getrgb(colour)).all(-1).sum() > 50, colour
    # a run that is not drawn leaves its colour out of the panels
    only_a = np.asarray(plot_curves([a], panels, columns=3, size=(200, 120)))[18:]
    assert (only_a == ImageColor.getrgb(COLOURS[1])).all(-1).sum() == 0


def test_compare_command_prints_the_report_and_writes_the_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _write_run(tmp_path / "a", [_validation(s, 0.9, 0.9) for s in (100, 200)])
    b = _write_run(tmp_path / "b", [_validation(s, 0.8, 0.6) for s in (100, 200)])
    chart = tmp_path / "c.png"
    cli(["compare", str(a), str(b), "--names", "served,cont", "--attributes", "Male", "--plot", str(chart)])
    out = capsys.readouterr().out
    assert "Runs: served / cont" in out and "| cont | -10.0 ± 0.0 (n 2)" in out
    assert Image.open(chart).size[0] > 0
    with pytest.raises(SystemExit):
        cli(["compare", str(a), str(b), "--names", "only-one"])


def test_tensorboard_scalars_trace_a_mean_to_its_attributes_and_skip_missing_directions() -> None:
    metrics = _validation(500, 0.8, 0.6, male_on=0.3)
    metrics["edit_success_on"]["Bald"] = None  # no val face asked for it
    metrics["psnr"] = 31.5
    scalars = validation_scalars(metrics)
    assert scalars["val/mean_edit_success"] == pytest.approx(0.8)
    assert scalars["val/psnr"] == pytest.approx(31.5)
    assert scalars["val/kid_x1000"] == pytest.approx(8.0)
    assert scalars["val_edit_success/Male"] == pytest.approx(0.6)
    assert scalars["val_edit_success_on/Male"] == pytest.approx(0.3)
    assert scalars["val_edit_success_off/Bald"] == pytest.approx(0.6)
    assert "val_edit_success_on/Bald" not in scalars
    assert "val/ssim" not in scalars  # not in this validation
