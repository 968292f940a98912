"""The background-compiled decoder (server/compiled.py): when it is used, what it must agree with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.compiled import compile_decoder, compile_in_background, has_cxx_compiler, should_compile, time_decoders
from server.served_models import ModelRegistry
from tests.server_utils import make_weights


def test_auto_compiles_only_on_a_cpu_with_a_cxx_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert should_compile("decoder", cuda) and not should_compile("off", cpu)
    assert not should_compile("auto", cuda)
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", "")
    assert not has_cxx_compiler() and not should_compile("auto", cpu)


def _registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry.load(make_weights(tmp_path / "w"), torch.device("cpu"), precision="fp32", micro_batch=1)


def _inline(fn: Any, *args: Any) -> Any:
    return fn(*args)


def test_a_compiled_decoder_is_swapped_in_only_when_the_trial_finds_it_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.compiled as compiled

    served = _registry(tmp_path).generators["stgan"]
    stand_in = served.net.decode  # what "compiling" returns here; the real compile is the next test's
    monkeypatch.setattr(compiled, "build_compiled_decoder", lambda s: stand_in)
    report = compile_decoder(served, lambda fn, *a: {"eager_ms": 1.0, "compiled_ms": 2.0})
    assert report["used"] is False and served.compiled_decode is None
    report = compile_decoder(served, lambda fn, *a: {"eager_ms": 2.0, "compiled_ms": 1.0})
    assert report["used"] is True and served.compiled_decode is stand_in


@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
def test_the_compiled_decoder_serves_what_the_eager_one_does_at_any_batch(tmp_path: Path) -> None:
    served = _registry(tmp_path).generators["stgan"]
    size, n_attrs = served.info.image_size, len(served.info.attributes)
    torch.manual_seed(0)
    x = torch.rand(5, 3, size, size) * 2 - 1
    cond = torch.randint(-1, 2, (5, n_attrs)).float()
    eager = served.decode(served.encode(x), cond)
    report = compile_decoder(served, lambda fn, *a: {"eager_ms": 2.0, "compiled_ms": 1.0})
    assert report["used"] and served.compiled_decode is not None and report["compile_s"] > 0
    for batch in (1, 2, 5):  # batch 1 (a slider move) and micro-batches of any size
        got = served.decode(served.encode(x[:batch]), cond[:batch])
        for a, b in zip(got, eager, strict=True):
            torch.testing.assert_close(a, b[:batch], rtol=0, atol=1e-4)
    trial = time_decoders(served, served.compiled_decode, rounds=2)
    assert trial["eager_ms"] > 0 and trial["compiled_ms"] > 0


def test_a_decoder_that_fails_to_compile_stays_eager_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.compiled as compiled

    def broken(served: Any) -> Any:
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiled, "build_compiled_decoder", broken)
    registry = _registry(tmp_path)
    thread = compile_in_background(registry, _inline, lambda: True)
    thread.join(timeout=30)
    served = registry.generators["stgan"]
    assert served.compiled_decode is None
    assert served.compile_report == {"used": False, "error": "RuntimeError: no C++ compiler here"}
    assert served.describe(None)["compiled_decoder"] == served.compile_report


def test_a_replaced_registry_is_not_compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.compiled as compiled

    calls: list[str] = []
    monkeypatch.setattr(compiled, "compile_decoder", lambda served, run: calls.append(served.name) or {})
    registry = _registry(tmp_path)
    compile_in_background(registry, _inline, lambda: False).join(timeout=30)
    assert calls == []
    assert registry.generators["stgan"].compile_report == {"used": False, "state": "skipped: replaced by a reload"}


def test_compiles_wait_until_the_service_has_been_idle_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import server.compiled as compiled

    started: list[float] = []
    monkeypatch.setattr(compiled, "compile_decoder", lambda served, run: started.append(time.monotonic()) or {})
    registry = _registry(tmp_path)
    busy_until = time.monotonic() + 0.3  # edits in flight for 0.3 s
    t0 = time.monotonic()
    thread = compile_in_background(
        registry, _inline, lambda: True, lambda: time.monotonic() >= busy_until, quiet_s=0.2, poll_s=0.01
    )
    thread.join(timeout=30)
    assert len(started) == 1 and started[0] - t0 >= 0.5  # 0.3 s busy, then 0.2 s quiet

    # a registry replaced while it waits for a quiet moment is never compiled
    started.clear()
    current = [True]
    thread = compile_in_background(registry, _inline, lambda: current[0], lambda: False, quiet_s=0.1, poll_s=0.01)
    current[0] = False
    thread.join(timeout=30)
    assert started == [] and registry.generators["stgan"].compile_report["state"].startswith("skipped")


@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
def test_a_bf16_model_compiles_in_bf16_and_is_held_to_its_bf16_tolerance_against_fp32(tmp_path: Path) -> None:
    import server.compiled as compiled

    served = _registry(tmp_path).generators["stgan"]
    served.precision = "bf16"  # as the precision trial picks on a CPU with bf16 units
    served.bf16_tolerance = 1e-6  # no bf16 decoder gets this close to fp32
    with pytest.raises(RuntimeError, match="differs from eager fp32"):
        compiled.build_compiled_decoder(served)
    served.bf16_tolerance = 0.08
    decode = compiled.build_compiled_decoder(served)
    x = torch.rand(2, 3, served.info.image_size, served.info.image_size) * 2 - 1
    cond = torch.ones(2, len(served.info.attributes))
    with torch.no_grad(), served.autocast():
        out, _ = decode(served.encode(x), cond)
    assert out.dtype == torch.bfloat16  # it runs in bf16, not in fp32


def test_a_bf16_compiled_decoder_may_round_one_pixel_differently_but_not_the_whole_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.compiled as compiled

    served = _registry(tmp_path).generators["stgan"]
    served.precision, served.bf16_tolerance = "bf16", 0.08

    def fake_compile(shift: float, one_pixel: bool) -> Any:
        def decode(encoded: Any, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            image, mask = served.net.decode(encoded, cond)  # eager, in bf16 under the caller's autocast
            image = image.clone()
            if one_pixel:
                image[:, 0, 3, 5] += shift
            else:
                image += shift
            return image, mask

        return lambda fn: decode

    # one pixel off by more than eager bf16 itself is (0.1 > 0.08): a compiled graph's rounding, accepted
    monkeypatch.setattr(torch, "compile", fake_compile(0.1, one_pixel=True))
    compiled.build_compiled_decoder(served)
    # every pixel a little off (max 0.03, within 0.08): a wrong graph, refused by the mean
    monkeypatch.setattr(torch, "compile", fake_compile(0.03, one_pixel=False))
    with pytest.raises(RuntimeError, match="mean"):
        compiled.build_compiled_decoder(served)
    # one pixel far off: refused by the max
    monkeypatch.setattr(torch, "compile", fake_compile(0.5, one_pixel=True))
    with pytest.raises(RuntimeError, match="max"):
        compiled.build_compiled_decoder(served)


def test_a_second_model_compiles_with_static_sizes_but_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both generators' ``decode`` is one code object: compiled after the other model, a decoder must not
    take the other model's channel counts for a change of its own shapes and trace symbolic sizes."""
    import torch._dynamo

    from server.compiled import build_compiled_decoder

    registry = ModelRegistry.load(
        make_weights(tmp_path / "w", generators=("mugan-tiny", "stgan-tiny")),
        torch.device("cpu"),
        precision="fp32",
        micro_batch=1,
    )
    symbolic: list[tuple[str, tuple[object, ...]]] = []  # (model, shape) of inputs with a non-batch symbol
    graphs: list[str] = []
    current = [""]

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(current[0])
        for node in gm.graph.find_nodes(op="placeholder"):
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape[1:]):
                symbolic.append((current[0], tuple(value.shape)))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=recording_backend))
    torch._dynamo.reset()
    try:  # from a fresh process's default (config.patch restores it; monkeypatch would delete the entry)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=True):
            for name in ("mugan", "stgan"):
                current[0] = name
                build_compiled_decoder(registry.generators[name])
    finally:
        torch._dynamo.reset()
    assert {"mugan", "stgan"} <= set(graphs)
    assert symbolic == []


# A decode loop on the main thread while another thread compiles the same bf16 decoder; run in a child
# process, because the hang it guards against holds the GIL and no timeout inside the process could fire.
_EDITS_DURING_COMPILE = """
import sys, threading
from pathlib import Path
import torch
from server.compiled import compile_decoder
from server.served_models import ModelRegistry
registry = ModelRegistry.load(Path(sys.argv[1]), torch.device("cpu"), precision="bf16", micro_batch=1)
served = registry.generators["stgan"]
x = torch.rand(1, 3, served.info.image_size, served.info.image_size) * 2 - 1
cond = torch.zeros(1, len(served.info.attributes))
encoded = served.encode(x)
faster = lambda fn, *a: {"eager_ms": 2.0, "compiled_ms": 1.0}
compiling = threading.Thread(target=compile_decoder, args=(served, faster))
compiling.start()
decodes = 0
while compiling.is_alive():
    served.decode(encoded, cond)
    decodes += 1
print(decodes, served.compiled_decode is not None)
"""


@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor's CPU backend needs a C++ compiler")
def test_bf16_edits_go_on_while_the_decoder_compiles_in_the_background(tmp_path: Path) -> None:
    """Under bf16 autocast the casts of weights that require grad are kept in autocast's process-wide cache: an
    edit leaving autocast cleared it holding its mutex and waited for the GIL to free the casts' autograd nodes,
    while a compiling thread held the GIL and waited for the mutex, and the server hung (EPYC with avx512-bf16,
    real models, 4 clients). Served networks are frozen, so no cast is cached: the assertions on requires_grad
    catch a regression; the child process runs the scenario, which with these tiny models finished 3 of 3
    times even before the fix (the window is short), so it guards the path, not the race."""
    import subprocess
    import sys

    weights = make_weights(tmp_path / "w")
    registry = ModelRegistry.load(weights, torch.device("cpu"), precision="bf16", micro_batch=1)
    assert not any(p.requires_grad for g in registry.generators.values() for p in g.net.parameters())
    assert registry.classifier is not None and not any(p.requires_grad for p in registry.classifier.net.parameters())
    try:
        out = subprocess.run(
            [sys.executable, "-c", _EDITS_DURING_COMPILE, str(weights)],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("decoding while the decoder compiled hung")
    assert out.returncode == 0, out.stderr[-2000:]
    decodes, swapped = out.stdout.split()
    assert int(decodes) > 0 and swapped == "True"
