"""face-edit: a folder of photos edited in-process; failures are reported and skipped; reruns resume."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from server.batch import main
from tests.server_utils import PHOTOS, make_weights


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv") as fh:
        return {Path(r["photo"]).name: r for r in csv.DictReader(fh)}


def test_a_folder_with_a_good_photo_a_faceless_photo_and_a_corrupt_file(tmp_path: Path) -> None:
    weights = make_weights(tmp_path / "weights")
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PHOTOS / "portrait-2.jpg", photos / "good.jpg")
    Image.fromarray(np.full((200, 300, 3), 120, np.uint8)).save(photos / "wall.png")  # no face
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    out = tmp_path / "out"
    args = [str(photos), "--edits", '{"Young": 1}', "--out", str(out), "--weights", str(weights)]

    assert main(args) == 0
    rows = _rows(out)
    assert {k: r["outcome"] for k, r in rows.items()} == {
        "good.jpg": "edited",
        "wall.png": "failed",
        "broken.jpg": "failed",
    }
    assert rows["good.jpg"]["faces"] == "1" and float(rows["good.jpg"]["seconds"]) > 0
    assert "no face" in rows["wall.png"]["detail"] and "decodable" in rows["broken.jpg"]["detail"]
    edited = Image.open(out / "good.jpg")
    assert edited.format == "JPEG" and edited.size == Image.open(photos / "good.jpg").size
    assert sorted(p.name for p in out.iterdir()) == ["good.jpg", "summary.csv"]

    before = (out / "good.jpg").stat().st_mtime_ns
    assert main(args) == 0  # a second run skips what is done
    assert _rows(out)["good.jpg"]["outcome"] == "skipped"
    assert (out / "good.jpg").stat().st_mtime_ns == before
    assert main([*args, "--overwrite", "--format", "png"]) == 0
    assert Image.open(out / "good.png").format == "PNG"


def test_the_output_folder_may_not_hold_inputs(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PHOTOS / "portrait-2.jpg", photos / "good.jpg")
    original = (photos / "good.jpg").read_bytes()
    code = main([str(photos / "*.jpg"), "--edits", "{}", "--out", str(photos), "--weights", str(tmp_path / "none")])
    assert code == 2
    assert sorted(p.name for p in photos.iterdir()) == ["good.jpg"] and (photos / "good.jpg").read_bytes() == original
