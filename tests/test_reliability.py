"""Backpressure, failed models, hot reload, and training that survives SIGKILL."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.admission import Admission
from server.api.errors import status_for
from server.app import create_app
from server.config import Settings
from server.errors import BusyError
from server.served_models import ServedGenerator
from tests.server_utils import PHOTOS, make_weights
from training.checkpoints import read_training_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _crop_png(size: int = 64) -> bytes:
    with Image.open(PHOTOS / "portrait-2.jpg") as im:
        crop = im.convert("RGB").crop((380, 230, 780, 630)).resize((size, size))
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    return buf.getvalue()


def _edit(client: TestClient, edits: str = '{"Blond_Hair": 1}', **form: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/edit",
        files={"image": ("crop.png", _crop_png(), "image/png")},
        data={"edits": edits, "aligned": "true", **form},
    )


def test_admission_refuses_past_the_bound_and_times_out() -> None:
    adm = Admission(max_running=1, max_waiting=1, timeout=0.2)
    release = threading.Event()
    entered = threading.Event()

    def hold() -> None:
        with adm:
            entered.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(5)
    waiter_result: list[object] = []

    def wait_in_queue() -> None:
        try:
            with adm:
                waiter_result.append("ran")
        except BusyError as exc:
            waiter_result.append(exc)

    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    deadline = time.monotonic() + 5
    while adm.stats()["waiting"] != 1 and time.monotonic() < deadline:  # the waiter is queued
        time.sleep(0.001)
    with pytest.raises(BusyError) as exc, adm:  # running 1 + waiting 1: the third is refused at once
        pass
    assert status_for(exc.value) == 503 and exc.value.retry_after
    waiter.join(5)
    assert isinstance(waiter_result[0], BusyError) and "waited" in waiter_result[0].detail  # timed out
    release.set()
    holder.join(5)
    assert adm.stats()["rejected"] == 1 and adm.stats()["timed_out"] == 1
    assert adm.stats()["in_flight"] == 0 and adm.stats()["waiting"] == 0
    with adm:  # capacity is back
        pass


def test_busy_service_answers_503_with_retry_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = make_weights(tmp_path / "w")
    # no background compile: its checks decode too, and would take the slow decoder's first call
    app = create_app(Settings(weights_dir=weights, max_concurrent=1, max_queue=0, compile="off"))
    release, entered = threading.Event(), threading.Event()
    original = ServedGenerator.decode

    def slow_decode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(10)
        return original(self, *args, **kwargs)

    with TestClient(app) as client:
        # the load first: on a CPU with bf16 units its precision trial decodes, and must not be the call
        # that stalls here
        assert client.get("/v1/models").status_code == 200
        monkeypatch.setattr(ServedGenerator, "decode", slow_decode)
        results: list[int] = []
        t = threading.Thread(target=lambda: results.append(_edit(client).status_code))
        t.start()
        assert entered.wait(10)
        busy = _edit(client)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert "busy" in busy.json()["detail"]
        release.set()
        t.join(10)
        assert results == [200]
        assert client.get("/v1/models").json()["queue"]["rejected"] == 1


def test_broken_models_are_reported_and_the_others_serve(tmp_path: Path) -> None:
    weights = make_weights(tmp_path / "w", generators=("stgan-tiny", "mugan-tiny", "attgan-tiny"))
    data = (weights / "mugan" / "model.safetensors").read_bytes()
    (weights / "mugan" / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    doc = json.loads((weights / "attgan" / "config.json").read_text())
    doc["config"]["base_channels"] = 6  # config no longer matches the tensors
    (weights / "attgan" / "config.json").write_text(json.dumps(doc))
    with TestClient(create_app(Settings(weights_dir=weights))) as client:
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}  # waits for the load
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["models"] == {"stgan": "loaded", "mugan": "failed", "attgan": "failed"}
        assert "shape mismatch" in ready.json()["errors"]["attgan"]
        assert listed["mugan"]["state"] == "failed" and "unreadable" in listed["mugan"]["error"]
        assert _edit(client).status_code == 200
        resp = _edit(client, model="mugan")
        assert resp.status_code == 422 and "unknown model" in resp.json()["detail"]


def test_hot_reload_swaps_models_and_lets_in_flight_requests_finish(
    tmp_path: Path, prepared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.cli import main as cli
    from training.data import read_meta, write_meta

    weights = make_weights(tmp_path / "w")
    meta = read_meta(prepared_cache)
    meta["alignment_template"] = {"landmarks": [[0.38, 0.48], [0.63, 0.48], [0.5, 0.63], [0.39, 0.74], [0.61, 0.74]]}
    write_meta(prepared_cache, meta)
    app = create_app(Settings(weights_dir=weights, admin_token="s3cret"))
    with TestClient(app) as client:
        before = _edit(client).json()["image"]
        assert client.post("/v1/models/reload").status_code == 401
        assert client.post("/v1/models/reload", headers={"Authorization": "Bearer nope"}).status_code == 401

        # retrain a tiny STGAN and export it over the served one
        run = tmp_path / "run"
        sets = [
            "disc_preset=discriminator-tiny",
            "batch_size=4",
            "sample_every=1000",
            "eval_every=1000",
            f"cache_dir={prepared_cache}",
            f"classifier={tmp_path}/none",
        ]
        cli(
            [
                "train",
                "--preset",
                "stgan-tiny",
                "--run",
                str(run),
                "--max-steps",
                "2",
                *[x for s in sets for x in ("--set", s)],
            ]
        )
        cli(
            [
                "export",
                "--run",
                str(run),
                "--out",
                str(weights / "stgan"),
                "--checkpoint",
                "last",
                "--cache-dir",
                str(prepared_cache),
            ]
        )

        # a request in flight on the old model finishes on it while the reload happens
        old = app.state.face_editor.registry.generators["stgan"]
        release, entered = threading.Event(), threading.Event()
        original = ServedGenerator.decode

        def slow_decode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self is old:
                entered.set()
                release.wait(10)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(ServedGenerator, "decode", slow_decode)
        in_flight: list[object] = []
        t = threading.Thread(target=lambda: in_flight.append(_edit(client)))
        t.start()
        assert entered.wait(10)
        reloaded = client.post("/v1/models/reload", headers={"Authorization": "Bearer s3cret"})
        assert reloaded.status_code == 200 and reloaded.json()["loaded"] == ["stgan"]
        release.set()
        t.join(10)
        assert in_flight[0].status_code == 200 and in_flight[0].json()["image"] == before  # type: ignore[attr-defined]
        after = _edit(client).json()["image"]
        assert after != before
        assert app.state.face_editor.registry.generators["stgan"].info.training["steps"] == 2


def test_reload_is_disabled_without_an_admin_token(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(weights_dir=make_weights(tmp_path / "w")))) as client:
        assert client.post("/v1/models/reload", headers={"Authorization": "Bearer x"}).status_code == 404


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_from_the_last_complete_checkpoint(
    prepared_cache: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    sets = [
        "disc_preset=discriminator-tiny",
        "batch_size=4",
        "sample_every=1000000",
        "eval_every=1000000",
        "checkpoint_every_minutes=0",  # checkpoint after every step: kills land mid-write too
        f"cache_dir={prepared_cache}",
        f"classifier={tmp_path}/none",
    ]
    cmd = [sys.executable, "-m", "training", "train", "--preset", "stgan-tiny", "--run", str(run), "--resume"]
    cmd += [x for s in sets for x in ("--set", s)]
    ckpt = run / "checkpoints" / "last.safetensors"
    rng = np.random.default_rng(0)
    last_step = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until this process has written a checkpoint of its own
            if ckpt.is_file() and int(read_training_checkpoint(ckpt)[1]["step"]) > last_step:
                break
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 0.5)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _, meta = read_training_checkpoint(ckpt)  # loads: never a torn file
        step = int(meta["step"])
        assert step > last_step
        last_step = step
    # and a normal resume continues from it
    subprocess.run([*cmd, "--max-steps", "1"], cwd=ROOT, check=True, capture_output=True)
    assert int(read_training_checkpoint(ckpt)[1]["step"]) == last_step + 1


@pytest.mark.slow
def test_export_notify_reloads_a_live_server(tmp_path: Path, prepared_cache: Path) -> None:
    from server.launch import live_server
    from training.cli import main as cli
    from training.config import TrainConfig
    from training.trainer import Trainer

    weights = make_weights(tmp_path / "w")
    cfg = TrainConfig(
        preset="stgan-tiny",
        disc_preset="discriminator-tiny",
        batch_size=4,
        cache_dir=str(prepared_cache),
        classifier=str(tmp_path / "none"),
        sample_every=1000,
        eval_every=1000,
    )
    Trainer(cfg, tmp_path / "run").fit(max_steps=3)
    with live_server(weights, admin_token="tok") as (url, _):
        import httpx

        def steps() -> object:
            models = httpx.get(url + "/v1/models", timeout=30).json()["models"]  # a loaded CI machine is slow
            return next(m for m in models if m["name"] == "stgan")["training"].get("steps")

        assert steps() is None  # the tiny model made by the test has no training record
        os.environ["FACE_EDITOR_ADMIN_TOKEN"] = "tok"
        try:
            cli(["export", "--run", str(tmp_path / "run"), "--out", str(weights / "stgan"), "--checkpoint", "last",
                 "--cache-dir", str(prepared_cache), "--notify", url + "/v1/models/reload"])  # fmt: skip
        finally:
            del os.environ["FACE_EDITOR_ADMIN_TOKEN"]
        assert steps() == 3


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(prepared_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [
        "disc_preset=discriminator-tiny",
        "batch_size=4",
        "sample_every=2",  # samples/latest.png appears after step 2: the event the test waits for
        "eval_every=1000000",
        "checkpoint_every_minutes=1000",  # no periodic checkpoint: only the one SIGTERM triggers
        f"cache_dir={prepared_cache}",
        f"classifier={tmp_path}/none",
    ]
    cmd = [sys.executable, "-m", "training", "train", "--preset", "stgan-tiny", "--run", str(run)]
    proc = subprocess.Popen(
        [*cmd, *[x for s in sets for x in ("--set", s)]], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "samples" / "latest.png").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"signal 15 received" in err
    _, meta = read_training_checkpoint(run / "checkpoints" / "last.safetensors")
    assert int(meta["step"]) >= 2 and f"stopped at step {meta['step']} ".encode() in err
