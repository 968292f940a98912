"""The batched MTCNN (server/mtcnn.py) finds what facenet-pytorch's own ``MTCNN.detect`` finds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from server.mtcnn import area_crops, area_resize, detect_faces, summed_area_table

if TYPE_CHECKING:
    from facenet_pytorch import MTCNN

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos"


@pytest.mark.parametrize("size", [24, 48])
def test_area_crops_equal_interpolate_area_crop_by_crop(size: int) -> None:
    rng = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 61, 83, generator=rng) * 255).round()
    # whole image, inner boxes, boxes at every border, crops smaller than the output (upsampling), 1 px
    boxes = [(0, 61, 0, 83), (3, 40, 5, 50), (50, 61, 70, 83), (0, 9, 0, 7), (20, 21, 30, 31), (0, 61, 82, 83)]
    boxes += [
        tuple(
            int(v)
            for v in (
                *sorted(torch.randint(0, 62, (2,), generator=rng)),
                *sorted(torch.randint(0, 84, (2,), generator=rng)),
            )
        )
        for _ in range(20)
    ]
    boxes = [(y0, y1, x0, x1) for y0, y1, x0, x1 in boxes if y1 > y0 and x1 > x0]
    y0, y1, x0, x1 = (torch.tensor(v) for v in zip(*boxes, strict=True))
    ours = area_crops(summed_area_table(image.permute(1, 2, 0).to(torch.uint8).numpy()), y0, y1, x0, x1, size)
    reference = torch.cat([F.interpolate(image[None, :, a:b, c:d], (size, size), mode="area") for a, b, c, d in boxes])
    assert ours.shape == (len(boxes), 3, size, size)
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=0)


@pytest.mark.parametrize("size", [(37, 50), (9, 61), (61, 83), (70, 90), (1, 1)])
def test_area_resize_equals_interpolate_area(size: tuple[int, int]) -> None:
    """P-Net's pyramid levels: down, uneven, identity, up and to one pixel."""
    image = (torch.rand(3, 61, 83, generator=torch.Generator().manual_seed(1)) * 255).round()
    ours = area_resize(summed_area_table(image.permute(1, 2, 0).to(torch.uint8).numpy()), size)
    reference = F.interpolate(image[None], size, mode="area")
    assert ours.shape == (1, 3, *size)
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def mtcnn() -> MTCNN:
    from facenet_pytorch import MTCNN

    return MTCNN(keep_all=True, device=torch.device("cpu"), min_face_size=20, post_process=False)


@pytest.mark.parametrize("name", ["portrait-1.jpg", "group-six-faces.jpg"])
def test_detect_faces_matches_facenet(mtcnn: MTCNN, name: str) -> None:
    im = Image.open(PHOTOS / name).convert("RGB")
    scale = min(1.0, 640 / max(im.size))
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
    boxes, probs, points = (np.asarray(v, dtype=np.float64) for v in mtcnn.detect(im, landmarks=True))
    ours, our_points = detect_faces(np.asarray(im), mtcnn.pnet, mtcnn.rnet, mtcnn.onet)
    assert len(ours) == len(boxes) >= 1
    theirs, ours_order = np.argsort(boxes[:, 0]), np.argsort(ours[:, 0])
    np.testing.assert_allclose(ours[ours_order, :4], boxes[theirs], atol=1e-2)
    np.testing.assert_allclose(ours[ours_order, 4], probs[theirs], atol=1e-4)
    np.testing.assert_allclose(our_points[ours_order], points[theirs], atol=1e-2)


@pytest.mark.parametrize("shape", [(120, 160, 3), (8, 640, 3)])  # no face; too thin for P-Net's window
def test_no_face_gives_empty_arrays(mtcnn: MTCNN, shape: tuple[int, int, int]) -> None:
    flat = np.full(shape, 128, np.uint8)
    boxes, points = detect_faces(flat, mtcnn.pnet, mtcnn.rnet, mtcnn.onet)
    assert boxes.shape == (0, 5) and points.shape == (0, 5, 2)
