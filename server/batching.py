"""Micro-batching: concurrent decoder calls of one model merged into one forward pass.

A request hands its (encoded faces, condition) to the model's batcher and waits; a worker thread
takes what is queued, waits at most ``max_wait_ms`` for more (up to ``max_batch`` faces), runs one
decode and hands each caller its rows. A lone caller pays at most ``max_wait_ms``. It only has calls
to merge when several compute threads run edits at once (``compute_workers`` > 1, e.g. on a GPU).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from models.generators import Encoded

log = logging.getLogger(__name__)

DecodeFn = Callable[[Encoded, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class MicroBatcher:
    def __init__(self, decode: DecodeFn, max_batch: int = 8, max_wait_ms: float = 5.0, name: str = "") -> None:
        self._decode = decode
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._queue: queue.Queue[tuple[Encoded, torch.Tensor, Future] | None] = queue.Queue()
        self.batches = 0
        self.items = 0
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def __call__(self, encoded: Encoded, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fut: Future = Future()
        with self._lock:
            closed = self._closed
            if not closed:
                self._queue.put((encoded, cond, fut))
        if closed:  # a request still in flight on a model that was swapped out by a reload
            return self._decode(encoded, cond)
        return fut.result()

    def close(self) -> None:
        """Finish what is queued, then end the worker; later calls decode directly."""
        with self._lock:
            self._closed = True
            self._queue.put(None)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            rows = len(first[1])
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                try:
                    item = (
                        self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                        if self.max_wait
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
                rows += len(item[1])
            self._run(batch)

    def _run(self, batch: list[tuple[Encoded, torch.Tensor, Future]]) -> None:
        try:
            if len(batch) == 1:
                enc, cond, fut = batch[0]
                fut.set_result(self._decode(enc, cond))
            else:
                out, mask = self._decode(Encoded.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch]))
                start = 0
                for _, cond, fut in batch:
                    n = len(cond)
                    fut.set_result((out[start : start + n], mask[start : start + n]))
                    start += n
            self.batches += 1
            self.items += len(batch)
        except Exception as exc:  # hand the error to every waiting caller
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)

    def stats(self) -> dict[str, float]:
        return {"batches": self.batches, "requests": self.items, "mean_batch": self.items / max(self.batches, 1)}
