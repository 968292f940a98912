"""docker-compose.yml and the Dockerfile (no Docker engine here: parsed and checked, not run)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_app_service_serves_with_read_only_weights_healthcheck_and_limits() -> None:
    app = _compose()["services"]["app"]
    assert app["build"] == "." and "8000:8000" in app["ports"]
    assert "./weights:/app/weights:ro" in app["volumes"]
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    assert app["user"].split(":")[0] != "0"
    limits = app["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and limits["memory"].endswith("G")
    assert app["environment"]["FACE_EDITOR_DEVICE"] == "cpu"
    assert app["environment"]["FACE_EDITOR_WEIGHTS_DIR"] == "/app/weights"


def test_compiled_decoders_are_kept_in_a_writable_volume() -> None:
    """The root file system is read-only: the compile cache (server/compiled.py) needs a volume of its own."""
    compose = _compose()
    for service in compose["services"].values():
        cache = service["environment"]["FACE_EDITOR_COMPILE_CACHE_DIR"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert cache in mounts and mounts[cache] in compose["volumes"]  # a named volume, not the read-only root
    text = (ROOT / "Dockerfile").read_text()
    assert "FACE_EDITOR_COMPILE_CACHE_DIR=/cache/decoders" in text
    assert "chown editor /app/weights /cache/decoders" in text


def test_gpu_profile_reserves_an_nvidia_device_and_uses_cuda() -> None:
    gpu = _compose()["services"]["app-gpu"]
    assert gpu["profiles"] == ["gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["FACE_EDITOR_DEVICE"] == "cuda"
    assert "./weights:/app/weights:ro" in gpu["volumes"]


def test_dockerfile_runs_uvicorn_as_non_root_with_pinned_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.14.1" in text and "--no-deps" in text and "facenet-pytorch==2.6.0" in text
    assert "\nUSER editor" in text and "server.app:app" in text and "HEALTHCHECK" in text
    # the image holds the packages the served app imports, and not training/
    import grimp

    graph = grimp.build_graph("models", "server", "frontend", "training")
    needed = {m.split(".")[0] for m in graph.find_upstream_modules("server.app")} | {"server"}
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ") and "./" in line.split()[-1]}
    assert needed <= copied, needed - copied
    assert "training" not in needed and "training" not in copied
    assert "COPY . " not in text and "pip install ." not in text  # no project install (it lists training/)


def test_every_compose_setting_is_a_settings_field() -> None:
    from server.config import Settings

    for name, service in _compose()["services"].items():
        for key in service["environment"]:
            assert key.startswith("FACE_EDITOR_"), (name, key)
            assert key.removeprefix("FACE_EDITOR_").lower() in Settings.model_fields, f"{name}: {key} is not a setting"
