from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException

from server.api.deps import LoadedStateDep

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", summary="Served models: attributes, image size, mask, default, evaluation metrics")
def list_models(state: LoadedStateDep) -> dict[str, Any]:
    reg = state.registry
    return {
        "default": reg.default,
        "models": reg.describe(),
        "classifier": None
        if reg.classifier is None
        else {
            "attributes": list(reg.classifier.info.attributes),
            "metrics": reg.classifier.info.metrics.get("val_mean_accuracy"),
        },
        "cache": state.service.cache.stats(),
        "queue": state.service.admission.stats(),
    }


@router.post("/models/reload", summary="Reload weights/ and swap models atomically (admin token required)")
def reload_models(state: LoadedStateDep, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    token = state.settings.admin_token
    if not token:
        raise HTTPException(404, "reload is disabled: no admin token is configured")
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong admin token")
    reg = state.load_models()
    return {"loaded": list(reg.generators), "failed": reg.failed, "default": reg.default}
