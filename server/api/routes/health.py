from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server import paste_kernel
from server.api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: 200 while the process lives")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 when at least one model is loaded, else 503")
def readyz(state: StateDep) -> JSONResponse:
    reg = state.registry
    body = {
        "ready": bool(reg.generators),
        "loading": not state.loaded.is_set(),
        "models": {n: "loaded" for n in reg.generators} | {n: "failed" for n in reg.failed},
        "errors": reg.failed,
        "classifier": reg.classifier is not None,
        "default_model": reg.default,
        # the one-pass paste-back (server/paste_kernel.py), compiled in the background after start-up
        "paste_kernel": paste_kernel.ready(),
    }
    return JSONResponse(body, status_code=200 if reg.generators else 503)
