"""The ASGI app: ``server.app:app`` (or :func:`create_app` with explicit settings)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from frontend.lazy import LazyASGI
from server.admission import QuietTimer
from server.api.errors import install_error_handlers
from server.api.routes import edit, health, models
from server.config import Settings, get_settings
from server.state import create_state

log = logging.getLogger(__name__)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


class UploadLimit:
    """413 before the body is read when ``Content-Length`` says the upload is over ``max_bytes``.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) would pass
    every response body through a memory stream, megabytes for an edited photo in JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            # multipart overhead on top of the file itself is small; allow 64 KiB for it
            if length.isdigit() and int(length) > self.max_bytes + 65536:
                detail = f"upload larger than {self.max_bytes} bytes"
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def wait_quiet(idle: Callable[[], bool], quiet_s: float = 2.0, poll_s: float = 0.2) -> None:
    """Return once ``idle()`` has held for ``quiet_s`` without a break."""
    timer = QuietTimer(idle, quiet_s)
    while not timer.quiet():
        await asyncio.sleep(poll_s)


def create_app(settings: Settings | None = None, load_models: bool = True) -> FastAPI:
    settings = settings or get_settings()
    state = create_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The models load in the background: /healthz answers at once, /readyz says 503 until a model
        # is loaded, and edits that arrive meanwhile wait for the load (server/api/deps.py).
        loading = None
        warm_gradio = None
        if load_models:
            loading = asyncio.get_running_loop().run_in_executor(None, state.start_up)

            async def build_gradio_when_loaded() -> None:
                await loading  # the models first: /readyz matters more than the demo page
                # then a quiet moment: importing Gradio holds the GIL for seconds, and the first edits after a
                # start waited for it (py-spy, 2-core EPYC: the README call 1.3-2.7 s 2 s after /readyz)
                await wait_quiet(state.service.admission.idle)
                await app.state.gradio.ready()

            warm_gradio = asyncio.get_running_loop().create_task(build_gradio_when_loaded())
        else:
            state.loaded.set()
        yield
        if loading is not None:
            await loading
        if warm_gradio is not None:
            if not app.state.gradio.building:  # still waiting for a quiet moment: not needed any more
                warm_gradio.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warm_gradio
        await app.state.gradio.aclose()

    app = FastAPI(
        title="Face attribute editor",
        version="0.1.0",
        description=(
            "Detects and aligns the faces in a photo, edits chosen attributes with STGAN / MU-GAN models "
            "trained by this project, pastes the edit back into the photo and shows where the model changed "
            "the face. Trained weights: non-commercial research use only (CelebA / CelebA-HQ)."
        ),
        lifespan=lifespan,
    )
    app.state.face_editor = state

    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)

    install_error_handlers(app)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(edit.router)
    try:
        from frontend.page import mount_frontend
    except ImportError:  # pragma: no cover - the frontend is part of the package
        pass
    else:
        mount_frontend(app)

    # The Gradio demo at /gradio (frontend/gradio_app.py) on the same in-process edit service. Gradio
    # is imported and its page built on first use (or right after start-up, in the background), so it
    # does not delay /healthz.
    def build_gradio() -> FastAPI:
        from frontend.gradio_app import build_app

        return build_app(
            state.service,
            settings.weights_dir,
            state.registry.default or settings.default_model,  # the served default once the models loaded
            lambda: state.loaded.wait(settings.startup_wait_s),
        )

    gradio = LazyASGI(build_gradio)
    app.state.gradio = gradio
    app.mount("/gradio", gradio)
    return app


def __getattr__(name: str) -> FastAPI:
    # ``server.app:app`` is built on first access so that importing this module stays cheap.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
