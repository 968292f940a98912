"""Paste-back: the crop-to-photo warp lands where the alignment says, and restricting the work to the
part of the crop that changes anything gives exactly the same photo and overlay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.faces import (
    Alignment,
    compose,
    compose_edited,
    compose_with_overlay,
    paste_region,
    similarity_transform,
    tint_overlay,
)

SIZE = 64


def _alignment() -> Alignment:
    # a rotated, scaled face: crop landmarks of a template mapped from photo points
    src = np.array([[310.0, 220.0], [400.0, 250.0], [345.0, 300.0], [300.0, 340.0], [380.0, 365.0]])
    dst = np.array([[0.38, 0.48], [0.63, 0.48], [0.50, 0.63], [0.39, 0.74], [0.61, 0.74]]) * SIZE
    return Alignment(similarity_transform(src, dst), SIZE)


def _photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(600, 700, 3), dtype=np.uint8)


def test_pasted_change_lands_at_the_aligned_position() -> None:
    alignment = _alignment()
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    delta = torch.stack([xx / SIZE, yy / SIZE, torch.zeros_like(xx)]) * 0.5  # a ramp in crop space
    region = paste_region((600, 700, 3), alignment, delta, torch.ones(SIZE, SIZE))
    assert region is not None
    for cx, cy in ((32.0, 32.0), (25.0, 40.0), (40.0, 20.0)):  # well inside the feathered border
        px, py, _ = np.linalg.inv(alignment.matrix) @ np.array([cx, cy, 1.0])
        ix, iy = round(px), round(py)
        # the crop position of the photo pixel actually sampled
        qx, qy, _ = alignment.matrix @ np.array([ix, iy, 1.0])
        got = region.delta[:, iy - int(region.box.y0), ix - int(region.box.x0)]
        want = torch.tensor([qx / SIZE, qy / SIZE, 0.0]) * 0.5 * 127.5
        torch.testing.assert_close(got, want.float(), atol=0.05, rtol=0)


def test_restricting_to_the_changed_part_gives_the_same_photo_and_overlay() -> None:
    alignment, photo = _alignment(), _photo()
    delta = torch.zeros(3, SIZE, SIZE)
    delta[:, 20:30, 35:45] = 0.3  # a localised edit (glasses-sized)
    mask = torch.zeros(SIZE, SIZE)
    mask[18:32, 33:47] = 0.8
    mask[40, 10] = 0.001  # below what any tint can show
    full = paste_region(photo.shape, alignment, delta, mask, restrict=False)
    part = paste_region(photo.shape, alignment, delta, mask)
    assert full is not None and part is not None
    assert part.box.area < 0.25 * full.box.area
    image_full, mask_full = compose(photo, [full])
    image_part, mask_part = compose(photo, [part])
    # equal up to float32 rounding of the sampling grid (a pixel exactly at .5 may round either way)
    diff = np.abs(image_part.astype(int) - image_full.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4
    assert (image_part != photo).any()
    tinted = np.abs(tint_overlay(image_part, mask_part).astype(int) - tint_overlay(image_full, mask_full).astype(int))
    assert tinted.max() <= 1 and (tinted > 0).mean() < 1e-4


def test_nothing_to_paste_when_nothing_changes() -> None:
    assert paste_region((600, 700, 3), _alignment(), torch.zeros(3, SIZE, SIZE), torch.zeros(SIZE, SIZE)) is None


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The closed form the server used before it called scikit-image (Umeyama 1991), as a reference."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d_c.T @ s_c / len(src))
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1, 1] = -1
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d) / ((s_c**2).sum() / len(src)))
    m = np.eye(3)
    m[:2, :2] = scale * rot
    m[:2, 2] = mu_d - scale * rot @ mu_s
    return m


def test_similarity_transform_is_exact_on_a_similarity_and_matches_the_closed_form_on_noisy_landmarks() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, (5, 2))
    angle, scale, shift = 0.3, 0.4, np.array([12.0, -7.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:2, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:2, 2], shift, atol=1e-7)
    noisy = dst + rng.normal(0, 3, dst.shape)
    np.testing.assert_allclose(similarity_transform(src, noisy), _umeyama(src, noisy), atol=1e-9)


@pytest.mark.parametrize(
    "landmarks_at",
    [(0.5, 0.5, 0.12), (0.06, 0.5, 0.12), (0.97, 0.05, 0.2), (0.5, 0.9, 0.45), (-0.08, 0.5, 0.2)],
    ids=["inside", "left-edge", "corner", "larger-than-photo", "mostly-outside"],
)
def test_align_reads_only_the_pixels_it_needs_and_gives_the_whole_photo_result(
    landmarks_at: tuple[float, float, float],
) -> None:
    """align_face converts only the region its samples read; the crop equals sampling the whole photo,
    borders reflected the same way, for faces inside the photo, at its edges and larger than it."""
    from server.faces import DEFAULT_TEMPLATE, _pixel_grid, align_face

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    cx, cy, scale = landmarks_at
    tpl = np.asarray(DEFAULT_TEMPLATE)
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ((tpl - 0.5) @ rot.T) * scale * 400 + [cx * 400, cy * 300]
    crop, alignment = align_face(photo, landmarks, DEFAULT_TEMPLATE, 64)

    factor = int(min(8, max(1, np.ceil(alignment.photo_scale))))
    # the reference: every sample's photo coordinate in float64, the whole photo sampled
    inv = torch.from_numpy(np.linalg.inv(alignment.matrix))
    coords = _pixel_grid(64 * factor, 64 * factor, step=1.0 / factor) @ inv[:2, :2].T + inv[:2, 2]
    h, w = photo.shape[:2]
    grid = torch.stack([(coords[..., 0] + 0.5) / w * 2 - 1, (coords[..., 1] + 0.5) / h * 2 - 1], -1).float()
    image = torch.from_numpy(photo).permute(2, 0, 1).unsqueeze(0).float()
    whole = torch.nn.functional.grid_sample(image, grid[None], padding_mode="reflection", align_corners=False)
    if factor > 1:
        whole = torch.nn.functional.avg_pool2d(whole, factor)
    expected = (whole / 127.5 - 1.0).clamp(-1, 1)
    torch.testing.assert_close(crop, expected, atol=1e-3, rtol=0)  # float32 grid vs float64 coordinates


@pytest.mark.parametrize("h, w", [(1, 1), (7, 13), (128, 96)])
def test_affine_grid_equals_torchs(h: int, w: int) -> None:
    from server.faces import affine_grid

    g = torch.Generator().manual_seed(h * w)
    theta = torch.randn(1, 2, 3, generator=g)
    expected = torch.nn.functional.affine_grid(theta, [1, 4, h, w], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, h, w), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows, threads", [(64, 2), (128, 2), (129, 2), (301, 3), (200, 1)])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflection"])
def test_grid_sample_by_rows_equals_one_grid_sample(rows: int, threads: int, padding_mode: str) -> None:
    from server.faces import affine_grid, grid_sample_rows

    g = torch.Generator().manual_seed(rows)
    image = torch.randn(1, 4, 40, 50, generator=g)
    grid = affine_grid(torch.tensor([[[0.9, 0.3, 0.1], [-0.3, 0.9, -0.2]]]), rows, 37)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = grid_sample_rows(image, grid, padding_mode)
    finally:
        torch.set_num_threads(before)
    expected = torch.nn.functional.grid_sample(image, grid, padding_mode=padding_mode, align_corners=False)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_retaining_freed_memory_is_accepted_by_glibc() -> None:
    import platform

    from models.memory import retain_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert retain_freed_memory(256 << 20)


def test_compose_with_overlay_equals_compose_then_tint() -> None:
    """The one-pass paste + tint gives the pixels of ``compose`` followed by ``tint_overlay``, with two
    overlapping faces (the combined mask is their maximum) and nothing outside their box touched."""
    photo = _photo()
    a1 = _alignment()
    shifted = a1.matrix @ np.array([[1.0, 0, -60], [0, 1, -40], [0, 0, 1]])  # the same face 60 px right, 40 down
    a2 = Alignment(shifted, SIZE)
    rng = torch.Generator().manual_seed(0)
    regions = []
    for alignment in (a1, a2):
        delta = torch.rand(3, SIZE, SIZE, generator=rng) * 0.6 - 0.3
        mask = torch.rand(SIZE, SIZE, generator=rng)
        region = paste_region(photo.shape, alignment, delta, mask)
        assert region is not None
        regions.append(region)
    assert regions[0].box.union(regions[1].box).area < regions[0].box.area + regions[1].box.area  # they overlap
    image, mask = compose(photo, regions)
    edited, overlay = compose_with_overlay(photo, regions, colour=(10, 200, 30), alpha=0.7)
    np.testing.assert_array_equal(edited, image)
    np.testing.assert_array_equal(compose_edited(photo, regions), image)
    np.testing.assert_array_equal(overlay, tint_overlay(image, mask, colour=(10, 200, 30), alpha=0.7))
    assert (overlay != edited).any() and (edited != photo).any()
    empty_edit, empty_overlay = compose_with_overlay(photo, [])
    np.testing.assert_array_equal(empty_edit, photo)
    np.testing.assert_array_equal(empty_overlay, photo)


def _two_overlapping_faces(photo: np.ndarray, magnification: float = 1.0) -> list:
    from server.faces import paste_source

    a1 = _alignment()
    a1 = Alignment(a1.matrix @ np.diag([magnification, magnification, 1.0]), SIZE)  # larger in the photo
    shifted = a1.matrix @ np.array([[1.0, 0, -60], [0, 1, -40], [0, 0, 1]])
    rng = torch.Generator().manual_seed(1)
    sources = []
    for alignment in (a1, Alignment(shifted, SIZE)):
        delta = torch.rand(3, SIZE, SIZE, generator=rng) * 0.6 - 0.3
        delta[:, :4] = 1.5  # strong changes at the crop's border: the feathering and zero padding matter
        mask = torch.rand(SIZE, SIZE, generator=rng)
        source = paste_source(photo.shape, alignment, delta, mask)
        assert source is not None
        sources.append(source)
    return sources


@pytest.mark.parametrize("magnification", [1.0, 0.3])  # a 64-px crop on ~200 and ~700 photo pixels
def test_the_paste_kernel_gives_the_eager_paste_back(magnification: float) -> None:
    """The numba kernel (server/paste_kernel.py) against sampling each face with grid_sample and composing
    in torch: two overlapping faces, with and without the overlay, at most one level apart (float32 sums in
    another order, halves rounded up), and every pixel outside the faces' boxes untouched."""
    pytest.importorskip("numba")
    from server import paste_kernel
    from server.faces import compose_faces, sample_source

    assert paste_kernel.warm_up() and paste_kernel.ready()
    photo = np.random.default_rng(2).integers(0, 256, size=(900, 1000, 3), dtype=np.uint8)
    sources = _two_overlapping_faces(photo, magnification)
    regions = [sample_source(s) for s in sources]
    want_edited, want_overlay = compose_with_overlay(photo, regions, colour=(10, 200, 30), alpha=0.7)
    edited, overlay = compose_faces(photo, sources, overlay=True, colour=(10, 200, 30), alpha=0.7)
    for got, want in ((edited, want_edited), (overlay, want_overlay)):
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.002
    assert (overlay != edited).any() and (edited != photo).any()
    box = sources[0].box.union(sources[1].box)
    outside = np.ones(photo.shape[:2], bool)
    outside[int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)] = False
    np.testing.assert_array_equal(edited[outside], photo[outside])
    np.testing.assert_array_equal(overlay[outside], photo[outside])
    edited_only, same = compose_faces(photo, sources, overlay=False)
    assert same is edited_only
    np.testing.assert_array_equal(edited_only, edited)
    empty_edit, empty_overlay = compose_faces(photo, [])
    np.testing.assert_array_equal(empty_edit, photo)
    np.testing.assert_array_equal(empty_overlay, photo)
