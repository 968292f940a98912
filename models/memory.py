"""glibc's allocator, tuned for processes that allocate large tensors again and again.

By default glibc serves every allocation above its mmap threshold (128 KiB at first, raised as blocks are
freed, at most 32 MB) with a fresh ``mmap`` and unmaps it on free, so each photo-sized float tensor (25-50 MB
for a 2-megapixel photo) and each large training activation is faulted in page by page again every time.
On the 2-core EPYC with avx512-bf16 (one-off timings, training paused): allocating and filling a 53 MB
tensor took 12-22 ms, 1 ms with freed memory kept; the paste-back's grid_sample over portrait-3's
1638 x 2038 footprint went 38 -> 16 ms; a
training step (``bench/train_step.py --steps 4``) went 15.0 -> 16.7 images/s for STGAN-cpu and 21.1 ->
25.1 for MU-GAN-cpu in bf16. Raising the mmap and trim thresholds keeps freed memory in the heap for the
next use: the resident size stays near its peak instead of falling back in between (the server's peak
did not change: bench/RESULTS.md, server memory). The server (``FACE_EDITOR_RETAIN_FREED_MB``), the
training CLI and the training bench call it.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def retain_freed_memory(threshold_bytes: int) -> bool:
    """Serve allocations below ``threshold_bytes`` from the heap and keep up to that much freed memory
    there (glibc's ``mallopt``). False, and nothing changed, where the C library is not glibc or refuses."""
    try:  # the process's own symbols: no library search (find_library runs ldconfig in a subprocess)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("allocator tuning skipped: no glibc mallopt")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = min(int(threshold_bytes), 2**31 - 1)
    ok = bool(mallopt(M_MMAP_THRESHOLD, value)) and bool(mallopt(M_TRIM_THRESHOLD, value))
    log.info("allocator: freed memory up to %d MB kept for reuse (%s)", value >> 20, "ok" if ok else "refused")
    return ok
