"""Admission control: how much edit work the service takes on at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from server.errors import BusyError


class QuietTimer:
    """Says whether ``idle()`` has held for ``quiet_s`` without a break, as seen by the calls to :meth:`quiet`:
    work that would slow edits down (a compile's check, building the demo page) waits for a quiet moment."""

    def __init__(self, idle: Callable[[], bool], quiet_s: float) -> None:
        self.idle, self.quiet_s = idle, quiet_s
        self._since: float | None = None

    def quiet(self) -> bool:
        now = time.monotonic()
        if not self.idle():
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self.quiet_s


class Admission:
    """Bounds the work in the service: ``max_running`` at once, ``max_waiting`` more queued.

    Past the bound a request is refused at once (:class:`~server.errors.BusyError`, with a retry delay)
    instead of letting memory and latency grow; a queued request that waits longer than ``timeout``
    is refused the same way.
    """

    def __init__(self, max_running: int, max_waiting: int, timeout: float) -> None:
        self._admitted = threading.BoundedSemaphore(max_running + max_waiting)
        self._running = threading.BoundedSemaphore(max_running)
        self.timeout = timeout
        self.max_running, self.max_waiting = max_running, max_waiting
        self.rejected = 0
        self.timed_out = 0
        self.in_flight = 0
        self.waiting = 0
        self._lock = threading.Lock()

    def idle(self) -> bool:
        """No edit running or waiting."""
        return self.in_flight + self.waiting == 0

    def __enter__(self) -> Admission:
        if not self._admitted.acquire(blocking=False):
            with self._lock:
                self.rejected += 1
            raise BusyError("the service is busy: too many edits queued, retry shortly", retry_after=1)
        with self._lock:
            self.waiting += 1
        running = self._running.acquire(timeout=self.timeout)
        with self._lock:
            self.waiting -= 1
            if running:
                self.in_flight += 1
            else:
                self.timed_out += 1
        if not running:
            self._admitted.release()
            raise BusyError(f"the edit waited more than {self.timeout:g} s in the queue", retry_after=2)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.in_flight -= 1
        self._running.release()
        self._admitted.release()

    def stats(self) -> dict[str, int]:
        return {
            "running_limit": self.max_running,
            "queue_limit": self.max_waiting,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
        }
