"""The alignment template: MTCNN landmarks averaged over a prepared cache of real faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from models.attributes import CELEBA_ATTRIBUTES
from server.faces import DEFAULT_TEMPLATE, FaceDetector, align_face
from tests.server_utils import PHOTOS
from training.data import prepare_cache, read_meta
from training.template import compute_template


def _aligned_faces(size: int = 128) -> list[np.ndarray]:
    detector = FaceDetector(torch.device("cpu"))
    crops = []
    for name in ("portrait-1.jpg", "portrait-2.jpg", "portrait-3.jpg", "group-six-faces.jpg"):
        with Image.open(PHOTOS / name) as im:
            photo = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()
        for face in detector.detect(photo):
            crop, _ = align_face(photo, face.landmarks, DEFAULT_TEMPLATE, size)
            crops.append(((crop[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    return crops


def test_template_of_faces_aligned_to_a_template_is_that_template(tmp_path: Path) -> None:
    crops = _aligned_faces()
    assert len(crops) == 9
    root = tmp_path / "faces"
    (root / "images").mkdir(parents=True)
    for k, crop in enumerate(crops):
        Image.fromarray(crop).save(root / "images" / f"{k}.jpg", quality=95)
    header = " ".join(CELEBA_ATTRIBUTES)
    rows = [f"{k}.jpg " + " ".join(["-1"] * len(CELEBA_ATTRIBUTES)) for k in range(len(crops))]
    (root / "list_attr_celeba.txt").write_text("\n".join([str(len(crops)), header, *rows]) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{k}.jpg 0\n" for k in range(len(crops))))
    cache = tmp_path / "cache"
    prepare_cache(root, cache, image_size=128)

    template = compute_template(cache, n_samples=100)
    assert template["n_faces"] == 9 and template["order"][0] == "left_eye"
    found = np.asarray(template["landmarks"])
    assert np.abs(found - np.asarray(DEFAULT_TEMPLATE)).max() < 0.03  # back where the faces were put
    left_eye, right_eye, nose, mouth_left, mouth_right = found
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert left_eye[1] < nose[1] < mouth_left[1]

    from training.cli import main as cli

    cli(["prepare", "--cache-dir", str(cache), "--template-only", "--template-samples", "50"])
    assert read_meta(cache)["alignment_template"]["n_faces"] == 9
