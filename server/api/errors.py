"""The one place where the service's errors become HTTP status codes."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.errors import (
    ImageTooLargeError,
    InvalidRequestError,
    PhotoNotCachedError,
    ServiceError,
    UnavailableError,
    UnsupportedImageError,
)

#: Most specific first: the first class the error is an instance of gives its status.
STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (UnavailableError, 503),
    (PhotoNotCachedError, 404),
    (ImageTooLargeError, 413),
    (UnsupportedImageError, 415),
    (InvalidRequestError, 422),
)


def status_for(exc: ServiceError) -> int:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 422


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        status = status_for(exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, UnavailableError) else None
        return JSONResponse({"detail": exc.detail}, status_code=status, headers=headers)
