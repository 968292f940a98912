"""Released checkpoints: safetensors + config.json round trip, and refusal of broken folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, load_pretrained, save_pretrained
from models.registry import build, get_preset


def _saved(tmp_path: Path, preset: str = "stgan-tiny") -> tuple[Path, torch.nn.Module]:
    arch, cfg = get_preset(preset)
    torch.manual_seed(0)
    model = build(arch, cfg).eval()
    for p in model.parameters():  # non-trivial values everywhere, including norm layers
        p.data.add_(torch.randn_like(p) * 0.01)
    folder = save_pretrained(tmp_path / "m", model, architecture=arch, metrics={"psnr": 1.0}, card="# card\n")
    return folder, model


@pytest.mark.parametrize("preset", ["stgan-tiny", "mugan-tiny", "attgan-tiny", "stargan-tiny"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, preset: str) -> None:
    folder, model = _saved(tmp_path, preset)
    loaded, info = load_pretrained(folder)
    x = torch.rand(2, 3, model.config.image_size, model.config.image_size) * 2 - 1
    c = torch.tensor([[1.0] + [0.0] * (model.config.n_attrs - 1)] * 2)
    with torch.no_grad():
        a, b = model(x, c), loaded(x, c)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert info.architecture == preset.split("-")[0]
    assert info.attributes == model.config.attributes
    assert info.metrics == {"psnr": 1.0}
    assert (folder / "card.md").read_text() == "# card\n"
    doc = json.loads((folder / "config.json").read_text())
    assert {"format_version", "architecture", "config", "attributes", "image_size", "conditioning"} <= set(doc)


def test_classifier_round_trip(tmp_path: Path) -> None:
    folder, model = _saved(tmp_path, "classifier-tiny")
    loaded, info = load_pretrained(folder)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)
    assert info.kind == "classifier"


def test_tampered_config_is_refused_naming_the_mismatch(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    doc = json.loads((folder / "config.json").read_text())
    doc["config"]["base_channels"] = 8
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"shape mismatch for encoder.0.0.weight"):
        load_pretrained(folder)


def test_missing_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["to_image.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*to_image.weight"):
        load_pretrained(folder)


def test_unexpected_tensor_and_bad_field_are_refused(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*extra.weight"):
        load_pretrained(folder)
    doc = json.loads((folder / "config.json").read_text())
    doc["config"]["colour"] = "blue"
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"unknown field.*colour"):
        load_pretrained(folder)


def test_edit_gain_round_trips_and_bad_gains_are_refused(tmp_path: Path) -> None:
    folder, model = _saved(tmp_path)
    _, info = load_pretrained(folder)
    assert info.edit_gain == 1.0  # the default, also for folders written before the field existed
    arch, _ = get_preset("stgan-tiny")
    save_pretrained(folder, model, architecture=arch, edit_gain=2.25)
    assert load_pretrained(folder)[1].edit_gain == 2.25
    doc = json.loads((folder / "config.json").read_text())
    for bad in (0, -1.0, 11, "2", True, None):
        doc["edit_gain"] = bad
        (folder / "config.json").write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match="edit_gain"):
            load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(doc).replace('"edit_gain": null', '"edit_gain": NaN'))
    with pytest.raises(CheckpointError, match="edit_gain"):
        load_pretrained(folder)


def test_attribute_gains_round_trip_and_bad_ones_are_refused(tmp_path: Path) -> None:
    folder, model = _saved(tmp_path)
    assert load_pretrained(folder)[1].attribute_gains == {}  # absent: every slider uses edit_gain
    arch, _ = get_preset("stgan-tiny")
    attr = model.config.attributes[1]
    save_pretrained(folder, model, architecture=arch, edit_gain=1.25, attribute_gains={attr: 2.0})
    info = load_pretrained(folder)[1]
    assert info.attribute_gains == {attr: 2.0}
    expected = torch.full((len(info.attributes),), 1.25)
    expected[1] = 2.0
    assert torch.equal(info.gains(), expected)  # type: ignore[arg-type]
    doc = json.loads((folder / "config.json").read_text())
    for bad, message in (({"Not_An_Attribute": 2.0}, "Not_An_Attribute"), ({attr: 0}, "edit_gain"), ([2.0], "map")):
        doc["attribute_gains"] = bad
        (folder / "config.json").write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match=message):
            load_pretrained(folder)


def test_truncated_weights_and_bad_json_are_refused(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pretrained(folder)


def test_loader_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = _saved(tmp_path)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", forbidden)
    load_pretrained(folder)
