"""Start-up: the models load in the background, so /healthz answers at once and edits wait for them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from models.precision import resolve_precision
from server.app import create_app
from server.config import Settings
from server.served_models import ModelRegistry
from server.state import AppState
from tests.server_utils import make_weights


def test_healthz_answers_while_the_models_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = make_weights(tmp_path / "weights")
    loading, release = threading.Event(), threading.Event()
    real_load = AppState.load_models

    def slow_load(self: AppState) -> ModelRegistry:
        loading.set()
        assert release.wait(30), "the test never released the load"
        return real_load(self)

    monkeypatch.setattr(AppState, "load_models", slow_load)
    with TestClient(create_app(Settings(weights_dir=weights))) as client:
        assert loading.wait(30)
        assert client.get("/healthz").status_code == 200  # would hang if start-up blocked the app
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["loading"] is True
        release.set()
        models = client.get("/v1/models")  # waits for the load instead of answering "no models"
        assert models.status_code == 200 and {m["name"] for m in models.json()["models"]} == {"stgan"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["loading"] is False


def test_auto_precision_is_fp32_without_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_no_bf16_trial_at_start_up_without_bf16_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.served_models as served_models

    monkeypatch.setattr(served_models, "device_has_bf16_units", lambda device: False)
    reg = ModelRegistry.load(make_weights(tmp_path / "w"), torch.device("cpu"), precision="auto")
    served = reg.generators["stgan"]
    assert served.precision == "fp32" and served.speedup_bf16 is None  # no timing trial ran
