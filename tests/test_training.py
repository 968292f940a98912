"""Training CLI on tiny data: checkpoints, bit-exact resume, atomic writes, evaluate, export, data errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from models.attributes import STGAN_ATTRIBUTES, condition_vector
from models.checkpoint import CheckpointError, load_pretrained
from models.device import has_cxx_compiler
from training.checkpoints import ema_generator_from_checkpoint, read_training_checkpoint
from training.cli import main as cli
from training.config import TrainConfig
from training.data import CachedFaces, DatasetError, prepare_cache, read_index, sample_targets
from training.losses import GeneratorPass
from training.metrics import to_uint8
from training.reports import COMBINED_SAMPLES_FILE, SAMPLES_FILE
from training.trainer import Trainer

TINY_SETTINGS = [
    "disc_preset=discriminator-tiny",
    "batch_size=4",
    "eval_every=1000000",
    "sample_every=1000000",
    "eval_images=6",
    "log_every=1",
]


def tiny_config(cache: Path, tmp_path: Path, preset: str = "stgan-tiny", **changes: object) -> TrainConfig:
    data = {k: json.loads(v) if v[0].isdigit() else v for k, v in (s.split("=") for s in TINY_SETTINGS)}
    return TrainConfig.from_dict(
        data | {"preset": preset, "cache_dir": str(cache), "classifier": str(tmp_path / "no-classifier")} | changes
    )


def tiny_sets(cache: Path, tmp_path: Path, *extra: str) -> list[str]:
    """``--set`` arguments of the CLI for the tiny settings (and ``extra`` ones)."""
    settings = [*TINY_SETTINGS, f"cache_dir={cache}", f"classifier={tmp_path}/none", *extra]
    return [x for s in settings for x in ("--set", s)]


def test_two_step_train_then_resume_continues_bit_exactly(prepared_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cli(
        ["train", "--preset", "stgan-tiny", "--run", str(run), "--max-steps", "2", *tiny_sets(prepared_cache, tmp_path)]
    )
    ckpt = run / "checkpoints" / "last.safetensors"
    _, meta = read_training_checkpoint(ckpt)
    assert meta["step"] == "2"
    assert (run / "samples" / "latest.png").is_file()

    cfg = TrainConfig.from_dict(json.loads(meta["train_config"]))
    uninterrupted = Trainer(cfg, run)
    uninterrupted.load_checkpoint(ckpt)  # same state as the process that wrote it
    resumed = Trainer(cfg, tmp_path / "other")
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 2
    for _ in range(2):
        a, b = uninterrupted.train_step(), resumed.train_step()
        assert a == b
    for (name, p), q in zip(uninterrupted.G.named_parameters(), resumed.G.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_through_the_cli_matches_an_uninterrupted_run(prepared_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_config(prepared_cache, tmp_path, preset="mugan-tiny")
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit(max_steps=3)
    halves = Trainer(cfg, tmp_path / "halves")
    halves.fit(max_steps=1)
    cli(["train", "--run", str(tmp_path / "halves"), "--resume", "--max-steps", "2"])
    _, meta = read_training_checkpoint(tmp_path / "halves" / "checkpoints" / "last.safetensors")
    assert meta["step"] == "3"
    _, g_resumed, _ = ema_generator_from_checkpoint(tmp_path / "halves" / "checkpoints" / "last.safetensors")
    for (name, p), q in zip(straight.G_ema.state_dict().items(), g_resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_init_from_warm_starts_a_new_run_with_another_conditioning(prepared_cache: Path, tmp_path: Path) -> None:
    parent = Trainer(tiny_config(prepared_cache, tmp_path, preset="mugan-tiny"), tmp_path / "parent")
    parent.fit(max_steps=2)
    parent_ckpt = parent.checkpoint_path()
    run = tmp_path / "child"
    override = 'generator_overrides={"conditioning": "diff"}'
    sets = tiny_sets(prepared_cache, tmp_path, "eval_gain=2", override)
    cli(["train", "--preset", "mugan-tiny", "--run", str(run), "--init-from", str(parent_ckpt), "--max-steps",
         "1", *sets])  # fmt: skip
    tensors, meta = read_training_checkpoint(run / "checkpoints" / "last.safetensors")
    assert meta["step"] == "3"  # the parent's two steps and one more
    assert int(meta["images_seen"]) == 3 * 4
    cfg = json.loads(meta["train_config"])
    assert cfg["init_from"] == str(parent_ckpt)
    assert cfg["eval_gain"] == 2
    assert json.loads(meta["generator_config"])["conditioning"] == "diff"
    # one step away from the parent's weights, not from a fresh initialisation
    fresh = Trainer(tiny_config(prepared_cache, tmp_path, preset="mugan-tiny"), tmp_path / "fresh")
    name = next(k for k, v in parent.G.state_dict().items() if v.dim() == 4)
    child_w, parent_w = tensors[f"G.{name}"], parent.G.state_dict()[name]
    fresh_w = fresh.G.state_dict()[name]
    assert (child_w - parent_w).abs().max() < (child_w - fresh_w).abs().max()
    # the card says where the model came from and what changed from the preset
    cli(["export", "--run", str(run), "--out", str(tmp_path / "released"), "--checkpoint", "last", "--cache-dir",
         str(prepared_cache)])  # fmt: skip
    card = (tmp_path / "released" / "card.md").read_text()
    assert f"warm-started (`--init-from`) from `{parent_ckpt}`" in card
    assert "`conditioning=diff`" in card
    assert "conditioning on the attribute **diff**" in card


def test_init_from_refuses_a_checkpoint_of_another_shape(prepared_cache: Path, tmp_path: Path) -> None:
    parent = Trainer(tiny_config(prepared_cache, tmp_path, preset="mugan-tiny"), tmp_path / "parent")
    parent.fit(max_steps=1)
    child = Trainer(tiny_config(prepared_cache, tmp_path, preset="stgan-tiny"), tmp_path / "child")
    with pytest.raises(CheckpointError, match="does not fit"):
        child.init_from(parent.checkpoint_path())


def test_a_write_killed_before_the_rename_leaves_the_previous_checkpoint(
    prepared_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer(tiny_config(prepared_cache, tmp_path), tmp_path / "run")
    trainer.fit(max_steps=1)
    path = trainer.checkpoint_path()
    before = path.read_bytes()
    trainer.train_step()

    def killed(src: str, dst: str) -> None:
        # the process dies after the temp file is fully written, before it replaces the checkpoint
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    _, meta = read_training_checkpoint(path)
    assert meta["step"] == "1"


def test_truncated_checkpoint_is_reported(tmp_path: Path) -> None:
    from models.checkpoint import CheckpointError

    bad = tmp_path / "last.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_training_checkpoint(bad)


def test_sampled_targets_keep_hair_colours_exclusive() -> None:
    from models.attributes import exclusive_groups_for

    attrs = list(STGAN_ATTRIBUTES)
    groups = exclusive_groups_for(attrs)
    hair = [attrs.index(a) for a in ("Black_Hair", "Blond_Hair", "Brown_Hair")]
    assert groups == [hair]
    c_src = torch.zeros(256, len(attrs))
    c_src[:, hair[0]] = 1
    c_src[::3, hair[1]] = 1  # some sources even violate it
    gen = torch.Generator().manual_seed(0)
    c_trg = sample_targets(c_src, gen, groups, single_flip_fraction=0.5)
    assert int((c_trg[:, hair].sum(1) > 1).sum()) == 0
    changed = (c_trg != c_src).any(1)
    assert changed.float().mean() > 0.3


@pytest.mark.slow
def test_classifier_evaluate_and_export(prepared_cache: Path, tmp_path: Path) -> None:
    from training.classifier import train_classifier
    from training.data import read_meta, write_meta
    from training.export import export_run

    clf_dir = tmp_path / "classifier"
    train_classifier(str(prepared_cache), str(clf_dir), preset="classifier-tiny", epochs=1, batch_size=4)
    _, clf_info = load_pretrained(clf_dir)
    n_val = len(CachedFaces(prepared_cache, "val", tuple(clf_info.attributes)))
    per_attribute = np.array(list(clf_info.metrics["val_accuracy"].values()))
    np.testing.assert_allclose(per_attribute * n_val, np.round(per_attribute * n_val), atol=1e-6)  # counts / n
    assert clf_info.metrics["val_mean_accuracy"] == pytest.approx(per_attribute.mean())
    assert "val accuracy" in (clf_dir / "card.md").read_text()

    cfg = tiny_config(prepared_cache, tmp_path, classifier=str(clf_dir), eval_every=2)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit(max_steps=2)
    val = [json.loads(line) for line in (tmp_path / "run" / "val_metrics.jsonl").read_text().splitlines()]
    assert len(val) == 1 and val[0]["step"] == 2
    assert set(val[0]["d_edit_success"]) == set(STGAN_ATTRIBUTES)  # D's verdict on the same edits
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/score", "val/mean_edit_success"} <= tags
    assert {f"val_edit_success/{a}" for a in STGAN_ATTRIBUTES} <= tags  # each attribute's curve
    assert events.Scalars("val_edit_success/Male")[0].value == pytest.approx(val[0]["edit_success"]["Male"])
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file()

    meta = read_meta(prepared_cache)
    meta["alignment_template"] = {"landmarks": [[0.35, 0.45], [0.65, 0.45], [0.5, 0.6], [0.38, 0.75], [0.62, 0.75]]}
    write_meta(prepared_cache, meta)
    out = export_run(tmp_path / "run", tmp_path / "weights" / "tiny", checkpoint="best", cache_dir=prepared_cache)
    gen, info = load_pretrained(out)
    assert info.alignment_template == meta["alignment_template"]
    assert info.training["steps"] == 2
    assert (out / SAMPLES_FILE).is_file() and (out / COMBINED_SAMPLES_FILE).is_file()
    assert (
        "Not yet evaluated" in (out / "card.md").read_text() and COMBINED_SAMPLES_FILE in (out / "card.md").read_text()
    )
    _, ema, _ = ema_generator_from_checkpoint(tmp_path / "run" / "checkpoints" / "best.safetensors")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    c = torch.zeros(2, len(STGAN_ATTRIBUTES))
    c[:, 0] = 1
    with torch.no_grad():
        a, b = ema(x, c), gen.float()(x, c)
    torch.testing.assert_close(a[0], b[0], atol=2e-2, rtol=0)  # weights are stored as float16
    torch.testing.assert_close(a[1], b[1], atol=2e-2, rtol=0)

    realism = ["--realism-faces", "2", "--realism-combined", "3"]  # a tiny report (tests/test_realism.py)
    cli(["evaluate", "--model", str(out), "--cache-dir", str(prepared_cache), "--classifier", str(clf_dir), *realism])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 6
    # the reported reconstruction PSNR is the mean over the test faces of scikit-image's PSNR of the
    # 8-bit reconstruction at zero difference
    x_test, c_test = CachedFaces(prepared_cache, "test", STGAN_ATTRIBUTES).get(torch.arange(metrics["n_images"]))
    released, _ = load_pretrained(out)
    with torch.no_grad():
        x_rec, _ = released.float()(x_test, c_test * 0)  # diff conditioning: zero difference
    psnr_ref = np.mean(
        [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(to_uint8(x_test), to_uint8(x_rec), strict=True)]
    )
    assert metrics["psnr"] == pytest.approx(psnr_ref, abs=0.05)
    # the mask blend b*x_edit + (1-b)*x can only move the output towards the input
    assert 0 < metrics["psnr_raw"] <= metrics["psnr"] + 0.1 and metrics["ssim_raw"] <= 1
    for table in ("edit_success", "preservation", "mask_mean", "d_edit_success"):  # the release ships its D
        assert set(metrics[table]) == set(STGAN_ATTRIBUTES)
    assert "D takes for flipped" in (out / "metrics.md").read_text()
    for v in metrics["edit_success"].values():  # a count of the test faces over their number
        assert v * metrics["n_images"] == pytest.approx(round(v * metrics["n_images"]))
    if metrics.get("realism"):  # present where the Inception weights are installed (CI installs them)
        assert metrics["realism"]["protocol"]["single_edits"] == 2 * len(STGAN_ATTRIBUTES)
        assert "matched KID×1000" in (out / "metrics.md").read_text()
    _, info = load_pretrained(out)
    assert info.metrics["test"]["psnr"] == metrics["psnr"]
    assert info.metrics["test"]["edit_gain"] == 1.0
    assert "Test split evaluation" in (out / "card.md").read_text()
    assert "preservation, implied left out" in (out / "card.md").read_text()

    # a classifier-only re-run (no realism faces) keeps the recorded realism report and the card's
    # hand-written release notes
    with (out / "card.md").open("a") as fh:
        fh.write("\n## Release note (a test)\n\nWritten by hand.\n")
    recorded_realism = info.metrics["test"].get("realism")
    evaluate = ["evaluate", "--model", str(out), "--cache-dir", str(prepared_cache), "--classifier", str(clf_dir)]
    cli([*evaluate, "--realism-faces", "0"])
    card = (out / "card.md").read_text()
    assert card.count("## Release note (a test)") == 1 and card.rstrip().endswith("Written by hand.")
    assert "Test split evaluation" in card
    assert load_pretrained(out)[1].metrics["test"].get("realism") == recorded_realism

    # another split, read by the run's own D from a training checkpoint: the release's report is left
    # alone unless --out says where the files go
    recorded_report = (out / "metrics.json").read_text()
    run_d = ["--discriminator", str(tmp_path / "run" / "checkpoints" / "best.safetensors"), "--realism-faces", "0"]
    cli([*evaluate, "--split", "val", *run_d])
    assert (out / "metrics.json").read_text() == recorded_report
    cli([*evaluate, "--split", "val", *run_d, "--out", str(tmp_path / "cross")])
    cross = json.loads((tmp_path / "cross" / "metrics.json").read_text())
    assert cross["split"] == "val" and cross["discriminator"].endswith("best.safetensors")
    assert set(cross["d_real_accuracy"]) == set(cross["d_edit_success_on"]) == set(STGAN_ATTRIBUTES)
    with pytest.raises(SystemExit):  # no checkpoint there: a clean error, not a traceback
        cli([*evaluate, "--split", "val", "--realism-faces", "0", "--discriminator", str(tmp_path / "missing")])

    # calibrate the edit gain on val: written into config.json, test metrics at another gain dropped
    cmd = ["calibrate", "--model", str(out), "--cache-dir", str(prepared_cache), "--classifier", str(clf_dir)]
    cli([*cmd, "--gains", "1,2", "--min-preservation", "0", "--no-amp", "--realism-faces", "0"])
    _, info = load_pretrained(out)
    calibration = info.metrics["calibration"]
    assert [r["edit_gain"] for r in calibration["rows"]] == [1.0, 2.0]
    assert info.edit_gain == calibration["chosen"] in (1.0, 2.0)
    if info.edit_gain != 1.0:
        assert "test" not in info.metrics
    card = (out / "card.md").read_text()
    assert f"edit gain ×{info.edit_gain:g}" in card and "← served" in card
    # an impossible preservation bound leaves the gain at 1
    cli([*cmd, "--gains", "2,3", "--min-preservation", "1.01", "--no-amp", "--realism-faces", "0"])
    assert load_pretrained(out)[1].edit_gain == 1.0
    if metrics.get("realism"):  # sliders of their own need the realism probe (the Inception weights)
        from models.attributes import gain_record
        from training.metrics import choose_attribute_gains

        cli([*cmd, "--gains", "1,2", "--min-preservation", "0", "--no-amp", "--realism-faces", "2", "--per-attribute"])
        _, info = load_pretrained(out)
        calibration = info.metrics["calibration"]
        assert all(set(r["realism"]["kid_x1000_per_attribute"]) == set(STGAN_ATTRIBUTES) for r in calibration["rows"])
        # what config.json serves is the rule applied to the rows it records
        own = choose_attribute_gains(calibration["rows"], calibration["chosen"], STGAN_ATTRIBUTES)
        assert info.attribute_gains == calibration["attribute_gains"] == own
        assert "Each slider's own gain" in (out / "card.md").read_text()
        cli([*evaluate, "--realism-faces", "0"])  # recorded at the model's own gains, one per slider or not
        assert load_pretrained(out)[1].metrics["test"]["edit_gain"] == gain_record(info.gain())
    # re-exporting the same checkpoint keeps its calibration
    doc = json.loads((out / "config.json").read_text())
    doc["edit_gain"], doc["attribute_gains"] = 1.5, {STGAN_ATTRIBUTES[0]: 2.0}
    (out / "config.json").write_text(json.dumps(doc))
    export_run(tmp_path / "run", out, checkpoint="best", cache_dir=prepared_cache)
    _, info = load_pretrained(out)
    assert info.edit_gain == 1.5 and info.attribute_gains == {STGAN_ATTRIBUTES[0]: 2.0}


def test_choose_gain_prefers_the_strongest_edit_that_keeps_the_other_attributes() -> None:
    from training.metrics import choose_gain

    rows = [
        {"edit_gain": 1.0, "mean_edit_success": 0.40, "mean_preservation": 0.97},
        {"edit_gain": 2.0, "mean_edit_success": 0.80, "mean_preservation": 0.93},
        {"edit_gain": 2.5, "mean_edit_success": 0.80, "mean_preservation": 0.92},
        {"edit_gain": 3.0, "mean_edit_success": 0.90, "mean_preservation": 0.85},
    ]
    assert choose_gain(rows, 0.92) == 2.0  # 3.0 loses too much; 2.5 ties with 2.0 and is stronger
    assert choose_gain(rows, 0.95) == 1.0
    assert choose_gain(rows, 0.99) == 1.0  # none qualifies
    assert choose_gain(rows, 0.80) == 3.0


def test_missing_attribute_file_is_named(celeba_folder: Path) -> None:
    (celeba_folder / "list_attr_celeba.txt").unlink()
    with pytest.raises(DatasetError, match=r"list_attr_celeba.txt: missing"):
        read_index(celeba_folder)


def test_unknown_attribute_name_is_named(celeba_folder: Path) -> None:
    path = celeba_folder / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("Bald", "Wearing-Cape")  # a user's own column must be an identifier
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="Wearing-Cape"):
        read_index(celeba_folder)


def test_corrupt_image_is_named(celeba_folder: Path, tmp_path: Path) -> None:
    (celeba_folder / "images" / "3.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"3\.jpg"):
        prepare_cache(celeba_folder, tmp_path / "cache", image_size=32)
    # tolerated below the limit, and the bad image is left out of the cache by name
    meta = prepare_cache(celeba_folder, tmp_path / "cache", image_size=32, max_bad_fraction=0.1)
    assert meta["bad_images"][0].startswith("3.jpg")
    assert "3.jpg" not in meta["files"] and len(meta["files"]) == 23
    assert np.load(tmp_path / "cache" / "images.npy").shape == (23, 32, 32, 3)


def test_cli_reports_dataset_errors_without_a_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(
            [
                "prepare",
                "--data",
                str(tmp_path / "nowhere"),
                "--cache-dir",
                str(tmp_path / "c"),
                "--template-samples",
                "0",
            ]
        )
    assert exc.value.code == 2
    assert "not a folder" in caplog.text


def test_selection_never_trades_the_reconstruction_targets_for_edits() -> None:
    from training.metrics import selection_score

    meets = {"psnr": 31.0, "ssim": 0.95, "mean_edit_success": 0.55, "mean_preservation": 0.94}
    sharper_edits = meets | {"mean_edit_success": 0.70}
    blurry = sharper_edits | {"psnr": 29.5}
    smeared = sharper_edits | {"ssim": 0.92}
    assert selection_score(sharper_edits) > selection_score(meets)
    assert selection_score(meets) > selection_score(blurry)
    assert selection_score(meets) > selection_score(smeared)
    assert selection_score(blurry | {"psnr": 29.9}) > selection_score(blurry)  # still ordered below the gate


def test_a_resumed_run_rescores_its_best_checkpoint(prepared_cache: Path, tmp_path: Path) -> None:
    from training.metrics import selection_score

    trainer = Trainer(tiny_config(prepared_cache, tmp_path), tmp_path / "run")
    trainer.fit(max_steps=1)
    trainer.best_metrics = {"psnr": 29.0, "ssim": 0.95, "mean_edit_success": 0.9, "mean_preservation": 0.95}
    trainer.best_score = 0.9  # as an older selection rule scored it
    trainer.save_checkpoint()
    resumed = Trainer(trainer.cfg, tmp_path / "run")
    resumed.load_checkpoint(trainer.checkpoint_path())
    assert resumed.best_score == selection_score(trainer.best_metrics) < 0


def test_combined_grid_flips_each_combination_together_and_skips_unknown_attributes() -> None:
    from models.attributes import condition_vector
    from models.registry import build, get_preset
    from training.visualize import HEADER, combined_grid

    arch, gcfg = get_preset("stgan-tiny")
    torch.manual_seed(0)
    gen = build(arch, gcfg).eval()
    attrs = tuple(gcfg.attributes)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    c_src = torch.zeros(2, len(attrs))
    c_src[0, attrs.index("Black_Hair")] = 1
    combos = (("Blond_Hair", "Eyeglasses"), ("Male", "Purple_Hair"))
    grid = combined_grid(gen, x, c_src, attrs, combinations=combos, with_masks=False)
    assert grid.size == (2 * 32, HEADER + 2 * 32)  # input + the one combination this model can do
    c_trg = c_src.clone()
    c_trg[:, [attrs.index("Blond_Hair"), attrs.index("Eyeglasses")]] = 1
    c_trg[:, attrs.index("Black_Hair")] = 0  # switching Blond on switches the other hair colours off
    with torch.no_grad():
        expected = to_uint8(gen.decode(gen.encode(x), condition_vector(c_src, c_trg - c_src, "diff"))[0])
    got = np.asarray(grid)[HEADER:, 32:]
    np.testing.assert_array_equal(got[:32], expected[0])
    np.testing.assert_array_equal(got[32:], expected[1])


def test_flip_weights_make_a_rare_edit_the_flipped_one_more_often() -> None:
    n_attrs, b = len(STGAN_ATTRIBUTES), 4000
    c_src = torch.zeros(b, n_attrs)
    bald = STGAN_ATTRIBUTES.index("Bald")
    weights = torch.ones(n_attrs)
    weights[bald] = 13.0  # Bald as likely as all the others together

    def bald_share(w: torch.Tensor | None) -> float:
        c_trg = sample_targets(c_src, torch.Generator().manual_seed(0), [], 1.0, w)  # every sample one flip
        assert torch.equal((c_trg != c_src).sum(1), torch.ones(b, dtype=torch.long))
        return float(c_trg[:, bald].mean())

    assert bald_share(None) == pytest.approx(1 / n_attrs, abs=0.02)
    assert bald_share(weights) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="flip_weights"):
        TrainConfig(flip_weights={"Purple_Hair": 2.0})
    with pytest.raises(ValueError, match="flip_weights"):
        TrainConfig(flip_weights={"Bald": -1.0})


def test_a_generator_with_more_injection_layers_starts_from_its_parent_with_the_same_outputs() -> None:

    from models.generators import widen_state_dict
    from models.registry import build, get_preset

    arch, cfg = get_preset("mugan-tiny")  # self-attention after decoder layers 0 and 1
    cfg = dataclasses.replace(cfg, n_inject_layers=0, conditioning="diff")
    torch.manual_seed(0)
    parent = build(arch, cfg).eval()
    with torch.no_grad():  # gamma starts at 0: open the attentions so their widening is exercised
        for attention in parent.dec_attention.values():
            attention.gamma.fill_(0.7)
    child = build(arch, dataclasses.replace(cfg, n_inject_layers=2)).eval()
    state, widened = widen_state_dict(parent.state_dict(), child)
    assert any("dec_attention" in k for k in widened) and any(k.startswith("to_image") for k in widened)
    child.load_state_dict(state)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    c = torch.randn(3, len(cfg.attributes))
    with torch.no_grad():
        torch.testing.assert_close(child(x, c)[0], parent(x, c)[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(child(x, c)[1], parent(x, c)[1], rtol=0, atol=1e-5)
    # and it is the condition that now reaches those layers: the widened weights are trainable zeros
    assert all(float(state[k].abs().sum()) > 0 for k in widened)  # the parent's part is kept
    with pytest.raises(ValueError, match="cannot widen"):
        widen_state_dict(child.state_dict(), parent)  # narrowing is refused


def test_a_mugan_with_more_skip_levels_starts_from_its_parent_with_the_same_outputs() -> None:
    from models.generators import widen_state_dict
    from models.registry import build, get_preset

    arch, cfg = get_preset("mugan-tiny")  # AUCs with conv blocks at decoder levels 0 and 1 of 2
    cfg = dataclasses.replace(cfg, n_skip_layers=1, n_inject_layers=2, conditioning="diff")
    torch.manual_seed(0)
    parent = build(arch, cfg).eval()
    with torch.no_grad():
        for attention in parent.dec_attention.values():
            attention.gamma.fill_(0.7)
    child_cfg = dataclasses.replace(cfg, n_skip_layers=2, n_skip_conv_layers=1)
    child = build(arch, child_cfg).eval()
    assert len(child.aucs) == 2 and len(child.skip_blocks) == 1  # the new level: a gate, no conv block
    state, widened = widen_state_dict(parent.state_dict(), child)
    assert any(k.startswith("aucs.1.") for k in widened) and any(k.startswith("to_image") for k in widened)
    child.load_state_dict(state)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    c = torch.randn(3, len(cfg.attributes))
    with torch.no_grad():
        for got, want in zip(child(x, c), parent(x, c), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the new level is wired: the highest-resolution encoder feature reaches the output through the
    # (zero) new input weights of the last layer, which therefore get a gradient
    child.zero_grad()
    child(x, c)[0].square().sum().backward()
    to_image = next(p for n, p in child.named_parameters() if n.startswith("to_image") and p.dim() == 4)
    assert to_image.grad is not None
    assert float(to_image.grad[:, -child.config.base_channels :].abs().sum()) > 0
    with pytest.raises(ValueError, match="n_skip_conv_layers"):
        dataclasses.replace(get_preset("stgan-tiny")[1], n_skip_conv_layers=1)


def _generator_loss(
    trainer: Trainer,
    g_pass: GeneratorPass,
    x_real: torch.Tensor,
    c_src: torch.Tensor,
    c_trg: torch.Tensor,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """G's loss on ``g_pass`` with the trainer's networks and maps (as its train step computes it)."""
    from training import losses

    return losses.generator_loss(
        g_pass,
        trainer.D,
        x_real,
        c_src,
        c_trg,
        cfg,
        background_weight=trainer.background_weight,
        mask_weight_map=trainer.mask_weight_map,
        autocast=trainer._autocast,
    )


def _discriminator_loss(
    trainer: Trainer,
    x_real: torch.Tensor,
    x_fake: torch.Tensor,
    c_src: torch.Tensor,
    cfg: TrainConfig,
    **kw: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``losses.discriminator_loss`` of ``trainer``'s eager D, its label frequencies and autocast (``rng``:
    seed 1 unless given)."""
    from training import losses

    kw.setdefault("rng", torch.Generator().manual_seed(1))
    kw.setdefault("use_r1", False)
    return losses.discriminator_loss(
        trainer.D, x_real, x_fake, c_src, cfg, label_frequency=trainer.label_frequency, autocast=trainer._autocast, **kw
    )


def _two_pass_step(trainer: Trainer) -> None:
    """The step as it was before the generator pass was shared: D learns from a no-grad edit of its
    own, then G's loss runs the generator again (the reference the shared pass must equal)."""
    from training import losses
    from training.data import step_generator

    cfg, step = trainer.cfg, trainer.step
    trainer._set_lr()
    gen = step_generator(cfg.seed, step)
    x_real, c_src, c_trg = trainer._batch(step, gen)
    scale = 1.0 + (cfg.diff_scale_max - 1.0) * torch.rand(c_src.shape[0], 1, generator=gen)
    mode = trainer.G.config.conditioning
    cond = condition_vector(c_src, c_trg - c_src, mode, scale)
    cond_rec = condition_vector(c_src, torch.zeros_like(c_src), mode)
    trainer.D.requires_grad_(True)
    with torch.no_grad():
        x_fake = losses.generator_pass(trainer.G, x_real, cond, cond_rec, trainer._autocast).x_fake
    use_r1 = step % cfg.r1_interval == 0
    d_loss, _ = _discriminator_loss(
        trainer,
        x_real,
        x_fake,
        c_src,
        cfg,
        use_r1=use_r1,
        rng=gen,
        joint_batches=not use_r1,  # as the step: one pass over both batches unless R1 goes through D
    )
    trainer.opt_D.zero_grad(set_to_none=True)
    d_loss.backward()
    trainer.opt_D.step()
    trainer.D.requires_grad_(False)
    g_pass = losses.generator_pass(trainer.G, x_real, cond, cond_rec, trainer._autocast)
    g_loss, _ = _generator_loss(trainer, g_pass, x_real, c_src, c_trg, cfg)
    trainer.opt_G.zero_grad(set_to_none=True)
    g_loss.backward()
    trainer.opt_G.step()


@pytest.mark.parametrize("preset", ["stgan-tiny", "mugan-tiny"])
def test_a_step_runs_the_generator_once_and_equals_the_two_pass_step(
    prepared_cache: Path, tmp_path: Path, preset: str
) -> None:
    cfg = tiny_config(prepared_cache, tmp_path, preset=preset, diff_scale_max=2.0)
    shared, reference = Trainer(cfg, tmp_path / "a"), Trainer(cfg, tmp_path / "b")
    reference.G.load_state_dict(shared.G.state_dict())
    reference.D.load_state_dict(shared.D.state_dict())
    encodes = []
    shared.G.encoder[0].register_forward_hook(lambda *_: encodes.append(1))
    for _ in range(2):  # step 0 is an R1 step, step 1 is not
        shared.train_step()
        _two_pass_step(reference)
        reference.step += 1
    assert len(encodes) == 2  # once per step: the shared pass
    for net in ("G", "D"):
        for (name, p), q in zip(
            getattr(shared, net).named_parameters(), getattr(reference, net).parameters(), strict=True
        ):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{net}.{name}")


def test_recomputed_batchnorm_statistics_are_the_average_over_the_training_passes() -> None:
    from models.registry import build, get_preset
    from training.batchnorm import batchnorm_layers, edit_batches, recompute_batchnorm

    torch.manual_seed(0)
    gen = build(*get_preset("stgan-tiny")).eval()
    layers = batchnorm_layers(gen)
    assert layers  # the recipes' generators normalise with BatchNorm
    for m in layers:  # statistics that belong to no network: what a copied live G's can be
        m.running_mean.fill_(5.0)
        m.running_var.fill_(1e-3)
    first, momentum = layers[0], layers[0].momentum
    inputs: list[torch.Tensor] = []
    first.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach()))
    n_attrs = len(gen.config.attributes)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    c_src = (torch.rand(8, n_attrs) > 0.5).float()
    c_trg = 1 - c_src
    assert recompute_batchnorm(gen, edit_batches(gen, x, c_src, c_trg, batch_size=4)) == 2
    # the first layer (encoder) runs once per batch: its running mean is the mean of the two batch means
    expected = torch.stack([a.mean(dim=(0, 2, 3)) for a in inputs]).mean(0)
    torch.testing.assert_close(first.running_mean, expected, rtol=1e-5, atol=1e-6)
    # and its running variance the mean of the batches' unbiased variances
    expected_var = torch.stack([a.transpose(0, 1).flatten(1).var(dim=1) for a in inputs]).mean(0)
    torch.testing.assert_close(first.running_var, expected_var, rtol=1e-4, atol=1e-6)
    assert not gen.training and first.momentum == momentum  # mode and momenta restored


@pytest.mark.parametrize("preset", ["stgan-tiny", "mugan-tiny"])
def test_a_joint_decode_serves_in_eval_mode_what_training_mode_computed(preset: str) -> None:
    from contextlib import nullcontext

    from models.attributes import condition_vector
    from models.registry import build, get_preset
    from training import losses
    from training.batchnorm import recompute_batchnorm

    torch.manual_seed(0)
    arch, cfg = get_preset(preset)
    gen = build(arch, dataclasses.replace(cfg, conditioning="diff"))
    n_attrs = len(cfg.attributes)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    c_src = (torch.rand(8, n_attrs) > 0.5).float()
    cond = condition_vector(c_src, (1 - c_src) - c_src, "diff", 2.0)
    cond_rec = condition_vector(c_src, torch.zeros_like(c_src), "diff")

    def train_vs_eval(joint: bool) -> float:
        """Largest |eval - train| of the edit and the reconstruction, BatchNorm statistics of this batch."""
        g = copy.deepcopy(gen).train()
        with torch.no_grad():
            trained = losses.generator_pass(g, x, cond, cond_rec, nullcontext, joint)
            recompute_batchnorm(g, [(x, cond, cond_rec)], joint=joint)
            g.eval()
            encoded = g.encode(x)
            x_fake = g.decode(encoded, cond)[0]
            x_rec_raw, mask_rec = g.decode_parts(encoded, cond_rec)
        assert trained.mask_rec is not None and mask_rec is not None
        pairs = [(x_fake, trained.x_fake), (x_rec_raw, trained.x_rec_raw), (mask_rec, trained.mask_rec)]
        return max(float((a - b).abs().max()) for a, b in pairs)

    # decoded as one batch, training and inference agree (up to BatchNorm's unbiased running variance);
    # decoded apart, each half was normalised with statistics inference never uses
    assert train_vs_eval(joint=True) < 0.02
    assert train_vs_eval(joint=False) > 0.1


def test_validation_sees_the_ema_generator_with_its_own_batchnorm_statistics(
    prepared_cache: Path, tmp_path: Path
) -> None:
    from training.batchnorm import batchnorm_layers

    trainer = Trainer(tiny_config(prepared_cache, tmp_path, ema_bn_batches=2), tmp_path / "run")
    trainer.train_step()
    live, ema = batchnorm_layers(trainer.G)[0], batchnorm_layers(trainer.G_ema)[0]
    before = ema.running_mean.clone()
    trainer.train_step()  # between validations G_ema's statistics follow G's by the weights' EMA
    decay = min(trainer.cfg.ema_decay, 2 / 11)
    torch.testing.assert_close(ema.running_mean, before.lerp(live.running_mean, 1 - decay))
    ema.running_mean.fill_(5.0)
    assert trainer.recompute_ema_batchnorm() == 2
    once = ema.running_mean.clone()
    assert not torch.allclose(once, torch.full_like(once, 5.0))
    ema.running_mean.fill_(5.0)
    trainer.recompute_ema_batchnorm()  # the batches are a function of the step: reproducible
    torch.testing.assert_close(ema.running_mean, once)
    off = Trainer(tiny_config(prepared_cache, tmp_path, ema_bn_batches=0), tmp_path / "off")
    off.train_step()
    assert off.recompute_ema_batchnorm() == 0
    torch.testing.assert_close(batchnorm_layers(off.G_ema)[0].running_mean, batchnorm_layers(off.G)[0].running_mean)


@pytest.mark.parametrize("preset", ["stgan-tiny", "mugan-tiny"])
def test_frozen_batchnorm_trains_the_function_inference_serves(
    prepared_cache: Path, tmp_path: Path, preset: str
) -> None:
    from contextlib import nullcontext

    from training import losses
    from training.batchnorm import batchnorm_layers

    cfg = tiny_config(prepared_cache, tmp_path, preset=preset, freeze_batchnorm=True, ema_bn_batches=2)
    trainer = Trainer(cfg, tmp_path / "run")
    layers = batchnorm_layers(trainer.G)
    initial = layers[-1].running_mean.clone()  # a decoder layer, fresh: zeros
    trainer.train_step()
    assert trainer.batchnorm_frozen
    fixed = [m.running_mean.clone() for m in layers]
    assert not torch.equal(fixed[-1], initial)  # re-estimated from G's own passes when the freeze began
    for name, t in trainer.G.state_dict().items():  # G_ema restarted from G, then moved by one EMA step
        if "running" in name:
            torch.testing.assert_close(trainer.G_ema.state_dict()[name], t, msg=name)
    trainer.train_step()
    trainer.train_step()
    assert all(torch.equal(m.running_mean, f) for m, f in zip(layers, fixed, strict=True))  # never updated
    assert trainer.recompute_ema_batchnorm() == 0  # validation keeps them too
    assert all(not m.training for m in layers) and trainer.G.training

    # a face's training-mode edit does not depend on the other faces of its batch, and equals eval mode's
    x_real, c_src, c_trg = trainer._batch(7, torch.Generator().manual_seed(0))
    cond, cond_rec = trainer._conditions(c_src, c_trg, torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = losses.generator_pass(trainer.G, x_real, cond, cond_rec, nullcontext, True)
        alone = losses.generator_pass(trainer.G, x_real[:1], cond[:1], cond_rec[:1], nullcontext, True)
        served = copy.deepcopy(trainer.G).eval().decode(trainer.G.encode(x_real), cond)[0]
    torch.testing.assert_close(alone.x_fake, whole.x_fake[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(served, whole.x_fake, rtol=1e-4, atol=1e-5)

    # a resumed run keeps the statistics it trained with: the freeze is not started again
    trainer.save_checkpoint()
    resumed = Trainer(cfg, tmp_path / "run")
    resumed.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert resumed.batchnorm_frozen
    resumed.train_step()
    assert all(torch.equal(m.running_mean, f) for m, f in zip(batchnorm_layers(resumed.G), fixed, strict=True))


def test_a_warm_start_from_a_frozen_checkpoint_keeps_its_statistics_and_ema(
    prepared_cache: Path, tmp_path: Path
) -> None:
    from training.batchnorm import batchnorm_layers

    cfg = tiny_config(prepared_cache, tmp_path, freeze_batchnorm=True, ema_bn_batches=2)
    parent = Trainer(cfg, tmp_path / "parent")
    for _ in range(3):
        parent.train_step()
    parent.save_checkpoint()
    fixed = [m.running_mean.clone() for m in batchnorm_layers(parent.G)]
    ema = {k: v.clone() for k, v in parent.G_ema.state_dict().items()}
    assert fixed and any(not torch.equal(ema[k], v) for k, v in parent.G.state_dict().items())  # EMA lags G

    child = Trainer(cfg, tmp_path / "child")
    child.init_from(tmp_path / "parent" / "checkpoints" / "last.safetensors")
    assert child.batchnorm_frozen
    for k, v in child.G_ema.state_dict().items():  # not restarted from G
        torch.testing.assert_close(v, ema[k], msg=k)
    child.train_step()
    assert all(torch.equal(m.running_mean, f) for m, f in zip(batchnorm_layers(child.G), fixed, strict=True))


def test_a_release_trained_with_frozen_statistics_keeps_them(prepared_cache: Path, tmp_path: Path) -> None:
    """recompute-bn refuses it, and a frozen run warm-started from it trains with its statistics."""
    from models.checkpoint import WEIGHTS_FILE, read_tensors

    run = tmp_path / "run"
    sets = tiny_sets(prepared_cache, tmp_path, "freeze_batchnorm=true", "ema_bn_batches=2")
    cli(["train", "--preset", "stgan-tiny", "--run", str(run), "--max-steps", "1", *sets])
    cli(
        [
            "export",
            "--run",
            str(run),
            "--out",
            str(tmp_path / "release"),
            "--checkpoint",
            "last",
            "--cache-dir",
            str(prepared_cache),
        ]
    )
    with pytest.raises(SystemExit, match="fixed"):
        cli(["recompute-bn", "--model", str(tmp_path / "release"), "--cache-dir", str(prepared_cache)])

    release_tensors = read_tensors(tmp_path / "release" / WEIGHTS_FILE)
    released = {k: v.float() for k, v in release_tensors.items() if "running_mean" in k}
    child = Trainer(tiny_config(prepared_cache, tmp_path, freeze_batchnorm=True, ema_bn_batches=2), tmp_path / "child")
    child.init_from(tmp_path / "release")
    child.train_step()
    assert child.batchnorm_frozen and released
    for name, t in child.G.state_dict().items():
        if "running_mean" in name:
            torch.testing.assert_close(t, released[name], msg=name)


def test_fake_attribute_loss_pushes_only_the_changed_attributes_towards_the_source() -> None:
    from training.losses import fake_attribute_bce

    logits = torch.randn(4, 5, requires_grad=True)
    c_src = torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]).float()
    c_trg = c_src.clone()
    c_trg[0, 0], c_trg[1, 3], c_trg[3, 4] = 1, 0, 0  # three edits; sample 2 changes nothing
    loss, logs = fake_attribute_bce(logits, c_trg, c_src)
    changed = c_trg != c_src
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[changed], c_src[changed])
    torch.testing.assert_close(loss, want)
    assert logs["d_cls_fake"] == pytest.approx(want.item())
    loss.backward()
    assert logits.grad is not None
    assert (logits.grad[~changed] == 0).all()
    # towards the source: down where the source is 0 (the edit added the attribute), up where it is 1
    assert logits.grad[0, 0] > 0 and logits.grad[1, 3] < 0 and logits.grad[3, 4] < 0
    zero, _ = fake_attribute_bce(logits, c_src, c_src)
    assert zero.item() == 0.0


def test_kept_attribute_consistency_holds_only_the_kept_attributes_to_the_input_reading() -> None:
    from training.losses import kept_attribute_consistency

    real_logits = torch.randn(3, 4)
    c_src = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 1, 0]]).float()
    c_trg = c_src.clone()
    c_trg[0, 0], c_trg[1, 3] = 1, 0  # two edits; sample 2 changes nothing
    # An edit that reads exactly as its input costs nothing, on kept and changed attributes alike.
    zero, _ = kept_attribute_consistency(real_logits.clone(), real_logits, c_trg, c_src)
    assert zero.abs().item() < 1e-6
    # Moving a changed attribute is free; moving a kept one costs, and its gradient pulls it back.
    fake = real_logits.clone()
    fake[0, 0] += 5.0
    free, _ = kept_attribute_consistency(fake, real_logits, c_trg, c_src)
    assert free.abs().item() < 1e-6
    fake = real_logits.clone()
    fake[0, 1] += 3.0
    fake.requires_grad_(True)
    loss, logs = kept_attribute_consistency(fake, real_logits, c_trg, c_src)
    assert loss.item() > 0.01 and logs["g_cls_kept"] == pytest.approx(loss.item())
    loss.backward()
    assert fake.grad is not None and fake.grad[0, 1] > 0
    kept = c_trg == c_src
    assert (fake.grad[~kept] == 0).all()


def test_kept_attribute_consistency_lets_an_implied_attribute_move() -> None:
    from models.attributes import STGAN_ATTRIBUTES, implied_changes
    from training.losses import kept_attribute_consistency

    names = list(STGAN_ATTRIBUTES)
    male, mustache = names.index("Male"), names.index("Mustache")
    c_src = torch.zeros(2, len(names))
    c_src[:, names.index("No_Beard")] = 1  # two beardless women
    c_trg = c_src.clone()
    c_trg[:, mustache] = 1  # both get a moustache
    implied = implied_changes(c_src, c_trg, names)
    real_logits = torch.randn(2, len(names))
    fake = real_logits.clone()
    fake[:, male] += 4.0  # the edit reads as a man
    held, _ = kept_attribute_consistency(fake, real_logits, c_trg, c_src)
    free, _ = kept_attribute_consistency(fake, real_logits, c_trg, c_src, implied)
    assert held.item() > 0.05 and free.abs().item() < 1e-6
    fake[:, names.index("Young")] += 4.0  # a kept attribute that is not implied still costs
    assert kept_attribute_consistency(fake, real_logits, c_trg, c_src, implied)[0].item() > 0.05


def test_generator_loss_leaves_implied_attributes_out_of_the_classification_only_when_asked(
    prepared_cache: Path, tmp_path: Path
) -> None:
    import torch.nn.functional as F

    from models.attributes import implied_changes
    from training import losses

    cfg = tiny_config(prepared_cache, tmp_path, precision="fp32")
    names = list(cfg.attributes)
    trainer = Trainer(cfg, tmp_path / "run")
    x_real, _, _ = trainer._batch(0, torch.Generator().manual_seed(0))
    c_src = torch.zeros(len(x_real), len(names))
    c_src[:, names.index("No_Beard")] = 1
    c_trg = c_src.clone()
    c_trg[: len(x_real) // 2, names.index("Mustache")] = 1  # half get a moustache: Male, No_Beard implied
    cond, cond_rec = trainer._conditions(c_src, c_trg, torch.Generator().manual_seed(1))
    g_pass = losses.generator_pass(trainer.G, x_real, cond, cond_rec, trainer._autocast)
    _, held = _generator_loss(trainer, g_pass, x_real, c_src, c_trg, cfg)
    _, free = _generator_loss(
        trainer, g_pass, x_real, c_src, c_trg, dataclasses.replace(cfg, free_implied_attributes=True)
    )
    with torch.no_grad():
        _, fake_cls = trainer.D(g_pass.x_fake)
    implied = implied_changes(c_src, c_trg, names)
    assert implied.sum() == len(x_real) // 2 * 2
    want = F.binary_cross_entropy_with_logits(fake_cls.float(), c_trg, weight=1 - implied).item()
    assert free["g_cls"] == pytest.approx(want, rel=1e-5)
    assert held["g_cls"] == pytest.approx(F.binary_cross_entropy_with_logits(fake_cls.float(), c_trg).item(), rel=1e-5)
    assert free["g_cls"] != pytest.approx(held["g_cls"], rel=1e-3)


def test_preservation_leaving_out_implied_attributes() -> None:
    """A stand-in classifier reads every edit as a man: that breaks preservation for every edit, but
    only where the edit does not imply Male (a moustache, a beard, baldness on a woman) once implied
    attributes are left out."""
    from models.registry import build, get_preset
    from training.metrics import evaluate_generator

    arch, g_cfg = get_preset("stgan-tiny")
    generator = build(arch, g_cfg)
    attributes = tuple(g_cfg.attributes)
    male = attributes.index("Male")

    class EditsReadMale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = -torch.ones(len(x), len(attributes))
            edited = x.flatten(1).mean(1) > -0.9  # the inputs are black, an untrained G's edits are not
            logits[edited, male] = 1.0
            return logits

    images = -torch.ones(4, 3, g_cfg.image_size, g_cfg.image_size)
    labels = torch.zeros(4, len(attributes))
    labels[:, attributes.index("No_Beard")] = 1  # beardless women, as the classifier reads them
    out = evaluate_generator(
        generator,
        images,
        labels,
        attributes,
        classifier=EditsReadMale(),
        classifier_attributes=attributes,
        kept_flips=True,
    )
    strict, free = out["preservation"], out["preservation_excl_implied"]
    # which kept attribute each edit flipped: Male, on every face, for every edit but Male's own
    assert out["kept_flips"]["Bangs"]["Male"] == 1.0 and "Bangs" not in out["kept_flips"]["Bangs"]
    assert all(v == 0.0 for b, v in out["kept_flips"]["Bangs"].items() if b != "Male")
    assert "Male" not in out["kept_flips"]["Male"]
    for a in ("Mustache", "Bald", "No_Beard"):  # each implies Male = 1 on these faces
        assert strict[a] < 1 and free[a] == 1.0
    for a in ("Bangs", "Eyeglasses", "Young"):
        assert free[a] == strict[a] < 1
    assert strict["Male"] == free["Male"] == 1.0  # the edit asked for Male
    assert out["mean_preservation_excl_implied"] > out["mean_preservation"]


def test_edit_success_is_also_reported_for_each_direction() -> None:
    """A stand-in classifier that reads no attribute on any image: every edit that turns an attribute
    off succeeds and every one that turns it on fails; the mean over both directions hides that."""
    from models.registry import build, get_preset
    from training.metrics import evaluate_generator

    arch, g_cfg = get_preset("stgan-tiny")
    attributes = tuple(g_cfg.attributes)

    class ReadsNothing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -torch.ones(len(x), len(attributes))

    labels = torch.zeros(4, len(attributes))
    labels[:3, attributes.index("Male")] = 1  # three men, one woman: Male is turned off 3 times, on once
    images = torch.zeros(4, 3, g_cfg.image_size, g_cfg.image_size)
    out = evaluate_generator(
        build(arch, g_cfg), images, labels, attributes, classifier=ReadsNothing(), classifier_attributes=attributes
    )
    assert out["edit_success"]["Male"] == 0.75
    assert out["edit_success_off"]["Male"] == 1.0 and out["edit_success_on"]["Male"] == 0.0
    assert out["edit_success_on"]["Bangs"] == 0.0 and out["edit_success_off"]["Bangs"] is None  # nobody had bangs


def test_discriminator_loss_adds_the_fake_classification_term_only_when_asked(
    prepared_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(prepared_cache, tmp_path)
    trainer = Trainer(cfg, tmp_path / "run")
    x_real, c_src, c_trg = trainer._batch(0, torch.Generator().manual_seed(0))
    x_fake = torch.rand_like(x_real) * 2 - 1

    def d_loss(config: TrainConfig, **kw: torch.Tensor) -> tuple[float, dict[str, float]]:
        loss, logs = _discriminator_loss(trainer, x_real, x_fake, c_src, config, **kw)
        return loss.item(), logs

    base, logs = d_loss(cfg, c_trg=c_trg)
    assert "d_cls_fake" not in logs
    with_fake = dataclasses.replace(cfg, lambda_d_cls_fake=2.0)
    total, logs = d_loss(with_fake, c_trg=c_trg)
    assert (c_trg != c_src).any() and logs["d_cls_fake"] > 0
    assert total == pytest.approx(base + 2.0 * logs["d_cls_fake"], rel=1e-5)
    with pytest.raises(ValueError, match="c_trg"):
        d_loss(with_fake)
    # limited to one attribute: the term over that attribute's changed entries only
    first = cfg.attributes[0]
    c_trg_first = c_src.clone()
    c_trg_first[:, 0] = 1 - c_src[:, 0]
    c_trg_first[:, 1] = 1 - c_src[:, 1]  # a second attribute changes too, outside the covered set
    _, logs = d_loss(dataclasses.replace(with_fake, d_cls_fake_attributes=(first,)), c_trg=c_trg_first)
    _, logs_all = d_loss(with_fake, c_trg=c_trg_first)
    assert logs["d_cls_fake"] != pytest.approx(logs_all["d_cls_fake"])


def test_fake_classification_term_covers_only_the_named_attributes() -> None:
    from training.losses import fake_attribute_bce

    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    c_src = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]]).float()
    c_trg = c_src.clone()
    c_trg[:, 0] = 1 - c_trg[:, 0]  # every face: attribute 0 flipped
    c_trg[1, 2] = 1  # one face: attribute 2 as well
    loss_all, _ = fake_attribute_bce(logits, c_trg, c_src)
    only_first, _ = fake_attribute_bce(logits, c_trg, c_src, torch.tensor([1.0, 0, 0, 0]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    terms = [bce(logits[i, 0], c_src[i, 0]) for i in range(5)] + [bce(logits[1, 2], c_src[1, 2])]
    assert loss_all.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    # the covered terms weigh what they weigh in the full term: divided by all 6 changed entries
    assert only_first.item() == pytest.approx(torch.stack(terms[:5]).sum().item() / 6, rel=1e-5)
    none_covered, _ = fake_attribute_bce(logits, c_trg, c_src, torch.tensor([0.0, 1, 0, 1]))  # none changed
    assert none_covered.item() == 0.0
    with pytest.raises(ValueError, match="d_cls_fake_attributes"):
        TrainConfig(d_cls_fake_attributes=("Not_An_Attribute",))
    assert TrainConfig(d_cls_fake_attributes=["Bald"]).d_cls_fake_attributes == ("Bald",)  # JSON gives lists


@pytest.mark.parametrize("use_r1", [False, True])
def test_discriminator_loss_on_joint_batches_equals_the_separate_passes(
    prepared_cache: Path, tmp_path: Path, use_r1: bool
) -> None:
    cfg = tiny_config(prepared_cache, tmp_path, precision="fp32")
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.D.config.norm == "instance"  # each image normalised on its own: one pass or two agree
    x_real, c_src, _ = trainer._batch(0, torch.Generator().manual_seed(0))
    x_fake = torch.rand_like(x_real) * 2 - 1
    results = {}
    for joint in (False, True):
        calls: list[int] = []
        hook = trainer.D.register_forward_hook(lambda _m, args, _o, calls=calls: calls.append(len(args[0])))
        loss, logs = _discriminator_loss(trainer, x_real, x_fake, c_src, cfg, use_r1=use_r1, joint_batches=joint)
        hook.remove()
        grads = torch.autograd.grad(loss, list(trainer.D.parameters()))
        results[joint] = (loss, logs, grads, calls)
    (loss_a, logs_a, grads_a, calls_a), (loss_b, logs_b, grads_b, calls_b) = results[False], results[True]
    assert calls_a == [len(x_real)] * 2 and calls_b == [2 * len(x_real)]
    assert ("d_r1" in logs_b) == use_r1 and logs_a.keys() == logs_b.keys()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in logs_a:
        assert logs_b[name] == pytest.approx(logs_a[name], rel=1e-4, abs=1e-6), name
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_the_real_pass_with_r1_as_one_function_equals_the_double_backward(prepared_cache: Path, tmp_path: Path) -> None:
    from training import losses

    trainer = Trainer(tiny_config(prepared_cache, tmp_path, precision="fp32"), tmp_path / "run")
    x_real, _, _ = trainer._batch(0, torch.Generator().manual_seed(0))
    params = list(trainer.D.parameters())
    x_in = x_real.detach().requires_grad_(True)
    adv, cls = trainer.D(x_in)
    r1, logs = losses.r1_penalty(adv, x_in)
    expected = torch.autograd.grad(r1 + adv.sum() + cls.sum(), params)
    adv_f, cls_f, r1_f = losses.real_pass_with_r1(trainer.D, x_real, trainer._autocast)
    assert r1.item() > 0 and r1_f.item() == pytest.approx(logs["d_r1"], rel=1e-5)
    torch.testing.assert_close(adv_f, adv)
    torch.testing.assert_close(cls_f, cls)
    for a, b in zip(torch.autograd.grad(r1_f + adv_f.sum() + cls_f.sum(), params), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_generator_loss_pushes_the_zero_difference_mask_shut_only_when_asked(
    prepared_cache: Path, tmp_path: Path
) -> None:
    from training import losses

    # fp32 on every CPU: the term's exact gradient is checked below (auto is bf16 where the CPU has bf16 units)
    cfg = tiny_config(prepared_cache, tmp_path, preset="mugan-tiny", precision="fp32")
    trainer = Trainer(cfg, tmp_path / "run")
    x_real, c_src, c_trg = trainer._batch(0, torch.Generator().manual_seed(0))
    cond, cond_rec = trainer._conditions(c_src, c_trg, torch.Generator().manual_seed(1))
    g_pass = losses.generator_pass(trainer.G, x_real, cond, cond_rec, trainer._autocast)
    assert g_pass.mask_rec is not None

    def g_loss(config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
        return _generator_loss(trainer, g_pass, x_real, c_src, c_trg, config)

    base, logs = g_loss(cfg)
    assert logs["mask_rec_mean"] == pytest.approx(g_pass.mask_rec.mean().item(), rel=1e-6)
    assert logs["mask_rec_mean"] > 0
    total, _ = g_loss(dataclasses.replace(cfg, lambda_mask_rec=3.0))
    assert total.item() == pytest.approx(base.item() + 3.0 * logs["mask_rec_mean"], rel=1e-5)
    # the term's gradient reaches only the mask at zero difference, evenly, and closes it
    grad_rec, grad_fake = torch.autograd.grad(total - base, [g_pass.mask_rec, g_pass.mask_fake], retain_graph=True)
    assert torch.allclose(grad_rec, torch.full_like(grad_rec, 3.0 / grad_rec.numel()), rtol=1e-4)
    assert grad_fake.abs().max() < 1e-9


def test_generator_loss_adds_the_kept_attribute_term_only_when_asked(prepared_cache: Path, tmp_path: Path) -> None:
    from training import losses

    cfg = tiny_config(prepared_cache, tmp_path, precision="fp32")
    trainer = Trainer(cfg, tmp_path / "run")
    x_real, c_src, c_trg = trainer._batch(0, torch.Generator().manual_seed(0))
    cond, cond_rec = trainer._conditions(c_src, c_trg, torch.Generator().manual_seed(1))
    g_pass = losses.generator_pass(trainer.G, x_real, cond, cond_rec, trainer._autocast)
    base, logs = _generator_loss(trainer, g_pass, x_real, c_src, c_trg, cfg)
    assert "g_cls_kept" not in logs
    with_kept = dataclasses.replace(cfg, lambda_g_cls_kept=4.0)
    total, logs = _generator_loss(trainer, g_pass, x_real, c_src, c_trg, with_kept)
    assert logs["g_cls_kept"] > 0  # an untrained G's edits do not read as their inputs
    assert total.item() == pytest.approx(base.item() + 4.0 * logs["g_cls_kept"], rel=1e-5)


def test_validation_reports_how_often_the_discriminator_takes_an_edit_for_flipped() -> None:
    from models.attributes import exclusive_groups_for
    from models.registry import build, get_preset
    from training.metrics import evaluate_generator, flip_targets

    arch, g_cfg = get_preset("stgan-tiny")
    generator = build(arch, g_cfg)
    attributes = tuple(g_cfg.attributes)

    class AlwaysOn(torch.nn.Module):
        """A stand-in D whose classifier says "present" for every attribute of every image."""

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.new_zeros(len(x)), x.new_ones(len(x), len(attributes))

    torch.manual_seed(0)
    images = torch.rand(6, 3, g_cfg.image_size, g_cfg.image_size) * 2 - 1
    labels = (torch.rand(6, len(attributes)) > 0.5).float()
    d = AlwaysOn().train()
    out = evaluate_generator(generator, images, labels, attributes, discriminator=d, batch_size=4)
    assert d.training  # left as it was found
    # "always present" is right exactly for the edits that turn an attribute on, i.e. where it was off
    groups = exclusive_groups_for(list(attributes))
    for i, a in enumerate(attributes):
        want = (flip_targets(labels, i, groups)[:, i] == 1).float().mean().item()
        assert out["d_edit_success"][a] == pytest.approx(want)
    assert out["mean_d_edit_success"] == pytest.approx(np.mean(list(out["d_edit_success"].values())))
    # by direction: every edit turning an attribute on is taken, none turning it off
    for i, a in enumerate(attributes):
        turned_on = (flip_targets(labels, i, groups)[:, i] == 1).any().item()
        assert out["d_edit_success_on"][a] == (1.0 if turned_on else None)
        turned_off = (flip_targets(labels, i, groups)[:, i] == 0).any().item()
        assert out["d_edit_success_off"][a] == (0.0 if turned_off else None)
    # on the real faces "always present" is right for the faces labelled with the attribute
    for i, a in enumerate(attributes):
        assert out["d_real_accuracy"][a] == pytest.approx(labels[:, i].mean().item())
    assert "d_edit_success" not in evaluate_generator(generator, images, labels, attributes, batch_size=4)


def test_the_generator_pass_computes_the_stu_encoder_terms_once_for_edit_and_reconstruction() -> None:
    """The STU gates' terms on the encoder features serve the edit and the reconstruction of a face: the
    same outputs and gradients as decoding both halves from unprepared features, in fewer FLOPs."""
    from contextlib import nullcontext

    from torch.utils.flop_counter import FlopCounterMode

    from models.generators import Encoded
    from models.registry import build, get_preset
    from training import losses

    torch.manual_seed(0)
    arch, cfg = get_preset("stgan-tiny")
    gen = build(arch, dataclasses.replace(cfg, conditioning="diff")).train()
    n, n_attrs = 4, len(cfg.attributes)
    x = torch.rand(n, 3, cfg.image_size, cfg.image_size) * 2 - 1
    c_src = (torch.rand(n, n_attrs) > 0.5).float()
    cond = condition_vector(c_src, (1 - c_src) - c_src, "diff")
    cond_rec = condition_vector(c_src, torch.zeros_like(c_src), "diff")

    def unprepared(g: torch.nn.Module) -> GeneratorPass:
        enc = g.encode(x)
        raw, mask = g.decode_parts(Encoded.cat([enc, enc]), torch.cat([cond, cond_rec]))
        x_fake, mask_fake = g.blend(raw[:n], mask[:n], x)
        return GeneratorPass(x_fake, mask_fake, raw[n:], mask[n:])

    results = []
    for run in (unprepared, lambda g: losses.generator_pass(g, x, cond, cond_rec, nullcontext, True)):
        g = copy.deepcopy(gen)
        with FlopCounterMode(display=False) as counter:
            out = run(g)
        (out.x_fake.square().mean() + out.x_rec_raw.abs().mean() + out.mask_fake.mean()).backward()
        grads = {k: p.grad for k, p in g.named_parameters() if p.grad is not None}
        results.append((out, grads, counter.get_total_flops()))
    (want, want_grads, want_flops), (got, got_grads, got_flops) = results
    for a, b in zip(got.__dict__.values(), want.__dict__.values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert got_grads.keys() == want_grads.keys()
    for k, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[k], atol=1e-5, rtol=1e-4, msg=k)
    assert got_flops < 0.95 * want_flops


def test_auto_compiles_the_generator_pass_only_for_a_large_generator_on_a_cpu_with_a_compiler(
    prepared_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "has_cxx_compiler", lambda: True)
    tiny = Trainer(tiny_config(prepared_cache, tmp_path), tmp_path / "tiny")
    assert sum(p.numel() for p in tiny.G.parameters()) < 1_000_000
    assert not tiny.should_compile_generator()
    wide = {"base_channels": 128, "max_channels": 512}
    large = Trainer(tiny_config(prepared_cache, tmp_path, generator_overrides=wide), tmp_path / "large")
    assert sum(p.numel() for p in large.G.parameters()) >= 1_000_000
    assert large.should_compile_generator()
    monkeypatch.setattr(trainer_module, "has_cxx_compiler", lambda: False)
    assert not large.should_compile_generator()
    on = Trainer(tiny_config(prepared_cache, tmp_path, compile_generator="on"), tmp_path / "on")
    assert on.should_compile_generator()
    with pytest.raises(ValueError, match="compile_generator"):
        tiny_config(prepared_cache, tmp_path, compile_generator="yes")
    # the discriminator by the same rule, on its own size and setting
    assert not tiny.should_compile_discriminator()
    monkeypatch.setattr(trainer_module, "has_cxx_compiler", lambda: True)
    disc = Trainer(tiny_config(prepared_cache, tmp_path, disc_preset="discriminator-cpu"), tmp_path / "disc")
    assert sum(p.numel() for p in disc.D.parameters()) >= 1_000_000
    assert disc.should_compile_discriminator() and not disc.should_compile_generator()
    off = tiny_config(prepared_cache, tmp_path, disc_preset="discriminator-cpu", compile_discriminator="off")
    assert not Trainer(off, tmp_path / "off").should_compile_discriminator()
    with pytest.raises(ValueError, match="compile_discriminator"):
        tiny_config(prepared_cache, tmp_path, compile_discriminator="yes")


def test_a_failing_compile_leaves_training_eager(
    prepared_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(fn: object, **_: object) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("no C++ compiler after all")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = tiny_config(prepared_cache, tmp_path, compile_generator="on", compile_discriminator="on", precision="fp32")
    failing, eager = (
        Trainer(cfg, tmp_path / "a"),
        Trainer(dataclasses.replace(cfg, compile_generator="off", compile_discriminator="off"), tmp_path / "b"),
    )
    eager.G.load_state_dict(failing.G.state_dict())
    eager.D.load_state_dict(failing.D.state_dict())
    for _ in range(2):  # step 0 is an R1 step, step 1 is not
        failing.train_step()
        eager.train_step()
    assert failing._compiled_pass is False and failing._compiled_D is False
    assert "the generator pass stays eager" in caplog.text and "the discriminator stays eager" in caplog.text
    assert "no C++ compiler after all" in caplog.text
    failing_params = [*failing.G.parameters(), *failing.D.parameters()]
    for p, q in zip(failing_params, [*eager.G.parameters(), *eager.D.parameters()], strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.slow  # inductor compiles a tiny discriminator three ways: about a minute with an empty cache
@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
def test_a_compiled_discriminator_trains_as_the_eager_one(prepared_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        prepared_cache, tmp_path, compile_discriminator="on", lambda_g_cls_kept=1.0, precision="fp32", lr_d=1e-3
    )
    compiled, eager = (
        Trainer(cfg, tmp_path / "a"),
        Trainer(dataclasses.replace(cfg, compile_discriminator="off"), tmp_path / "b"),
    )
    eager.G.load_state_dict(compiled.G.state_dict())
    eager.D.load_state_dict(compiled.D.state_dict())
    calls = {"compiled": 0, "eager": 0}
    original = compiled.discriminator

    def counting(double_backward: bool = False) -> torch.nn.Module:
        d = original(double_backward)
        calls["eager" if d is compiled.D else "compiled"] += 1
        return d

    compiled.discriminator = counting  # type: ignore[method-assign]
    logs = {}
    for step in range(2):  # step 0: R1 (the real pass and its penalty compiled as one function), step 1: plain
        logs[step] = (compiled.train_step(), eager.train_step())
    assert isinstance(compiled._compiled_D, torch.nn.Module) and eager._compiled_D is False
    assert calls == {"compiled": 4, "eager": 0}  # D's updates (step 0's fake batch) and G's losses
    assert "d_r1" in logs[0][0] and "d_r1" in logs[0][1]  # step 0's penalty: compiled as one function, and eager
    for a, b in logs.values():
        for name in ("d_loss", "g_loss", "d_adv", "g_adv", *(["d_r1"] if "d_r1" in a else [])):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-5), name
    for (name, p), q in zip(compiled.D.named_parameters(), eager.D.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"D's {name}")
    for p, q in zip(compiled.G.parameters(), eager.G.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # inductor compiles two tiny generators: about a minute with an empty cache
@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
@pytest.mark.parametrize("preset", ["stgan-tiny", "mugan-tiny"])
def test_a_compiled_generator_pass_computes_the_eager_one(prepared_cache: Path, tmp_path: Path, preset: str) -> None:
    cfg = tiny_config(prepared_cache, tmp_path, preset=preset, compile_generator="on", precision="fp32")
    compiled, eager = (
        Trainer(cfg, tmp_path / "a"),
        Trainer(dataclasses.replace(cfg, compile_generator="off"), tmp_path / "b"),
    )
    eager.G.load_state_dict(compiled.G.state_dict())
    gen = torch.Generator().manual_seed(0)
    x_real, c_src, c_trg = compiled._batch(0, gen)
    cond, cond_rec = compiled._conditions(c_src, c_trg, gen)
    grads = {}
    for name, trainer in (("compiled", compiled), ("eager", eager)):
        g_pass = trainer.generator_pass(x_real, cond, cond_rec)
        outputs = [g_pass.x_fake, g_pass.mask_fake, g_pass.x_rec_raw, g_pass.mask_rec]
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).mean() for t in outputs if t is not None)
        grads[name] = torch.autograd.grad(loss, list(trainer.G.parameters()), allow_unused=True)
        grads[name + " outputs"] = outputs
    assert compiled._compiled_pass and eager._compiled_pass is False  # compiled, not fallen back to eager
    for a, b in zip(grads["compiled outputs"], grads["eager outputs"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(compiled.G.named_parameters(), grads["compiled"], grads["eager"], strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6, msg=f"gradient of {name}")
    # the trial pass that compiled at the first call left G's BatchNorm statistics as they were: both
    # generators have taken one training-mode pass
    for (name, a), b in zip(compiled.G.named_buffers(), eager.G.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    compiled.train_step()  # a whole step (D's update, G's loss and backward) with the compiled pass
    assert compiled.step == 1


@pytest.mark.parametrize("preset", ["stgan-tiny", "mugan-tiny"])
def test_rec_fraction_reconstructs_the_first_faces_of_the_batch_and_edits_them_all(
    prepared_cache: Path, tmp_path: Path, preset: str
) -> None:
    """``rec_fraction`` 0.25: the edit covers the whole batch, the reconstruction its first quarter, each
    face's outputs those of the whole pass (BatchNorm in eval mode, so a face does not depend on its
    batch), the reconstruction losses read the faces reconstructed, and the step does fewer FLOPs."""
    from contextlib import nullcontext

    from torch.utils.flop_counter import FlopCounterMode

    from training import losses

    # no R1 (FlopCounterMode's module hooks cannot follow its autograd.grad)
    cfg = tiny_config(
        prepared_cache, tmp_path, preset=preset, precision="fp32", compile_generator="off", batch_size=8, r1_gamma=0.0
    )
    part, whole = (
        Trainer(dataclasses.replace(cfg, rec_fraction=0.25), tmp_path / "part"),
        Trainer(cfg, tmp_path / "whole"),
    )
    part.G.load_state_dict(whole.G.state_dict())
    part.D.load_state_dict(whole.D.state_dict())
    gen_part, gen_whole = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x_real, c_src, c_trg = part._batch(0, gen_part)
    cond, cond_rec = part._conditions(c_src, c_trg, gen_part)
    assert whole._batch(0, gen_whole)[0].equal(x_real)
    cond_w, cond_rec_w = whole._conditions(c_src, c_trg, gen_whole)
    assert cond.equal(cond_w) and cond_rec.shape[0] == 2 and cond_rec.equal(cond_rec_w[:2])

    part.G.eval(), whole.G.eval()
    with torch.no_grad():
        got = losses.generator_pass(part.G, x_real, cond, cond_rec, nullcontext, cfg.joint_decode)
        want = losses.generator_pass(whole.G, x_real, cond_w, cond_rec_w, nullcontext, cfg.joint_decode)
    torch.testing.assert_close(got.x_fake, want.x_fake, atol=1e-5, rtol=1e-4)
    assert got.x_rec_raw.shape[0] == 2
    torch.testing.assert_close(got.x_rec_raw, want.x_rec_raw[:2], atol=1e-5, rtol=1e-4)
    if want.mask_rec is not None:
        torch.testing.assert_close(got.mask_rec, want.mask_rec[:2], atol=1e-5, rtol=1e-4)

    # the reconstruction terms compare the reconstructions with the faces reconstructed
    _, logs = losses.generator_loss(
        got, part.D, x_real, c_src, c_trg, part.cfg,
        background_weight=part.background_weight, mask_weight_map=part.mask_weight_map, autocast=nullcontext,
    )  # fmt: skip
    x_rec = got.x_rec_raw if got.mask_rec is None else got.mask_rec * got.x_rec_raw + (1 - got.mask_rec) * x_real[:2]
    assert logs["g_rec"] == pytest.approx((x_rec - x_real[:2]).abs().mean().item(), rel=1e-5)

    part.G.train(), whole.G.train()
    flops = {}
    for name, trainer in (("part", part), ("whole", whole)):
        with FlopCounterMode(display=False) as counter:
            logs = trainer.train_step()
        assert np.isfinite(logs["g_loss"]) and np.isfinite(logs["d_loss"])
        flops[name] = counter.get_total_flops()
    assert flops["part"] < 0.85 * flops["whole"]


def test_rec_fraction_must_be_a_share_of_the_batch() -> None:
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="rec_fraction"):
            TrainConfig(rec_fraction=bad)


def test_bf16_generator_gradient_follows_fp32_except_where_the_exact_gradient_is_zero(
    prepared_cache: Path, tmp_path: Path
) -> None:
    """bench/g_precision.py: the same seed and batches in both precisions; bf16 rounds, so the gradients
    differ a little, and most where softmax makes the exact one zero (a self-attention key's bias)."""
    from bench.g_precision import compare_precisions

    configs = {
        p: tiny_config(prepared_cache, tmp_path, preset="mugan-tiny", precision=p, compile_generator="off")
        for p in ("fp32", "bf16")
    }
    parent = Trainer(configs["fp32"], tmp_path / "parent")
    with torch.no_grad():  # self-attention's gamma starts at 0, which gives Q, K and V no gradient at all
        for name, param in parent.G.named_parameters():
            if name.endswith("gamma"):
                param.fill_(0.5)
    cosine, ratio, rows = compare_precisions(configs, [0, 1], parent.save_checkpoint())
    assert 0.9 < cosine < 1.0 and 0.8 < ratio < 1.25
    by_name = {name: (cos, g32, g16) for name, cos, g32, g16 in rows}
    key_bias = [name for name in by_name if name.endswith("key.bias")]
    assert key_bias
    for name in key_bias:  # fp32's is rounding-sized against the query bias beside it; bf16's far larger
        _, g32, g16 = by_name[name]
        assert g32 < 1e-3 * by_name[name.replace("key.bias", "query.bias")][1] and g16 > 10 * g32
