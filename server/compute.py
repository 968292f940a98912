"""The threads that run the service's torch work.

On a CPU, every OS thread that runs a parallel torch op gets its own OpenMP team. As soon as libgomp
manages more threads than there are cores, it stops spinning between parallel regions (throttled
spin count) and every small op pays a thread wake-up: measured on the 2-core dev machine, the STGAN
decoder took 18 ms from one thread and 28-31 ms from request threads of a thread pool. So all torch
work (model loading, detection, alignment, encoder, decoder, paste-back) runs on ``workers``
long-lived threads — one by default on CPU — and request threads only decode uploads and encode
responses (PIL, no OpenMP).

libgomp keeps a thread's team until that thread exits, so one parallel op on a long-lived pool thread
(the event loop's executor, the request threads) leaves a sleeping team behind for good, and from then on
every op of the compute thread runs throttled: the served STGAN's eager decode of a photo edit took 87-99 ms
in the server against 40 ms in a bare process (2-core EPYC, ``bench/photo_http.py``). Torch work that must
not wait for the compute thread (a hot reload's load) therefore runs on a thread of its own that ends with
it: :func:`run_in_own_thread`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def run_in_own_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` on a new thread and return its result (or raise its exception); the OpenMP team its
    torch ops create ends with the thread instead of throttling the compute thread's from then on."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=target, name="torch-load", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class ComputePool:
    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="torch-compute")
        self._local = threading.local()

    def _mark_and_run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        self._local.inside = True
        return fn(*args, **kwargs)

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on a compute thread and return its result (inline when already on one)."""
        if getattr(self._local, "inside", False):
            return fn(*args, **kwargs)
        return self._executor.submit(self._mark_and_run, fn, *args, **kwargs).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
