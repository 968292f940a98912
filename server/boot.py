"""``server.boot:app``: the ASGI entry point that answers ``/healthz`` before torch is imported.

Importing torch, FastAPI and the app takes 2-7 s on a 2-core machine (more under load), and uvicorn
serves nothing until its app module has been imported. This module imports only the standard library:
uvicorn binds the port at once, the real app (:mod:`server.app`) is imported in a thread and its
lifespan entered, and from then on every request goes to it. Meanwhile ``/healthz`` answers 200
(``"phase": "starting"``), ``/readyz`` and everything else 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

log = logging.getLogger(__name__)

#: How long libgomp's idle threads spin before they sleep, in spins (its default: 300,000). It is read
#: once, when torch loads libgomp, so it is set here, before the real app imports torch; a value in the
#: environment wins. Between a request's torch ops the threads still spin (the decoder and MTCNN keep
#: their speed), but after the last op of an edit they go to sleep before the paste-back kernel's and the
#: JPEG encoder's threads need the cores. Interleaved A/B on the 2-core EPYC (3 servers, portrait-1,
#: README call, 39 repeats and 8 cold requests each): default 104 ms repeat / 312 ms cold, 60,000: 94 / 304
#: (paste-back 26 -> 21 ms, JPEG answer 24 -> 21 ms), 20,000: 91 / 392 (MTCNN's ops wait for woken threads).
GOMP_SPINCOUNT = "60000"
os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def load_server_app() -> ASGIApp:
    """The real app, ``server.app:app`` (imports torch and builds the app; run in a thread)."""
    return importlib.import_module("server.app").app


class BootApp:
    """Serves liveness while ``loader`` builds the real ASGI app, then hands every request to it."""

    def __init__(self, loader: Callable[[], ASGIApp] = load_server_app) -> None:
        self._loader = loader
        self._app: ASGIApp | None = None
        self._error: str | None = None
        self._lifespan: AbstractAsyncContextManager[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """True once the real app is imported and its lifespan has started."""
        return self._app is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._run_lifespan(receive, send)
        elif self._app is not None:
            await self._app(scope, receive, send)
        elif scope["type"] == "http":
            await self._starting_response(scope, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later

    async def _start(self) -> None:
        try:
            app = await asyncio.to_thread(self._loader)
            router = getattr(app, "router", None)
            if router is not None and hasattr(router, "lifespan_context"):
                self._lifespan = router.lifespan_context(app)
                await self._lifespan.__aenter__()
            self._app = app
            log.info("app loaded: serving every route")
        except Exception as exc:  # the process stays up and says why on /healthz
            log.exception("the app failed to load")
            self._error = f"{type(exc).__name__}: {exc}"

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._task = asyncio.get_running_loop().create_task(self._start())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._task is not None:
                    await self._task  # a load in progress finishes (a thread cannot be cancelled)
                if self._lifespan is not None:
                    await self._lifespan.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _starting_response(self, scope: Scope, send: Send) -> None:
        path = scope.get("path", "")
        if self._error is not None:
            status, body = 500, {"status": "error", "detail": f"the app failed to load: {self._error}"}
        elif path == "/healthz":
            status, body = 200, {"status": "ok", "phase": "starting"}
        elif path == "/readyz":
            status, body = 503, {"ready": False, "loading": True, "phase": "starting"}
        else:
            status, body = 503, {"detail": "the server is starting; retry shortly"}
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 503:
            headers.append((b"retry-after", b"2"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


app = BootApp()
