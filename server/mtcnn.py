"""MTCNN's three stages for one image, with the second and third stage's crops resized all at once.

facenet-pytorch's ``detect_face`` cuts every candidate box out of the image and resizes it with its own
``interpolate(mode="area")`` call: a few hundred calls per photo (a quarter of detection on portrait-1 in
a cProfile on the EPYC). Area resizing is an average over integer windows, so every window of every crop
is a difference of four entries of one summed-area table: :func:`area_crops` computes all crops in a few
tensor operations and gives the values ``interpolate`` gives (to float rounding). Everything else —
pyramid, thresholds, box regression, NMS — is facenet-pytorch's own code, called in the same order, so
boxes, scores and landmarks match ``MTCNN.detect`` (tests/test_mtcnn.py).
"""

from __future__ import annotations

import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import (
    batched_nms,
    batched_nms_numpy,
    bbreg,
    generateBoundingBox,
    pad,
    rerec,
)


def summed_area_table(image: np.ndarray) -> torch.Tensor:
    """(H + 1, W + 1, C) integer table of an (H, W, C) uint8 image: entry (y, x) is the sum of
    ``image[:y, :x]`` (exact; int32 while it cannot overflow). Built in numpy in the image's own layout:
    a cumulative sum over a transposed view costs twice as much."""
    h, w, c = image.shape
    dtype = np.int32 if h * w * 255 < 2**31 else np.int64
    table = np.zeros((h + 1, w + 1, c), dtype)
    table[1:, 1:] = image
    np.cumsum(table, axis=0, out=table)
    np.cumsum(table, axis=1, out=table)
    return torch.from_numpy(table)


def _windows(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive pooling's windows: output ``i`` of a ``length``-long span averages
    ``[start + floor(i * length / size), start + ceil((i + 1) * length / size))``. (N,) -> 2 x (N, size)."""
    i = torch.arange(size, dtype=torch.int64, device=start.device)
    n = length.long().unsqueeze(1)
    lo = (i * n).div(size, rounding_mode="floor")
    hi = ((i + 1) * n + size - 1).div(size, rounding_mode="floor")
    return start.long().unsqueeze(1) + lo, start.long().unsqueeze(1) + hi


def _area_sums(
    table: torch.Tensor, rs: torch.Tensor, re: torch.Tensor, cs: torch.Tensor, ce: torch.Tensor
) -> torch.Tensor:
    """Mean of every window (rows ``[rs, re)`` x columns ``[cs, ce)``) from four table entries:
    (N, oh) row and (N, ow) column bounds -> (N, C, oh, ow) float32."""
    _, wt, c = table.shape
    flat = table.reshape(-1, c)
    n, oh, ow = len(rs), rs.shape[1], cs.shape[1]

    def at(r: torch.Tensor, col: torch.Tensor) -> torch.Tensor:  # (N, oh, 1) x (N, 1, ow) -> (N, oh, ow, C)
        idx = (r.unsqueeze(2) * wt + col.unsqueeze(1)).reshape(-1)
        # index_select copies whole rows: 2.5x faster than flat[idx] (132k rows of a 521 x 641 table)
        return flat.index_select(0, idx).reshape(n, oh, ow, c)

    sums = at(re, ce) - at(rs, ce) - at(re, cs) + at(rs, cs)  # exact integers
    area = ((re - rs).unsqueeze(2) * (ce - cs).unsqueeze(1)).unsqueeze(3)
    return (sums.double() / area).float().permute(0, 3, 1, 2)


def area_crops(
    table: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, size: int
) -> torch.Tensor:
    """``F.interpolate(image[:, y0:y1, x0:x1][None], (size, size), mode="area")`` for every box at once.

    ``table`` is :func:`summed_area_table` of the image; boxes are integer pixel bounds (N,), non-empty and
    inside the image. Returns (N, C, size, size) float32.
    """
    rs, re = _windows(y0, y1 - y0, size)  # (N, size)
    cs, ce = _windows(x0, x1 - x0, size)
    return _area_sums(table, rs, re, cs, ce)


def area_resize(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(image[None], size, mode="area")`` of the whole image from its summed-area table:
    (1, C, oh, ow) float32. P-Net's pyramid is ten such resizes of one image, where ``adaptive_avg_pool2d``
    sums every window again (detection on the 2-core EPYC, 2 threads, 12 interleaved rounds: portrait-1 at
    520 x 640 98.8 -> 94.3 ms, group-six-faces at 640 x 336 126.8 -> 122.9 ms)."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    zero = torch.zeros(1, dtype=torch.int64, device=table.device)
    rs, re = _windows(zero, torch.full_like(zero, h), size[0])
    cs, ce = _windows(zero, torch.full_like(zero, w), size[1])
    return _area_sums(table, rs, re, cs, ce)


def _crops(table: torch.Tensor, boxes: torch.Tensor, w: int, h: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage input of each box (facenet's clipped 1-based box, area-resized, scaled to [-1, 1]) and
    which boxes had a non-empty crop."""
    y, ey, x, ex = (torch.from_numpy(v).long().to(table.device) for v in pad(boxes, w, h))
    valid = (ey > y - 1) & (ex > x - 1)
    crops = area_crops(table, y[valid] - 1, ey[valid], x[valid] - 1, ex[valid], size)
    return ((crops - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last), valid


def _no_faces() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)


def _zeros(boxes: torch.Tensor) -> torch.Tensor:
    """The image index of every box for facenet's batched NMS: all from image 0."""
    return torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)


@torch.no_grad()
def detect_faces(
    image: np.ndarray,
    pnet: torch.nn.Module,
    rnet: torch.nn.Module,
    onet: torch.nn.Module,
    min_face_size: int = 20,
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
    factor: float = 0.709,
) -> tuple[np.ndarray, np.ndarray]:
    """MTCNN on one (H, W, 3) uint8 image, on the device of the nets: boxes (N, 5: x0, y0, x1, y1, score)
    and landmarks (N, 5, 2) in the image's pixels, in facenet-pytorch's order before its sort."""
    device = next(pnet.parameters()).device
    h, w = image.shape[:2]
    m = 12.0 / min_face_size
    minl = min(h, w) * m
    scales = []
    scale = m
    while minl >= 12:
        scales.append(scale)
        scale *= factor
        minl *= factor

    if not scales:  # smaller than P-Net's 12-px window at the largest scale (e.g. a thin strip)
        return _no_faces()
    table = summed_area_table(image).to(device)
    # first stage: P-Net over the pyramid (facenet's code path; its whole-image area resizes from the table)
    boxes_all, picks, offset = [], [], 0
    for scale in scales:
        im_data = area_resize(table, (int(h * scale + 1), int(w * scale + 1)))
        reg, probs = pnet(((im_data - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last))
        boxes_scale, inds_scale = generateBoundingBox(reg, probs[:, 1], scale, thresholds[0])
        boxes_all.append(boxes_scale)
        picks.append(batched_nms(boxes_scale[:, :4], boxes_scale[:, 4], inds_scale, 0.5) + offset)
        offset += boxes_scale.shape[0]
    boxes = torch.cat(boxes_all)[torch.cat(picks)]
    boxes = boxes[batched_nms(boxes[:, :4], boxes[:, 4], _zeros(boxes), 0.7)]
    if len(boxes) == 0:
        return _no_faces()
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack(
        [
            boxes[:, 0] + boxes[:, 5] * regw,
            boxes[:, 1] + boxes[:, 6] * regh,
            boxes[:, 2] + boxes[:, 7] * regw,
            boxes[:, 3] + boxes[:, 8] * regh,
            boxes[:, 4],
        ],
        1,
    )
    boxes = rerec(boxes)

    # second stage: R-Net on every candidate's 24-px crop
    crops, valid = _crops(table, boxes, w, h, 24)
    boxes = boxes[valid]
    reg, probs = rnet(crops)
    keep = probs[:, 1] > thresholds[1]
    boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], 1)
    reg = reg[keep]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], _zeros(boxes), 0.7)
    boxes = rerec(bbreg(boxes[pick], reg[pick]))
    if len(boxes) == 0:
        return _no_faces()

    # third stage: O-Net on the survivors' 48-px crops, landmarks and "Min" NMS
    crops, valid = _crops(table, boxes, w, h, 48)
    boxes = boxes[valid]
    reg, points, probs = onet(crops)
    keep = probs[:, 1] > thresholds[2]
    boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], 1)
    points, reg = points[keep], reg[keep]
    bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    points = torch.stack(
        [bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1, bh[:, None] * points[:, 5:] + boxes[:, 1:2] - 1], 2
    )
    boxes = bbreg(boxes, reg)
    pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], _zeros(boxes), 0.7, "Min")
    return boxes[pick].cpu().numpy(), points[pick].cpu().numpy()
