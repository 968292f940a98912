"""Paste-back in one pass over the photo: a numba kernel that samples each face's change, adds it to the
photo and tints the overlay, pixel by pixel in the photo's own (H, W, 3) uint8 layout.

The eager path (:func:`server.faces.paste_region` then :func:`server.faces.compose_with_overlay`) makes
about ten passes over the pasted box: a ``grid_sample`` into (4, h, w) floats, then conversions between the
photo's interleaved uint8 and planar float and back, twice. On the 2-core EPYC, for portrait-1's 1069 x 1226
box: the eager path 36-40 ms in a bare process, this kernel 11 ms on two threads; the server's ``compose`` stage
went 45 -> 27 ms (``bench/photo_http.py``). The compose loop over flat interleaved rows is vectorised by numba;
the sampling loop is scalar (LLVM does not use AVX2 gathers for it here), and writing its four channels to planar
row buffers with unit strides made the kernel 14.6 -> 10.9 ms (interleaved A/B, 30 of 30 rounds faster).
The kernel is compiled by numba on first use (seconds; 0.7 s from its disk cache), in the background after
start-up (:func:`warm_up`); until then, or where numba is missing, the eager path serves.

The results equal the eager path's within one level of 255 (float32 arithmetic in another order, and
halves rounded up rather than to even); pixels that no face's change reaches keep their exact values.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Zero pixels around each face's change: one before, two after, so clamped coordinates read zeros.
PAD_LO, PAD_HI = 1, 2

_ready = threading.Event()
_lock = threading.Lock()


def _define_kernel(cache: bool = True) -> Callable[..., None]:
    from numba import njit

    @njit(nogil=True, fastmath=True, boundscheck=False, cache=cache)
    def paste_rows(photo, edited, overlay, box, srcs, mats, rboxes, colour, alpha, with_overlay, row0, row1):  # type: ignore[no-untyped-def]
        """Rows ``row0:row1`` of the box ``box`` (x0, y0, x1, y1): ``edited = round(photo + sum of the
        changes)``, ``overlay = round(lerp(edited, colour, clamp(alpha * max of the masks, 0, 1)))``.
        ``srcs`` (n, 4, S + 3, S + 3) holds each face's feathered change (3 channels, uint8 units) and mask,
        zero-padded; ``mats`` (n, 2, 3) maps photo pixels to padded crop pixels; ``rboxes`` (n, 4) is where
        each face may change the photo."""
        n, sp = srcs.shape[0], srcs.shape[2]
        flat = srcs.reshape(n, 4, sp * sp)  # flat indices: one multiply-add per tap
        bx0, bx1 = box[0], box[2]
        width = bx1 - bx0
        hi = np.float32(sp - 2)
        zero, one, half, top = np.float32(0.0), np.float32(1.0), np.float32(0.5), np.float32(255.0)
        al = np.float32(alpha)
        # per row: the faces' summed change (d0, d1, d2) and largest mask (d3), planar, which the sampling
        # loop writes with unit strides; then interleaved like the photo's row (delta, weight), so that the
        # compose loop runs over flat rows (vectorised)
        planes = np.zeros((4, width), np.float32)
        d0, d1, d2, d3 = planes[0], planes[1], planes[2], planes[3]
        delta = np.zeros(width * 3, np.float32)
        weight = np.zeros(width * 3, np.float32)
        tint = np.empty(width * 3, np.float32)
        for i in range(width):
            tint[3 * i], tint[3 * i + 1], tint[3 * i + 2] = colour[0], colour[1], colour[2]
        for y in range(row0, row1):
            planes[:] = 0.0
            for k in range(n):
                if y < rboxes[k, 1] or y >= rboxes[k, 3]:
                    continue
                rx0, rx1 = rboxes[k, 0], rboxes[k, 2]
                du, dv = np.float32(mats[k, 0, 0]), np.float32(mats[k, 1, 0])
                ub = np.float32(mats[k, 0, 0] * rx0 + mats[k, 0, 1] * y + mats[k, 0, 2])
                vb = np.float32(mats[k, 1, 0] * rx0 + mats[k, 1, 1] * y + mats[k, 1, 2])
                s0, s1, s2, s3 = flat[k, 0], flat[k, 1], flat[k, 2], flat[k, 3]
                off = rx0 - bx0
                for j in range(rx1 - rx0):
                    u = min(max(ub + du * np.float32(j), zero), hi)
                    v = min(max(vb + dv * np.float32(j), zero), hi)
                    xi, yi = np.int32(u), np.int32(v)
                    ax, ay = u - np.float32(xi), v - np.float32(yi)
                    t = yi * sp + xi
                    w00, w01 = (one - ay) * (one - ax), (one - ay) * ax
                    w10, w11 = ay * (one - ax), ay * ax
                    i = off + j
                    d0[i] += w00 * s0[t] + w01 * s0[t + 1] + w10 * s0[t + sp] + w11 * s0[t + sp + 1]
                    d1[i] += w00 * s1[t] + w01 * s1[t + 1] + w10 * s1[t + sp] + w11 * s1[t + sp + 1]
                    d2[i] += w00 * s2[t] + w01 * s2[t + 1] + w10 * s2[t + sp] + w11 * s2[t + sp + 1]
                    m = w00 * s3[t] + w01 * s3[t + 1] + w10 * s3[t + sp] + w11 * s3[t + sp + 1]
                    d3[i] = max(d3[i], m)
            for i in range(width):
                m = min(max(d3[i] * al, zero), one)  # the tint's weight
                delta[3 * i], delta[3 * i + 1], delta[3 * i + 2] = d0[i], d1[i], d2[i]
                weight[3 * i], weight[3 * i + 1], weight[3 * i + 2] = m, m, m
            src_row = photo[y, bx0:bx1].reshape(width * 3)
            out_row = edited[y, bx0:bx1].reshape(width * 3)
            tinted_row = overlay[y, bx0:bx1].reshape(width * 3)
            for t in range(width * 3):
                e = np.float32(np.int32(min(max(np.float32(src_row[t]) + delta[t] + half, zero), top)))
                out_row[t] = np.uint8(e)
                if with_overlay:
                    tinted_row[t] = np.uint8(np.int32(e + (tint[t] - e) * weight[t] + half))

    return paste_rows


@functools.cache
def _kernel() -> Callable[..., None] | None:
    try:
        return _define_kernel()
    except ImportError:
        log.info("numba is not installed: the paste-back runs eagerly in torch")
        return None
    except RuntimeError as exc:  # no writable cache folder (NUMBA_CACHE_DIR): compile on every start
        log.info("numba cannot cache the paste kernel (%s): compiled without a cache", exc)
        return _define_kernel(cache=False)


@functools.cache
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_parts(), thread_name_prefix="paste")


def _parts() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8))


def ready() -> bool:
    """True once the kernel is compiled (by :func:`warm_up`); False where numba is missing."""
    return _ready.is_set()


def warm_up() -> bool:
    """Compile the kernel (numba's disk cache makes later starts fast) and check it on a tiny paste."""
    with _lock:
        if _ready.is_set():
            return True
        kernel = _kernel()
        if kernel is None:
            return False
        t0 = time.perf_counter()
        photo = np.full((6, 6, 3), 100, np.uint8)
        edited, overlay = photo.copy(), photo.copy()
        srcs = np.zeros((1, 4, 2 + PAD_LO + PAD_HI, 2 + PAD_LO + PAD_HI), np.float32)
        srcs[0, :, PAD_LO : PAD_LO + 2, PAD_LO : PAD_LO + 2] = 10.0
        mats = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        box = np.array([0, 0, 6, 6], np.int64)
        try:
            kernel(photo, edited, overlay, box, srcs, mats, box[None], np.array([255.0, 40.0, 90.0]), 0.6, True, 0, 6)
        except Exception:  # a numba that cannot compile it: the eager paste-back keeps serving
            log.exception("the paste kernel did not compile: the paste-back stays eager")
            return False
        if int(edited[PAD_LO, PAD_LO, 0]) != 110 or int(edited[5, 5, 0]) != 100:
            log.warning("the paste kernel disagrees with its check: the paste-back stays eager")
            return False
        _ready.set()
        log.info("paste kernel compiled in %.1f s", time.perf_counter() - t0)
        return True


def warm_up_in_background() -> threading.Thread:
    thread = threading.Thread(target=warm_up, name="paste-kernel-compile", daemon=True)
    thread.start()
    return thread


def paste(
    photo: np.ndarray,
    edited: np.ndarray,
    overlay: np.ndarray | None,
    box: tuple[int, int, int, int],
    sources: list[tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]],
    colour: tuple[int, int, int],
    alpha: float,
) -> None:
    """Write the pasted ``box`` of ``edited`` (and of ``overlay`` unless None) from ``photo`` and the
    faces' ``sources`` (padded change and mask (4, S + 3, S + 3), photo -> padded crop matrix (2, 3), box),
    its rows split over the cores. Only call once :func:`ready`."""
    kernel = _kernel()
    if kernel is None or not ready():
        raise RuntimeError("the paste kernel is not compiled")
    srcs = np.ascontiguousarray(np.stack([s for s, _, _ in sources]), np.float32)
    mats = np.ascontiguousarray(np.stack([m for _, m, _ in sources]), np.float64)
    rboxes = np.array([b for _, _, b in sources], np.int64)
    box_arr = np.array(box, np.int64)
    args: tuple[Any, ...] = (
        photo,
        edited,
        edited if overlay is None else overlay,
        box_arr,
        srcs,
        mats,
        rboxes,
        np.asarray(colour, np.float64),
        float(alpha),
        overlay is not None,
    )
    y0, y1 = box[1], box[3]
    parts = min(_parts(), max(1, (y1 - y0) // 32))
    if parts == 1:
        kernel(*args, y0, y1)
        return
    cuts = [y0 + (y1 - y0) * p // parts for p in range(parts + 1)]
    futures = [_threads().submit(kernel, *args, a, b) for a, b in itertools.pairwise(cuts)]
    for future in futures:
        future.result()
