"""An ASGI app built on first use, in a worker thread: importing Gradio and building its Blocks takes
seconds, which would otherwise delay ``/healthz`` at start-up. The app's lifespan (Gradio's queue) is
entered when it is built and left when the parent app shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import anyio

#: Gradio keeps the Blocks being built in process-global state (``gradio.context.Context``), so two
#: builds in two threads at once (two apps in one process: tests, or a build on first use racing the
#: warm-up of another app) corrupt each other ("Cannot call release outside of a gradio.Blocks
#: context"). Builds are therefore serialised process-wide.
_BUILD_LOCK = threading.Lock()


class LazyASGI:
    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._app: Any = None
        self._lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    @property
    def building(self) -> bool:
        """Whether the build has started (it may still be running)."""
        return self._app is not None or self._lock.locked()

    async def ready(self) -> Any:
        if self._app is None:
            async with self._lock:
                if self._app is None:
                    app = await anyio.to_thread.run_sync(self._locked_build)
                    await self._stack.enter_async_context(app.router.lifespan_context(app))
                    self._app = app
        return self._app

    def _locked_build(self) -> Any:
        with _BUILD_LOCK:
            return self._build()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        app = await self.ready()
        await app(scope, receive, send)

    async def aclose(self) -> None:
        await self._stack.aclose()
