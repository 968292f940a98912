"""An ASGI app built on first use, in a worker thread: importing Gradio and building its Blocks takes
seconds, which would otherwise delay ``/healthz`` at start-up. The app's lifespan (Gradio's queue) is
entered when it is built and left when the parent app shuts down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import anyio


class LazyASGI:
    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._app: Any = None
        self._lock = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()

    async def ready(self) -> Any:
        if self._app is None:
            async with self._lock:
                if self._app is None:
                    app = await anyio.to_thread.run_sync(self._build)
                    await self._stack.enter_async_context(app.router.lifespan_context(app))
                    self._app = app
        return self._app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        app = await self.ready()
        await app(scope, receive, send)

    async def aclose(self) -> None:
        await self._stack.aclose()
