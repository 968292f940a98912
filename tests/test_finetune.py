"""Fine-tuning a released model: the release carries its discriminator, ``train --init-from weights/<name>``
starts from it exactly, and bad input is refused without touching anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from models.checkpoint import DISCRIMINATOR_FILE, load_pretrained
from tests.test_training import tiny_sets
from training.cli import main as cli
from training.config import TrainConfig
from training.export import export_run
from training.reports import SAMPLES_FILE
from training.trainer import Trainer


@pytest.fixture
def release(prepared_cache: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    cli(
        ["train", "--preset", "stgan-tiny", "--run", str(run), "--max-steps", "2", *tiny_sets(prepared_cache, tmp_path)]
    )
    return export_run(run, tmp_path / "weights" / "tiny", checkpoint="last", cache_dir=prepared_cache)


def test_export_writes_the_discriminator_in_half_precision(release: Path) -> None:
    path = release / DISCRIMINATOR_FILE
    assert path.is_file()
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {torch.float16}
    assert meta["architecture"] == "discriminator" and json.loads(meta["config"])["n_attrs"] == 13


def _trainer_from_release(
    release: Path, prepared_cache: Path, tmp_path: Path, *sets: str, args: tuple[str, ...] = ()
) -> Trainer:
    """A run started from ``release`` (no step taken), loaded back from its checkpoint."""
    cfg_args = tiny_sets(prepared_cache, tmp_path, *sets)
    run = tmp_path / "ft"
    cli(["train", "--run", str(run), "--init-from", str(release), "--max-steps", "0", *args, *cfg_args])
    from training.checkpoints import read_training_checkpoint

    _, meta = read_training_checkpoint(run / "checkpoints" / "last.safetensors")
    trainer = Trainer(TrainConfig.from_dict(json.loads(meta["train_config"])), run)
    trainer.load_checkpoint(run / "checkpoints" / "last.safetensors")
    return trainer


def _training_layout(trainer: Trainer) -> torch.memory_format:
    """The layout training chose on this machine (channels_last with bf16, NCHW in fp32 on a CPU): a
    release run in the same layout runs the same kernels, so the outputs agree bit for bit."""
    weight = next(p for p in trainer.G_ema.parameters() if p.dim() == 4)
    return torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def test_init_from_a_release_reproduces_its_generator_before_the_first_step(
    release: Path, prepared_cache: Path, tmp_path: Path
) -> None:
    trainer = _trainer_from_release(release, prepared_cache, tmp_path)
    assert trainer.cfg.init_from == str(release) and trainer.cfg.preset == "stgan-tiny"
    assert trainer.step == 2  # the release's counters carry on
    # exporting the fine-tune keeps the parent's alignment template when the cache has none
    doc = json.loads((release / "config.json").read_text())
    doc["alignment_template"] = {"landmarks": [[0.4, 0.5], [0.6, 0.5], [0.5, 0.6], [0.4, 0.7], [0.6, 0.7]]}
    (release / "config.json").write_text(json.dumps(doc))
    child = export_run(tmp_path / "ft", tmp_path / "weights" / "child", checkpoint="last", cache_dir=prepared_cache)
    assert load_pretrained(child)[1].alignment_template == doc["alignment_template"]
    card = (child / "card.md").read_text()
    assert (child / DISCRIMINATOR_FILE).is_file() and f"`{release}`" in card
    # the card's "reproduce" line names the run folder the checkpoint came from, not the release's name
    assert f"--run {(tmp_path / 'ft').as_posix()} --resume" in card
    released, _ = load_pretrained(release)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    c = torch.zeros(3, 13)
    c[:, 3] = 1
    layout = _training_layout(trainer)
    with torch.no_grad():
        want = released.float().to(memory_format=layout)(x.contiguous(memory_format=layout), c)
        got = trainer.G_ema.eval()(x.contiguous(memory_format=layout), c)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    # D came from the release too (fp16 values), not from a fresh initialisation
    with safe_open(str(release / DISCRIMINATOR_FILE), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118
            torch.testing.assert_close(trainer.D.state_dict()[key], fh.get_tensor(key).float(), atol=0, rtol=0)


def test_a_release_without_discriminator_needs_fresh_discriminator(
    release: Path, prepared_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (release / DISCRIMINATOR_FILE).unlink()
    run = tmp_path / "ft"
    args = ["train", "--run", str(run), "--init-from", str(release), "--max-steps", "0"]
    with pytest.raises(SystemExit) as exc:
        cli([*args, *tiny_sets(prepared_cache, tmp_path)])
    assert exc.value.code == 2
    assert "--fresh-discriminator" in caplog.text and DISCRIMINATOR_FILE in caplog.text
    assert not run.exists()  # nothing written
    cli([*args, "--fresh-discriminator", *tiny_sets(prepared_cache, tmp_path)])
    assert (run / "checkpoints" / "last.safetensors").is_file()


def test_a_deconv_release_warm_starts_a_resize_generator(prepared_cache: Path, tmp_path: Path) -> None:
    import dataclasses

    from models.blocks import resize_weight_from_deconv
    from models.checkpoint import save_pretrained
    from models.registry import build, get_preset

    arch, cfg = get_preset("stgan-tiny")
    old = build(arch, dataclasses.replace(cfg, upsample="deconv"))  # as the first campaign's releases
    folder = save_pretrained(tmp_path / "old", old, architecture=arch, training={"preset": "stgan-tiny", "steps": 7})
    run = tmp_path / "ft"
    override = 'generator_overrides={"upsample": "resize"}'
    args = ["train", "--run", str(run), "--init-from", str(folder), "--fresh-discriminator", "--max-steps", "0"]
    cli([*args, *tiny_sets(prepared_cache, tmp_path, override)])
    from training.checkpoints import ema_generator_from_checkpoint

    _, new, meta = ema_generator_from_checkpoint(run / "checkpoints" / "last.safetensors")
    assert new.config.upsample == "resize" and meta["step"] == "7"
    old_sd, new_sd = old.state_dict(), new.state_dict()
    torch.testing.assert_close(new_sd["encoder.0.0.weight"], old_sd["encoder.0.0.weight"], atol=0, rtol=0)
    want = resize_weight_from_deconv(old_sd["to_image.weight"])
    torch.testing.assert_close(new_sd["to_image.weight"], want, atol=0, rtol=0)


def test_prepare_refuses_to_replace_the_cache_of_another_dataset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import make_celeba_folder

    first, second = make_celeba_folder(tmp_path / "a"), make_celeba_folder(tmp_path / "b", seed=1)
    cache = tmp_path / "cache"
    base = ["prepare", "--cache-dir", str(cache), "--image-size", "32", "--template-samples", "0"]
    cli([*base, "--data", str(first)])
    before = (cache / "images.npy").read_bytes()
    cli([*base, "--data", str(first)])  # the same source again is fine
    with pytest.raises(SystemExit) as exc:
        cli([*base, "--data", str(second)])
    assert exc.value.code == 2 and "--overwrite" in caplog.text and str(first.resolve()) in caplog.text
    assert (cache / "images.npy").read_bytes() == before  # untouched
    cli([*base, "--data", str(second), "--overwrite"])
    assert (cache / "images.npy").read_bytes() != before


def test_add_attributes_keeps_the_old_edits_at_step_0(release: Path, prepared_cache: Path, tmp_path: Path) -> None:
    trainer = _trainer_from_release(release, prepared_cache, tmp_path, args=("--add-attributes", "Smiling,Wavy_Hair"))
    assert trainer.cfg.attributes[-2:] == ("Smiling", "Wavy_Hair") and len(trainer.cfg.attributes) == 15
    released, _ = load_pretrained(release)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    c_old = torch.zeros(3, 13)
    c_old[:, 3], c_old[1, 7] = 1.0, -1.0
    c_new = torch.cat([c_old, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0]])], dim=1)
    layout = _training_layout(trainer)
    x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        want = released.float().to(memory_format=layout)(x, c_old)  # as training runs it
        got = trainer.G_ema.eval()(x, c_new)  # the new attributes' inputs have zero weights
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    # D's head grew by two rows, zero: the old attributes' logits are unchanged
    head = trainer.D.cls_head[-1]
    assert head.weight.shape[0] == 15 and not head.weight[13:].any() and not head.bias[13:].any()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--add-attributes", "Bald"], "already edited"),
        (["--add-attributes", "Sunglasses"], "not in the dataset"),
        (["--add-attributes", "Blond-Hair!"], "not a valid attribute name"),
        (["--set", "cache_dir={other}"], "px"),  # a dataset of another resolution
    ],
)
def test_bad_fine_tunes_are_refused_and_nothing_is_written(
    release: Path, prepared_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: list[str], needle: str
) -> None:
    from tests.conftest import make_celeba_folder
    from training.data import prepare_cache

    other = tmp_path / "cache64"
    if "px" in needle:
        prepare_cache(make_celeba_folder(tmp_path / "big", size=64), other, image_size=64)
    extra = [e.replace("{other}", str(other)) for e in extra]
    run = tmp_path / "ft"
    before = sorted(p.name for p in release.iterdir())
    with pytest.raises(SystemExit) as exc:
        cli(["train", "--run", str(run), "--init-from", str(release), *tiny_sets(prepared_cache, tmp_path), *extra])
    assert needle in (str(exc.value.code) + caplog.text)
    assert not run.exists() and sorted(p.name for p in release.iterdir()) == before


@pytest.mark.slow
def test_fine_tune_with_an_added_attribute_reaches_a_live_editor(
    release: Path, prepared_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release served live; a fine-tune adding Smiling is exported with --notify: the editor's API lists
    the new slider, edits with it, and the old sliders give the same image as before at step 0."""
    import base64
    import shutil

    import httpx

    from server.launch import live_server
    from tests.server_utils import PHOTOS, make_weights

    weights = make_weights(tmp_path / "served", generators=())  # the classifier only
    shutil.copytree(release, weights / "tiny")
    crop = io_png(PHOTOS / "portrait-2.jpg")
    monkeypatch.setenv("FACE_EDITOR_ADMIN_TOKEN", "s3cret")
    # one fixed numeric path, so "unchanged" can mean equal bytes: where the CPU has bf16 units the
    # precision trial at each load may pick bf16 for one load and fp32 for the next
    fixed = {"precision": "fp32", "layout": "contiguous", "compile": "off"}
    with live_server(weights, admin_token="s3cret", **fixed) as (url, _):

        def edit(edits: str) -> httpx.Response:
            files = {"image": ("c.png", crop, "image/png")}
            data = {"edits": edits, "aligned": "true", "model": "tiny", "image_format": "png"}
            return httpx.post(f"{url}/v1/edit", files=files, data=data, timeout=60)

        def attributes() -> list[str]:
            models = httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
            return next(m for m in models if m["name"] == "tiny")["attributes"]

        before = edit('{"Young": 1}').json()["image"]
        run = tmp_path / "ft"
        base = ["train", "--run", str(run), "--init-from", str(weights / "tiny"), "--add-attributes", "Smiling"]
        cli([*base, "--max-steps", "0", *tiny_sets(prepared_cache, tmp_path)])
        notify = ["--cache-dir", str(prepared_cache), "--notify", f"{url}/v1/models/reload"]
        cli(["export", "--run", str(run), "--out", str(weights / "tiny"), "--checkpoint", "last", *notify])
        assert attributes()[-1] == "Smiling" and len(attributes()) == 14
        assert edit('{"Young": 1}').json()["image"] == before  # step 0: the old edits are unchanged
        # two steps of fine-tuning, exported again: the new slider edits
        cli(["train", "--run", str(run), "--resume", "--max-steps", "2"])
        cli(["export", "--run", str(run), "--out", str(weights / "tiny"), "--checkpoint", "last", *notify])
        resp = edit('{"Smiling": 1}')
        assert resp.status_code == 200, resp.text
        assert base64.b64decode(resp.json()["image"])[:4] == b"\x89PNG"


def io_png(path: Path) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((32, 32)).save(buf, format="PNG")
    return buf.getvalue()


def test_fine_tune_on_your_own_folder_without_a_partition_file(
    release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import make_celeba_folder
    from tests.test_training import TINY_SETTINGS

    mine = make_celeba_folder(tmp_path / "my-faces", n=40)
    (mine / "list_eval_partition.txt").unlink()
    monkeypatch.chdir(tmp_path)
    sets = [x for s in [*TINY_SETTINGS, f"classifier={tmp_path}/none"] for x in ("--set", s)]
    base = ["train", "--init-from", str(release), "--data", str(mine), "--max-steps", "1", *sets]
    cli([*base, "--run", str(tmp_path / "a")])
    cache = tmp_path / ".cache" / "datasets" / "my-faces"
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["source"] == str(mine.resolve()) and "hashes" in meta["split_source"]
    assert sum(meta["counts"].values()) == 40 and meta["counts"]["train"] > 0
    stamp = (cache / "images.npy").stat().st_mtime_ns
    cli([*base, "--run", str(tmp_path / "b")])  # the recorded split and cache are reused
    assert (cache / "images.npy").stat().st_mtime_ns == stamp

    big = make_celeba_folder(tmp_path / "big-faces", size=64)
    with pytest.raises(SystemExit):
        cli(["train", "--init-from", str(release), "--data", str(big), "--run", str(tmp_path / "c"), *sets])
    assert "64x64" in caplog.text and not (tmp_path / "c").exists()
    assert not (tmp_path / ".cache" / "datasets" / "big-faces").exists()


def test_add_a_new_column_of_your_own_attribute_file(
    release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import make_celeba_folder
    from tests.test_training import TINY_SETTINGS

    mine = make_celeba_folder(tmp_path / "freckled", n=40)
    attr_file = mine / "list_attr_celeba.txt"
    lines = attr_file.read_text().splitlines()
    lines[1] += " Freckles"  # a column CelebA does not have
    lines[2:] = [line + (" 1" if k % 3 == 0 else " -1") for k, line in enumerate(lines[2:])]
    attr_file.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    sets = [x for s in [*TINY_SETTINGS, f"classifier={tmp_path}/none"] for x in ("--set", s)]
    run = tmp_path / "run"
    args = ["train", "--init-from", str(release), "--data", str(mine), "--add-attributes", "Freckles"]
    cli([*args, "--run", str(run), "--max-steps", "1", *sets])
    out = export_run(run, tmp_path / "weights" / "freckles", checkpoint="last")
    _, info = load_pretrained(out)
    assert info.attributes[-1] == "Freckles" and len(info.attributes) == 14
    card = (out / "card.md").read_text()
    assert f"`{release}`" in card and "attributes added to the parent release's: Freckles" in card
    assert str(mine) in card


def test_recompute_bn_rewrites_a_release_with_its_own_statistics(
    release: Path, prepared_cache: Path, tmp_path: Path
) -> None:
    from models.checkpoint import read_config
    from training.batchnorm import batchnorm_layers

    before, _ = load_pretrained(release)
    out = tmp_path / "weights" / "tiny-bn"
    cli(
        [
            "recompute-bn",
            "--model",
            str(release),
            "--out",
            str(out),
            "--cache-dir",
            str(prepared_cache),
            "--batches",
            "2",
        ]
    )
    after, info = load_pretrained(out)
    old_bn, new_bn = batchnorm_layers(before)[0], batchnorm_layers(after)[0]
    assert not torch.allclose(old_bn.running_var, new_bn.running_var)  # the statistics changed
    for (name, p), q in zip(before.named_parameters(), after.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)  # the weights did not
    doc = read_config(out)
    assert 0 < doc["training"]["batchnorm"]["images"] <= 32 and info.edit_gain == 1.0 and doc["metrics"] == {}
    assert (out / DISCRIMINATOR_FILE).is_file() and (out / SAMPLES_FILE).is_file()
    assert read_config(release).get("training", {}).get("batchnorm") is None  # the source is untouched


def test_a_mugan_release_warm_starts_a_run_with_more_skip_levels(prepared_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    two_levels = 'generator_overrides={"n_skip_layers": 1}'
    sets = tiny_sets(prepared_cache, tmp_path, two_levels)
    cli(["train", "--preset", "mugan-tiny", "--run", str(run), "--max-steps", "1", *sets])
    release = export_run(run, tmp_path / "weights" / "mu", checkpoint="last", cache_dir=prepared_cache)
    more = 'generator_overrides={"n_skip_layers": 2, "n_skip_conv_layers": 1}'
    trainer = _trainer_from_release(release, prepared_cache, tmp_path, more)
    assert trainer.G.config.n_skip_layers == 2 and len(trainer.G.aucs) == 2
    released, _ = load_pretrained(release)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    c = torch.zeros(3, 13)
    c[:, 3] = 1
    with torch.no_grad():
        for got, want in zip(trainer.G_ema.eval()(x, c), released.float()(x, c), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mugan", "stgan"])
def test_the_continue_recipe_is_the_served_models_own_with_a_quarter_of_the_fake_term(name: str) -> None:
    """``training/recipes/<name>-continue-cpu.json`` is what README's "Retrain the served model" trains with:
    the release's stored train config, except D's fake-classification term at 0.25 (session 33: at 1 every
    continuation lost its masculinising edits) and how often it validates."""
    recipe = json.loads(Path(f"training/recipes/{name}-continue-cpu.json").read_text())
    served = json.loads(Path(f"weights/{name}/config.json").read_text())["training"]["train_config"]
    assert TrainConfig.from_dict(recipe).lambda_d_cls_fake == 0.25
    machine_or_run = {"init_from", "threads", "eval_every", "lambda_d_cls_fake"}
    differs = {k for k in set(recipe) | set(served) if recipe.get(k) != served.get(k)} - machine_or_run
    assert not differs, f"{name}-continue-cpu.json differs from weights/{name}'s train config in {sorted(differs)}"
