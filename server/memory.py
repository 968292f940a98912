"""glibc's allocator, tuned for a process that allocates photo-sized tensors again and again.

By default glibc serves every allocation above its mmap threshold (at most 32 MB, 128 KiB at first) with a
fresh ``mmap`` and returns it on free, so each photo-sized float tensor (a 2-megapixel photo in float
is 25-50 MB) is faulted in page by page on every request: on the 2-core EPYC, allocating and filling a
53 MB tensor took 12-22 ms and the paste-back's ``grid_sample`` of a 1638 x 2038 footprint 38 ms, of
which 22 ms were page faults (16 ms with the freed memory kept). Raising the mmap and trim thresholds keeps freed
memory in the heap for the next request: the process's resident size stays at its peak instead of
falling back between requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def retain_freed_memory(threshold_bytes: int) -> bool:
    """Serve allocations below ``threshold_bytes`` from the heap and keep up to that much freed memory
    there (glibc's ``mallopt``). False, and nothing changed, where the C library is not glibc or refuses."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("allocator tuning skipped: no glibc mallopt")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = min(int(threshold_bytes), 2**31 - 1)
    ok = bool(mallopt(M_MMAP_THRESHOLD, value)) and bool(mallopt(M_TRIM_THRESHOLD, value))
    log.info("allocator: freed memory up to %d MB kept for reuse (%s)", value >> 20, "ok" if ok else "refused")
    return ok
