"""Start-up: the models load in the background, so /healthz answers at once and edits wait for them."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.precision import ISA_CAP_VARIABLES, resolve_precision
from server.app import create_app
from server.boot import BootApp
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


def test_an_isa_cap_below_bf16_means_no_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ONEDNN_MAX_CPU_ISA=AVX2`` on a Xeon with AMX: oneDNN would emulate bf16, so ``auto`` is fp32 and
    the bench files its tables apart from the uncapped machine's."""
    import models.precision as precision
    from bench.common import machine_kind

    for name in ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    precision.cpu_has_bf16_units.cache_clear()
    try:
        assert precision.cpu_has_bf16_units() and "capped" not in machine_kind()
        assert resolve_precision("auto", "cpu") == "bf16"
        for cap, units in (("avx2", False), ("AVX512_CORE", False), ("AVX512_CORE_BF16", True), ("ALL", True)):
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
            precision.cpu_has_bf16_units.cache_clear()
            assert precision.cpu_has_bf16_units() is units, cap
            assert resolve_precision("auto", "cpu") == ("bf16" if units else "fp32")
            assert f"capped at {cap.upper()}" in machine_kind()
            assert ("no bf16 units in use" in precision.describe_cpu_bf16()) is not units
    finally:
        precision.cpu_has_bf16_units.cache_clear()


def test_an_isa_cap_gets_an_inductor_cache_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's graph cache does not key on the vector ISA: a graph generated under a cap and run without
    it corrupted the heap. Each cap gets its own directory; none without a cap; an explicit one is kept."""
    from models.precision import separate_inductor_cache

    for name in ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert separate_inductor_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    dirs = set()
    for cap in ("avx2", "avx512", "default"):
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", cap)
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        path = separate_inductor_cache()
        assert path is not None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == path and cap in Path(path).name
        dirs.add(path)
    assert len(dirs) == 3
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/chosen")
    assert separate_inductor_cache() == "/somewhere/chosen"


def test_no_bf16_trial_at_start_up_without_bf16_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.served_models as served_models

    monkeypatch.setattr(served_models, "device_has_bf16_units", lambda device: False)
    reg = ModelRegistry.load(make_weights(tmp_path / "w"), torch.device("cpu"), precision="auto")
    served = reg.generators["stgan"]
    assert served.precision == "fp32" and served.speedup_bf16 is None  # no timing trial ran


def test_layout_trial_picks_the_faster_layout_once_per_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.served_models as served_models

    monkeypatch.setattr(served_models, "device_has_bf16_units", lambda device: False)
    monkeypatch.setattr(served_models, "_LAYOUT_DECISIONS", {})
    weights = make_weights(tmp_path / "w")
    reg = ModelRegistry.load(weights, torch.device("cpu"), precision="fp32", layout="contiguous")
    served = reg.generators["stgan"]
    x = torch.rand(2, 3, served.info.image_size, served.info.image_size) * 2 - 1
    cond = torch.zeros(2, len(served.info.attributes))
    cond[0, 0], cond[1, -1] = 1.0, -0.5
    out_nchw, mask_nchw = served.decode(served.encode(x), cond)

    trials: list[str] = []

    def timer(ms: dict[str, float]):  # the trial's timings, made up so that the choice is known
        def fake(s: served_models.ServedGenerator) -> dict[str, float]:
            trials.append(s.name)
            return ms

        return fake

    served_models.choose_layout(served, "auto", timer({"channels_last": 9.0, "contiguous": 12.0}))
    assert served.memory_format == torch.channels_last and trials == ["stgan"]
    conv = next(m for m in served.net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out_cl, mask_cl = served.decode(served.encode(x), cond)
    torch.testing.assert_close(out_cl, out_nchw, atol=1e-4, rtol=1e-4)  # same edit in either layout
    torch.testing.assert_close(mask_cl, mask_nchw, atol=1e-4, rtol=1e-4)
    assert served.describe(None)["layout"] == "channels_last"

    # a reload of the same architecture reuses the decision: no trial while clients are served
    served_models.choose_layout(served, "auto", timer({"channels_last": 99.0, "contiguous": 1.0}))
    assert served.memory_format == torch.channels_last and trials == ["stgan"]
    # another decision for another machine state: NCHW when it is the faster
    monkeypatch.setattr(served_models, "_LAYOUT_DECISIONS", {})
    served_models.choose_layout(served, "auto", timer({"channels_last": 20.0, "contiguous": 11.0}))
    assert served.memory_format == torch.contiguous_format and served.layout_ms == {
        "channels_last": 20.0,
        "contiguous": 11.0,
    }
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_layout_trial_times_both_layouts(tmp_path: Path) -> None:
    import server.served_models as served_models

    reg = ModelRegistry.load(make_weights(tmp_path / "w"), torch.device("cpu"), precision="fp32", layout="contiguous")
    ms = served_models.decode_ms(reg.generators["stgan"], rounds=2)
    assert set(ms) == {"channels_last", "contiguous"} and all(v > 0 for v in ms.values())


def _run_boot(boot: BootApp, scenario: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    """Start ``boot``'s lifespan as uvicorn does, run ``scenario`` against it, shut it down."""

    async def main() -> None:
        inbox: asyncio.Queue[dict] = asyncio.Queue()
        outbox: asyncio.Queue[dict] = asyncio.Queue()
        lifespan = asyncio.create_task(boot({"type": "lifespan"}, inbox.get, outbox.put))
        await inbox.put({"type": "lifespan.startup"})
        assert (await outbox.get())["type"] == "lifespan.startup.complete"  # at once, before the import
        transport = httpx.ASGITransport(app=boot)
        async with httpx.AsyncClient(transport=transport, base_url="http://boot") as client:
            await scenario(client)
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        await lifespan

    asyncio.run(main())


def test_the_entry_point_answers_liveness_while_the_app_is_imported(tmp_path: Path) -> None:
    weights = make_weights(tmp_path / "weights")
    importing, release = threading.Event(), threading.Event()

    def slow_import() -> FastAPI:  # stands in for importing torch and server.app
        importing.set()
        assert release.wait(30), "the test never released the import"
        return create_app(Settings(weights_dir=weights))

    boot = BootApp(slow_import)

    async def scenario(client: httpx.AsyncClient) -> None:
        assert await asyncio.to_thread(importing.wait, 30)
        live = await client.get("/healthz")
        assert live.status_code == 200 and live.json()["phase"] == "starting"
        assert (await client.get("/readyz")).status_code == 503
        early = await client.get("/v1/models")
        assert early.status_code == 503 and early.headers["retry-after"] == "2"
        release.set()
        for _ in range(300):
            if boot.ready:
                break
            await asyncio.sleep(0.1)
        models = await client.get("/v1/models")  # the real app now, its lifespan entered (models load)
        assert models.status_code == 200 and {m["name"] for m in models.json()["models"]} == {"stgan"}
        assert (await client.get("/healthz")).json() == {"status": "ok"}

    _run_boot(boot, scenario)


def test_an_app_that_fails_to_load_is_reported_on_healthz() -> None:
    def broken() -> FastAPI:
        raise ImportError("no module named torch")

    boot = BootApp(broken)

    async def scenario(client: httpx.AsyncClient) -> None:
        for _ in range(100):
            live = await client.get("/healthz")
            if live.status_code != 200:
                break
            await asyncio.sleep(0.05)
        assert live.status_code == 500 and "no module named torch" in live.json()["detail"]

    _run_boot(boot, scenario)


def test_run_in_own_thread_returns_raises_and_leaves_no_thread() -> None:
    from server.compute import run_in_own_thread

    threads: list[threading.Thread] = []

    def work(x: int) -> int:
        threads.append(threading.current_thread())
        return x * 2

    assert run_in_own_thread(work, 21) == 42
    assert threads[0] is not threading.current_thread() and not threads[0].is_alive()

    def fail() -> None:
        raise KeyError("broken weights")

    with pytest.raises(KeyError, match="broken weights"):
        run_in_own_thread(fail)


def test_a_load_without_bf16_trial_runs_on_a_thread_that_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch work on a long-lived thread other than the compute thread would leave an OpenMP team behind
    that throttles every later op (server/compute.py): the load's thread must be its own and end with it."""
    import server.served_models as served_models

    monkeypatch.setattr(served_models, "device_has_bf16_units", lambda device: False)
    loaders: list[threading.Thread] = []
    real_load = ModelRegistry.load

    def recording_load(*args: object, **kwargs: object) -> ModelRegistry:
        loaders.append(threading.current_thread())
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ModelRegistry, "load", staticmethod(recording_load))
    state = AppState(Settings(weights_dir=make_weights(tmp_path / "w"), compile="off"), torch.device("cpu"))
    try:
        for _ in range(2):  # the start-up load and a hot reload
            assert "stgan" in state.load_models().generators
        assert len(loaders) == 2 and all(t is not threading.current_thread() for t in loaders)
        assert not any(t.is_alive() for t in loaders)
        assert not any(t.name.startswith("torch-compute") for t in loaders)  # edits go on meanwhile
    finally:
        state.compute.close()


def test_a_hot_reload_reuses_the_bf16_timing_and_leaves_the_compute_thread_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the hardware has bf16 units the first load times bf16 against fp32 on the compute thread; a
    reload of the same architecture checks only bf16's agreement for the new weights (one decode in each
    precision) on a thread of its own, so edits go on meanwhile. A new architecture is timed again."""
    import server.served_models as served_models

    monkeypatch.setattr(served_models, "device_has_bf16_units", lambda device: True)
    monkeypatch.setattr(served_models, "_PRECISION_DECISIONS", {})
    decodes: list[tuple[str, str]] = []  # (thread, precision) of each decode during a load
    real_decode = served_models.ServedGenerator.decode

    def counting_decode(self: served_models.ServedGenerator, *args: object, **kwargs: object) -> object:
        decodes.append((threading.current_thread().name, self.precision))
        return real_decode(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(served_models.ServedGenerator, "decode", counting_decode)
    weights = make_weights(tmp_path / "w")
    cpu = torch.device("cpu")
    settings = Settings(weights_dir=weights, compile="off", layout="channels_last", bf16_tolerance=10.0)
    state = AppState(settings, cpu)
    try:
        first = state.load_models().generators["stgan"]
        assert len(decodes) == 8  # a warm-up and three timed decodes in each precision
        assert all(thread.startswith("torch-compute") for thread, _ in decodes)
        assert first.speedup_bf16 is not None and first.bf16_max_abs_diff is not None
        assert first.precision == ("bf16" if first.speedup_bf16 > 1 else "fp32")

        decodes.clear()
        make_weights(weights, seed=1)  # new weights, same architecture: a hot reload
        again = state.load_models().generators["stgan"]
        assert sorted(p for _, p in decodes) == ["bf16", "fp32"]  # the agreement check, untimed
        assert not any(thread.startswith("torch-compute") for thread, _ in decodes)
        assert again.speedup_bf16 == first.speedup_bf16 and again.precision == first.precision
        assert again.bf16_max_abs_diff is not None and again.bf16_max_abs_diff != first.bf16_max_abs_diff

        decodes.clear()
        make_weights(weights, generators=("mugan-tiny",), classifier=False)  # an architecture not timed yet
        state.load_models()
        timed_again = [thread for thread, _ in decodes if thread.startswith("torch-compute")]
        assert len(timed_again) == 8 and len(decodes) == 10  # mugan timed on the compute thread; stgan checked
    finally:
        state.compute.close()


def test_the_server_entry_point_shortens_openmp_spinning_before_torch_loads() -> None:
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: server.boot must set it before that (and
    leave a value from the environment alone)."""
    import os
    import subprocess
    import sys

    from server.boot import GOMP_SPINCOUNT

    code = "import sys, os, server.boot; print('torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", GOMP_SPINCOUNT]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env | {"GOMP_SPINCOUNT": "123"}, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "123"]


def test_decoders_that_will_be_compiled_load_in_channels_last_without_a_layout_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.served_models as served_models
    import server.state as state_module
    from server.state import served_layout

    cpu = torch.device("cpu")
    assert served_layout("auto", cpu, compiling=True) == "channels_last"
    assert served_layout("auto", cpu, compiling=False) == "auto"  # the eager trial decides
    assert served_layout("contiguous", cpu, compiling=True) == "contiguous"  # a setting wins

    monkeypatch.setattr(served_models, "device_has_bf16_units", lambda device: False)
    monkeypatch.setattr(served_models, "_LAYOUT_DECISIONS", {})
    monkeypatch.setattr(state_module, "should_compile", lambda mode, device: True)
    monkeypatch.setattr(state_module, "compile_in_background", lambda *args, **kwargs: None)
    trials: list[str] = []
    monkeypatch.setattr(served_models, "decode_ms", lambda served, **kw: trials.append(served.name) or {})
    state = AppState(Settings(weights_dir=make_weights(tmp_path / "w"), precision="fp32"), cpu)
    try:
        served = state.load_models().generators["stgan"]
        assert served.memory_format == torch.channels_last and trials == []
    finally:
        state.compute.close()


def test_the_warm_up_detects_on_photo_sized_images_of_both_orientations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """oneDNN builds its kernels for the detector's image pyramid on first use: a warm-up on a tiny image
    left that to the first user's photo, and the alignment's first use imported scikit-image."""
    import sys

    from server.faces import FaceDetector

    shapes: list[tuple[int, ...]] = []
    monkeypatch.setattr(FaceDetector, "detect", lambda self, photo: shapes.append(photo.shape) or [])
    monkeypatch.delitem(sys.modules, "skimage.transform", raising=False)
    state = AppState(Settings(weights_dir=tmp_path, compile="off", detect_max_side=320), torch.device("cpu"))
    try:
        state.warm_up()
    finally:
        state.compute.close()
    assert sorted(shapes) == [(240, 320, 3), (320, 240, 3)]
    assert "skimage.transform" in sys.modules  # the alignment's import, done before the first edit needs it


def test_the_demo_page_is_built_after_a_quiet_moment() -> None:
    """Importing Gradio holds the GIL for seconds: the start-up builds the demo page once no edit has been in
    flight for a while, not while the first edits after a start run."""
    import time

    from server.app import wait_quiet

    busy_until = time.monotonic() + 0.3

    async def main() -> float:
        t0 = time.monotonic()
        await wait_quiet(lambda: time.monotonic() >= busy_until, quiet_s=0.2, poll_s=0.01)
        return time.monotonic() - t0

    assert asyncio.run(main()) >= 0.5  # 0.3 s busy, then 0.2 s quiet
