"""Face detection (MTCNN on a downscaled copy), 5-point similarity alignment, and paste-back."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from server import paste_kernel

log = logging.getLogger(__name__)

#: Fallback template (fractions of the crop side; left eye, right eye, nose, mouth left, mouth right)
#: for models exported without one. Measured on 1994 celebahq-128 training faces by
#: `python -m training prepare --template-only` on 2026-11-22; exported models carry their own.
DEFAULT_TEMPLATE = [[0.38111, 0.47876], [0.62921, 0.47863], [0.50295, 0.63321], [0.39396, 0.73957], [0.61477, 0.7389]]


class Box(NamedTuple):
    """An axis-aligned box, ``x0, y0`` inclusive and ``x1, y1`` exclusive: the one box type of the
    server (faces, crop footprints, paste regions), and the order of the API's ``box`` / ``region``."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def area(self) -> float:
        return max(self.x1 - self.x0, 0) * max(self.y1 - self.y0, 0)

    def union(self, other: Box) -> Box:
        return Box(min(self.x0, other.x0), min(self.y0, other.y0), max(self.x1, other.x1), max(self.y1, other.y1))


@dataclass
class Face:
    box: Box  # in photo pixels
    score: float
    landmarks: np.ndarray  # (5, 2) in photo pixels

    @property
    def area(self) -> float:
        return self.box.area


class FaceDetector:
    """MTCNN from facenet-pytorch (its weights ship inside the package), run on a downscaled copy by
    :func:`server.mtcnn.detect_faces` (facenet's stages with the crops resized in one batch)."""

    def __init__(self, device: torch.device, max_side: int = 640, min_score: float = 0.9) -> None:
        from facenet_pytorch import MTCNN

        self.max_side, self.min_score = max_side, min_score
        self.mtcnn = MTCNN(keep_all=True, device=device, min_face_size=20, post_process=False)
        self._lock = threading.Lock()  # MTCNN keeps no per-call state, but its nets are shared

    def detect(self, photo: np.ndarray) -> list[Face]:
        """Faces sorted left to right, boxes and landmarks in full-resolution pixels."""
        from PIL import Image

        from server.mtcnn import detect_faces  # imports facenet-pytorch: kept off the start-up path

        h, w = photo.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = Image.fromarray(photo)
        if scale < 1.0:
            # reducing_gap=1: an integer box reduction first, then bilinear over what is left
            # (portrait-1, 2048 -> 640 px: 45 -> 23 ms on one EPYC core; mean pixel change 0.6 of 255)
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = small.resize(target, Image.Resampling.BILINEAR, reducing_gap=1.0)
        m = self.mtcnn
        with self._lock:
            boxes, points = detect_faces(
                np.asarray(small), m.pnet, m.rnet, m.onet, m.min_face_size, tuple(m.thresholds), m.factor
            )
        faces = [
            Face(Box(*(float(v) / scale for v in b[:4])), float(b[4]), np.asarray(pt, dtype=np.float64) / scale)
            for b, pt in zip(boxes, points, strict=True)
            if b[4] >= self.min_score
        ]
        return sorted(faces, key=lambda f: (f.box.x0, f.box.y0))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src -> dst (Umeyama 1991,
    scikit-image's ``SimilarityTransform``). Returns a 3x3 matrix acting on homogeneous column vectors."""
    from skimage.transform import SimilarityTransform  # imported on first use: keeps start-up light

    transform = SimilarityTransform.from_estimate(np.asarray(src, np.float64), np.asarray(dst, np.float64))
    if not transform:
        raise ValueError(f"no similarity transform fits these landmarks: {transform}")
    return np.asarray(transform.params, np.float64)


def _pixel_grid(h: int, w: int, offset: tuple[float, float] = (0.0, 0.0), step: float = 1.0) -> torch.Tensor:
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * step - 0.5 + offset[1]
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * step - 0.5 + offset[0]
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def _read_range(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Pixel indices ``[a, b)`` of an axis of ``n`` pixels that bilinear sampling at coordinates in
    ``[lo, hi]`` reads, borders reflected (``grid_sample``'s reflection about -0.5 and n - 0.5). Where a
    sample lies outside the photo the range reaches that border, so reflecting about the range's edge
    is reflecting about the photo's; beyond one reflection the whole axis is read."""
    if lo < -n - 0.5 or hi > 2 * n - 0.5:
        return 0, n
    a, b = max(lo, -0.5), min(hi, n - 0.5)
    if lo < -0.5:
        b = max(b, -1.0 - lo)
    if hi > n - 0.5:
        a = min(a, 2.0 * n - 1.0 - hi)
    return max(math.floor(a) - 1, 0), min(math.ceil(b) + 2, n)


@dataclass
class Alignment:
    """A face's crop: ``matrix`` maps photo pixels to crop pixels (size ``size``)."""

    matrix: np.ndarray
    size: int

    @property
    def inverse(self) -> np.ndarray:
        return np.linalg.inv(self.matrix)

    @property
    def photo_scale(self) -> float:
        """Photo pixels per crop pixel."""
        return 1.0 / math.sqrt(abs(np.linalg.det(self.matrix[:2, :2])))


def align_face(
    photo: np.ndarray, landmarks: np.ndarray, template: list[list[float]], size: int
) -> tuple[torch.Tensor, Alignment]:
    """Warp the face to the template at ``size``: (1, 3, size, size) float in [-1, 1], and its alignment.

    The photo is sampled at up to 8x the crop resolution and area-averaged down, so a large face is
    anti-aliased the way the training crops were downscaled.
    """
    dst = np.asarray(template, np.float64) * size
    m = similarity_transform(landmarks, dst)
    alignment = Alignment(m, size)
    factor = int(min(8, max(1, math.ceil(alignment.photo_scale))))
    # The crop's corners bound the photo pixels its samples read (the warp is affine); only those are
    # converted to float, and the sampling grid comes from one float32 :func:`affine_grid` over them.
    corners = np.array([[-0.5, -0.5, 1], [size - 0.5, -0.5, 1], [-0.5, size - 0.5, 1], [size - 0.5, size - 0.5, 1]]).T
    xs, ys = (alignment.inverse @ corners)[:2]
    x0, x1 = _read_range(float(xs.min()), float(xs.max()), photo.shape[1])
    y0, y1 = _read_range(float(ys.min()), float(ys.max()), photo.shape[0])
    region = np.ascontiguousarray(photo[y0:y1, x0:x1])
    img = torch.from_numpy(region).permute(2, 0, 1).unsqueeze(0).float()
    h, w = y1 - y0, x1 - x0
    norm_to_crop = np.array([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]])
    region_to_norm = np.array([[2 / w, 0, (0.5 - x0) * 2 / w - 1], [0, 2 / h, (0.5 - y0) * 2 / h - 1], [0, 0, 1]])
    theta = torch.from_numpy((region_to_norm @ alignment.inverse @ norm_to_crop)[:2]).float().unsqueeze(0)
    grid = affine_grid(theta, size * factor, size * factor)
    crop = grid_sample_rows(img, grid, "reflection")
    if factor > 1:
        crop = F.avg_pool2d(crop, factor)
    return (crop / 127.5 - 1.0).clamp(-1, 1), alignment


def feather_window(coords: torch.Tensor, size: int, margin: float = 0.08) -> torch.Tensor:
    """1 inside the crop, falling smoothly to 0 over ``margin * size`` at its border (h, w)."""
    ramp = max(margin * size, 1.0)
    d = torch.minimum(coords + 0.5, size - 0.5 - coords).clamp(min=0) / ramp
    d = d.clamp(max=1.0)
    s = d * d * (3 - 2 * d)  # smoothstep
    return s[..., 0] * s[..., 1]


@dataclass
class PasteRegion:
    box: Box  # integer photo pixels
    delta: torch.Tensor  # (3, h, w) change in uint8 units, already feathered
    mask: torch.Tensor  # (h, w) in [0, 1], feathered


def crop_footprint(alignment: Alignment, photo_shape: tuple[int, ...], crop_box: Box | None = None) -> Box:
    """The photo pixels a pasted crop can touch (clipped to the photo).

    ``crop_box`` (in crop pixels) limits it to a part of the crop; the whole crop by default.
    """
    h, w = photo_shape[:2]
    s = alignment.size
    cx0, cy0, cx1, cy1 = crop_box if crop_box is not None else (0, 0, s, s)
    corners = np.array([[cx0, cy0, 1], [cx1, cy0, 1], [cx0, cy1, 1], [cx1, cy1, 1]], dtype=np.float64).T
    pts = (alignment.inverse @ corners)[:2]
    x0, y0 = max(math.floor(pts[0].min()) - 1, 0), max(math.floor(pts[1].min()) - 1, 0)
    x1, y1 = min(math.ceil(pts[0].max()) + 2, w), min(math.ceil(pts[1].max()) + 2, h)
    return Box(x0, y0, x1, y1)


def _active_crop_box(stacked: torch.Tensor) -> Box | None:
    """Crop-space box outside which pasting changes no photo pixel (None: nothing changes).

    ``stacked`` is (4, S, S): the change in uint8 units and the mask, both feathered. A photo pixel is
    a bilinear mix of 4 crop pixels, so where all of them change it by less than 0.5 it rounds back to
    itself, and where the mask is below 0.5/255 no tint reaches a visible level either.
    """
    active = (stacked[:3].abs().amax(0) >= 0.5) | (stacked[3] >= 0.5 / 255)
    rows, cols = active.any(1).nonzero(), active.any(0).nonzero()
    if len(rows) == 0:
        return None
    # pixel centres sit at integer coordinates: keep one pixel of neighbours on each side, within the crop
    s = stacked.shape[-1]
    x0, y0 = max(float(cols[0]) - 1.5, 0.0), max(float(rows[0]) - 1.5, 0.0)
    return Box(x0, y0, min(float(cols[-1]) + 2.5, float(s)), min(float(rows[-1]) + 2.5, float(s)))


def _region_theta(alignment: Alignment, x0: int, y0: int, w: int, h: int) -> torch.Tensor:
    """``affine_grid`` theta: normalised region coordinates -> normalised crop coordinates."""
    s = alignment.size
    region_to_photo = np.array([[w / 2, 0, x0 + w / 2 - 0.5], [0, h / 2, y0 + h / 2 - 0.5], [0, 0, 1]])
    crop_to_norm = np.array([[2 / s, 0, 1 / s - 1], [0, 2 / s, 1 / s - 1], [0, 0, 1]])
    theta = crop_to_norm @ alignment.matrix @ region_to_photo
    return torch.from_numpy(theta[:2]).float().unsqueeze(0)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, [1, C, h, w], align_corners=False)`` for one (1, 2, 3) float32 theta,
    built from two broadcast adds per coordinate instead of a (h*w, 3) x (3, 2) matrix product
    (a 1238 x 1237 grid: 78 -> 15 ms on one EPYC core, a one-off timing under load)."""
    t = theta[0].float()
    xs = torch.arange(w, dtype=torch.float32).mul_(2.0 / w).add_(1.0 / w - 1.0)
    ys = torch.arange(h, dtype=torch.float32).mul_(2.0 / h).add_(1.0 / h - 1.0)
    grid = torch.empty(1, h, w, 2)
    for k in range(2):
        torch.add((xs * t[k, 0]).unsqueeze(0), (ys * t[k, 1] + t[k, 2]).unsqueeze(1), out=grid[0, :, :, k])
    return grid


def grid_sample_rows(image: torch.Tensor, grid: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """``F.grid_sample(image, grid, "bilinear", padding_mode, align_corners=False)`` for one image
    (1, C, h, w) and one grid (1, H, W, 2), on all of torch's threads: the CPU kernel runs the entries of
    a batch in parallel but each entry on one thread, so the grid's rows are cut into one entry per thread
    (the image expanded, not copied). The same values; a 1638 x 2038 paste-back footprint took 16 ->
    10 ms on the 2-core EPYC with avx512-bf16 (one-off timing, freed memory retained: models/memory.py)."""
    rows, cols = grid.shape[1], grid.shape[2]
    parts = min(torch.get_num_threads(), rows // 64)
    if parts <= 1 or grid.shape[0] != 1 or image.shape[0] != 1:
        return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    step = -(-rows // parts)
    if rows != step * parts:  # every entry needs the same height: pad the last one's rows
        grid = F.pad(grid, (0, 0, 0, 0, 0, step * parts - rows))
    out = F.grid_sample(
        image.expand(parts, -1, -1, -1),
        grid.reshape(parts, step, cols, 2),
        mode="bilinear",
        padding_mode=padding_mode,
        align_corners=False,
    )
    return out.transpose(0, 1).reshape(1, image.shape[1], step * parts, cols)[:, :, :rows]


@dataclass
class PasteSource:
    """One face's change before it is sampled at the photo's pixels: ``stacked`` (4, S, S) is the
    feathered change (3 channels, uint8 units) and mask in crop space, ``box`` the photo pixels it can reach."""

    box: Box  # integer photo pixels
    stacked: torch.Tensor
    alignment: Alignment


def paste_source(
    photo_shape: tuple[int, ...],
    alignment: Alignment,
    delta: torch.Tensor,
    mask: torch.Tensor,
    restrict: bool = True,
) -> PasteSource | None:
    """A crop-space change (3, S, S in [-2, 2]) and mask (S, S), feathered towards the crop border, and the
    photo box they can alter — only the part where the change or the mask can alter a pixel
    (``restrict=False``: the crop's whole footprint). None when nothing would change."""
    s = alignment.size
    window = feather_window(_pixel_grid(s, s).float(), s)
    stacked = torch.cat([delta.float() * 127.5, mask.float().clamp(0, 1).unsqueeze(0)], 0) * window
    crop_box = _active_crop_box(stacked) if restrict else Box(0.0, 0.0, float(s), float(s))
    if crop_box is None:
        return None
    x0, y0, x1, y1 = crop_footprint(alignment, photo_shape, crop_box)
    if x1 <= x0 or y1 <= y0:
        return None
    return PasteSource(Box(x0, y0, x1, y1), stacked, alignment)


def sample_source(source: PasteSource) -> PasteRegion:
    """The source's change and mask at every photo pixel of its box (one ``affine_grid`` + ``grid_sample``:
    the warp is a similarity), so a large photo costs one pass over the box."""
    x0, y0, x1, y1 = (int(v) for v in source.box)
    grid = affine_grid(_region_theta(source.alignment, x0, y0, x1 - x0, y1 - y0), y1 - y0, x1 - x0)
    sampled = grid_sample_rows(source.stacked.unsqueeze(0), grid, "zeros")
    return PasteRegion(source.box, sampled[0, :3], sampled[0, 3])


def paste_region(
    photo_shape: tuple[int, ...],
    alignment: Alignment,
    delta: torch.Tensor,
    mask: torch.Tensor,
    restrict: bool = True,
) -> PasteRegion | None:
    """Bring a crop-space change (3, S, S in [-2, 2]) and mask (S, S) back to the photo's pixels:
    :func:`paste_source`, then :func:`sample_source`."""
    source = paste_source(photo_shape, alignment, delta, mask, restrict)
    return None if source is None else sample_source(source)


def regions_box(regions: Sequence[PasteRegion | PasteSource]) -> Box | None:
    """The smallest box holding every region (or source), or None."""
    if not regions:
        return None
    box = regions[0].box
    for r in regions[1:]:
        box = box.union(r.box)
    return box


def _compose_box(photo: np.ndarray, regions: list[PasteRegion], box: Box) -> tuple[torch.Tensor, torch.Tensor]:
    """The edited pixels of ``box`` (3, h, w float, rounded and clamped) and the regions' combined mask there."""
    bx0, by0, bx1, by1 = (int(v) for v in box)
    out = torch.from_numpy(np.ascontiguousarray(photo[by0:by1, bx0:bx1])).permute(2, 0, 1).float()
    box_mask = torch.zeros(by1 - by0, bx1 - bx0)
    for r in regions:
        x0, y0, x1, y1 = (int(v) for v in r.box)
        ys, xs = slice(y0 - by0, y1 - by0), slice(x0 - bx0, x1 - bx0)
        out[:, ys, xs] += r.delta
        torch.maximum(box_mask[ys, xs], r.mask, out=box_mask[ys, xs])
    return out.round_().clamp_(0, 255), box_mask


def _put(image: np.ndarray, box: Box, pixels: torch.Tensor) -> None:
    """Write (3, h, w) float pixels, already in [0, 255] and integral, into ``image`` at ``box``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    image[y0:y1, x0:x1] = pixels.to(torch.uint8).permute(1, 2, 0).numpy()


def compose_edited(photo: np.ndarray, regions: list[PasteRegion]) -> np.ndarray:
    """``compose``'s edited photo alone (the slider previews without an overlay): no photo-sized mask."""
    edited = photo.copy()
    box = regions_box(regions)
    if box is not None:
        _put(edited, box, _compose_box(photo, regions, box)[0])
    return edited


def compose(photo: np.ndarray, regions: list[PasteRegion]) -> tuple[np.ndarray, np.ndarray]:
    """Add each region's change to the photo; also return the combined mask (H, W) in [0, 1].

    Only the box holding the regions is computed; pixels that no region touches keep their exact values.
    """
    edited = photo.copy()
    mask = np.zeros(photo.shape[:2], np.float32)
    box = regions_box(regions)
    if box is None:
        return edited, mask
    pixels, box_mask = _compose_box(photo, regions, box)
    _put(edited, box, pixels)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = box_mask.numpy()
    return edited, mask


def compose_with_overlay(
    photo: np.ndarray, regions: list[PasteRegion], colour: tuple[int, int, int] = (255, 40, 90), alpha: float = 0.6
) -> tuple[np.ndarray, np.ndarray]:
    """``compose`` and ``tint_overlay`` of its result in one pass over the regions' box: the edited photo
    and the edited photo with the combined mask tinted over it (the same pixels as the two calls, without a
    photo-sized mask or a second conversion of the box)."""
    edited, overlay = photo.copy(), photo.copy()
    box = regions_box(regions)
    if box is None:
        return edited, overlay
    pixels, box_mask = _compose_box(photo, regions, box)
    _put(edited, box, pixels)
    weight = box_mask.mul_(alpha).clamp_(0, 1).unsqueeze(0).expand_as(pixels)
    tint = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand_as(pixels)
    _put(overlay, box, pixels.lerp_(tint, weight).round_())
    return edited, overlay


def compose_faces(
    photo: np.ndarray,
    sources: list[PasteSource],
    overlay: bool = True,
    colour: tuple[int, int, int] = (255, 40, 90),
    alpha: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """The photo with every face's change pasted back, and that photo with the combined mask tinted over
    it (``overlay=False``: the edited photo twice, no tint computed). One pass of the numba kernel once it
    is compiled (:mod:`server.paste_kernel`), else :func:`compose_with_overlay` / :func:`compose_edited`
    of the sampled regions; the two agree within one level."""
    if sources and paste_kernel.ready():
        edited = photo.copy()
        tinted = photo.copy() if overlay else None
        box = regions_box(sources)
        assert box is not None  # sources is not empty
        pad = paste_kernel.PAD_LO
        args = []
        for source in sources:
            padded = F.pad(source.stacked, (pad, paste_kernel.PAD_HI, pad, paste_kernel.PAD_HI)).numpy()
            matrix = source.alignment.matrix[:2].copy()
            matrix[:, 2] += pad  # photo pixels -> padded crop pixels
            args.append((padded, matrix, tuple(int(v) for v in source.box)))
        int_box = (int(box.x0), int(box.y0), int(box.x1), int(box.y1))
        paste_kernel.paste(photo, edited, tinted, int_box, args, colour, alpha)  # type: ignore[arg-type]
        return edited, edited if tinted is None else tinted
    regions = [sample_source(source) for source in sources]
    if overlay:
        return compose_with_overlay(photo, regions, colour, alpha)
    edited = compose_edited(photo, regions)
    return edited, edited


def tint_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int] = (255, 40, 90),
    alpha: float = 0.6,
    box: Box | None = None,
) -> np.ndarray:
    """The image with ``mask`` (H, W in [0, 1]) tinted over it.

    ``box`` (integer pixels), when given, must hold every nonzero mask pixel; only it is computed.
    """
    x0, y0, x1, y1 = (int(v) for v in box) if box is not None else (0, 0, image.shape[1], image.shape[0])
    out = image.copy()
    a = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1])).mul(alpha).clamp_(0, 1).unsqueeze(-1)
    part = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1])).float()
    # one fused pass; a mix of values in [0, 255] with a weight in [0, 1] needs no clamp
    tinted = part.lerp_(torch.tensor(colour, dtype=torch.float32).expand_as(part), a.expand_as(part))
    out[y0:y1, x0:x1] = tinted.round_().to(torch.uint8).numpy()
    return out
