"""Decoders compiled with TorchInductor, built in the background after the models load.

A slider move runs only the decoder, at batch 1, where eager PyTorch spends much of its time between
small ops. Inductor with ``freezing`` (the weights become constants, so oneDNN prepacks the
convolutions and the element-wise ops around them fuse) made the served decoders about 1.5x faster
on a 2-core AMD EPYC (``bench/slider.py --compiled``). Compiling takes tens of seconds per model,
so it never delays start-up: the models serve eagerly until their compiled decoder is built (once
the service is idle), checked against the eager one and timed, and it is swapped in only when it
agrees and is faster. Anything that fails (no C++ compiler, an op inductor cannot lower) leaves the model
eager, logged and shown in ``GET /v1/models``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from models.blocks import ResizeConv
from server.served_models import ModelRegistry, ServedGenerator

log = logging.getLogger(__name__)

#: Largest |compiled - eager| accepted in the decoder's output image and mask (values in [-1, 1]).
TOLERANCE = 1e-3


def has_cxx_compiler() -> bool:
    """Inductor's CPU backend writes C++ and builds it with the compiler in ``$CXX`` (default ``c++``)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++") if c)


def should_compile(mode: str, device: torch.device) -> bool:
    """``decoder``: always; ``off``: never; ``auto``: on a CPU that has a C++ compiler (CUDA not yet
    measured, so eager there)."""
    if mode == "decoder":
        return True
    return mode == "auto" and device.type == "cpu" and has_cxx_compiler()


def _probe(served: ServedGenerator, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random face batch and attribute differences for ``served``."""
    size = served.info.image_size
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    cond = torch.randint(-1, 2, (batch, len(served.info.attributes)), generator=g).float()
    return x.to(served.device), cond.to(served.device)


def _abs_diff(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(max, mean) of |got - want| over the decoder's outputs (image and mask)."""
    diffs = [(a.float() - b.float()).abs() for a, b in zip(got, want, strict=True)]
    return max(float(d.max()) for d in diffs), max(float(d.mean()) for d in diffs)


def disagreement(
    served: ServedGenerator,
    got: tuple[torch.Tensor, ...],
    want_fp32: tuple[torch.Tensor, ...],
    eager_same_precision: tuple[torch.Tensor, ...] | None,
) -> str | None:
    """Why the compiled decoder's output ``got`` is refused, or None. ``want_fp32`` is eager fp32 (the
    reference whatever the model serves in), ``eager_same_precision`` eager in the served precision.

    fp32: within :data:`TOLERANCE` everywhere. bf16: a compiled bf16 decoder rounds differently from
    the eager one, and its largest single-pixel difference moves with the input (MU-GAN, six random
    probes: 0.020-0.094 compiled, 0.023-0.044 eager), so one pixel is allowed twice what the precision
    trial allows eager bf16, and the mean difference, where a wrong graph shows, must stay within
    twice eager bf16's on the same input."""
    diff_max, diff_mean = _abs_diff(got, want_fp32)
    if served.precision == "fp32":
        return None if diff_max <= TOLERANCE else f"max {diff_max:.2e} (limit {TOLERANCE:.0e})"
    if eager_same_precision is None:
        raise ValueError("a bf16 decoder is judged against eager bf16 on the same input")
    eager_max, eager_mean = _abs_diff(eager_same_precision, want_fp32)
    max_limit, mean_limit = 2 * served.bf16_tolerance, 2 * eager_mean + 1e-4
    if diff_max > max_limit or diff_mean > mean_limit:
        return (
            f"max {diff_max:.2e} (limit {max_limit:.0e}), mean {diff_mean:.2e} (limit {mean_limit:.1e}; "
            f"eager {served.precision}: max {eager_max:.2e}, mean {eager_mean:.2e})"
        )
    return None


def _mark_batch_dynamic(encoded: Any, cond: torch.Tensor) -> None:
    """One compiled graph for every batch size above 1 (micro-batching merges faces), not one per size."""
    for t in (*encoded.tensors(), cond):
        torch._dynamo.mark_dynamic(t, 0)


def build_compiled_decoder(served: ServedGenerator) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``served.net.decode`` compiled, warmed up (the compiles happen here: one graph for batch 1, the
    slider's, and one for any larger batch) and checked against eager at batch 1 and 3; raises
    ``RuntimeError`` when they disagree."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    inductor_config.compile_threads = 1  # compile in this thread (niced), no pool of worker processes
    # Every generator's ``decode`` is one code object, and Dynamo's automatic dynamic shapes took the
    # second model's other channel counts for a shape change of the first's: the second model compiled
    # its graphs with symbolic sizes and slower kernels (EPYC, interleaved worker processes, 16 rounds:
    # STGAN compiled after MU-GAN 28.3 ms a slider move, alone 24.0 ms, after MU-GAN with this off 24.2).
    # The batch stays dynamic where it is marked (_mark_batch_dynamic).
    torch._dynamo.config.automatic_dynamic_shapes = False
    for module in served.net.modules():
        if isinstance(module, ResizeConv):
            module.bake_kernel()
    compiled = torch.compile(served.net.decode)
    with torch.no_grad():
        for batch, seed in ((1, 0), (3, 1)):
            x, cond = _probe(served, batch, seed)
            encoded = served.encode(x)
            if batch > 1:
                _mark_batch_dynamic(encoded, cond)
            with served.autocast():
                got = compiled(encoded, cond)
                # eager in the served precision, which a bf16 decoder is judged against (fp32: ``want``)
                eager = served.net.decode(encoded, cond) if served.precision != "fp32" else None
            # the reference is eager fp32, whatever precision the model serves in
            want = served.net.decode(served.net.encode(x.contiguous(memory_format=served.memory_format)), cond)
            why = disagreement(served, got, want, eager)
            if why is not None:
                raise RuntimeError(
                    f"compiled {served.precision} decoder differs from eager fp32 at batch {batch}: {why}"
                )
    return compiled


def time_decoders(
    served: ServedGenerator, compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]], rounds: int = 7
) -> dict[str, float]:
    """Median ms of a batch-1 decode (a slider move), eager and compiled, interleaved."""
    x, cond = _probe(served, 1, 2)
    encoded = served.encode(x)
    fns = {"eager": served.net.decode, "compiled": compiled}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad(), served.autocast():
        for fn in fns.values():
            fn(encoded, cond)
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(encoded, cond)
                times[name].append((time.perf_counter() - t0) * 1000)
    return {f"{name}_ms": round(statistics.median(ms), 2) for name, ms in times.items()}


def compile_decoder(served: ServedGenerator, run_timed: Callable[..., Any]) -> dict[str, Any]:
    """Build, check and time ``served``'s compiled decoder; swap it in when it is faster. Returns the
    report shown in ``GET /v1/models``. ``run_timed`` runs the timing trial (the service's compute
    thread, so the trial does not race edits for the cores)."""
    t0 = time.perf_counter()
    try:
        compiled = build_compiled_decoder(served)
    except Exception as exc:  # inductor raises many kinds; any of them leaves the model eager
        log.warning("%s: decoder not compiled (%s: %s); serving eagerly", served.name, type(exc).__name__, exc)
        return {"used": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    report: dict[str, Any] = {"compile_s": round(time.perf_counter() - t0, 1)}
    report |= run_timed(time_decoders, served, compiled)
    report["used"] = report["compiled_ms"] < report["eager_ms"]
    if report["used"]:
        served.compiled_decode = compiled
    log.info(
        "%s: compiled decoder in %.1f s, batch-1 decode %.1f ms (eager %.1f) -> %s",
        served.name,
        report["compile_s"],
        report["compiled_ms"],
        report["eager_ms"],
        "compiled" if report["used"] else "eager",
    )
    return report


def _wait_quiet(idle: Callable[[], bool], quiet_s: float, is_current: Callable[[], bool], poll_s: float) -> bool:
    """Block until ``idle()`` has held for ``quiet_s`` without a break; False if the registry was replaced."""
    quiet_since = None
    while is_current():
        now = time.monotonic()
        if not idle():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return True
        time.sleep(poll_s)
    return False


def compile_in_background(
    registry: ModelRegistry,
    run_timed: Callable[..., Any],
    is_current: Callable[[], bool],
    idle: Callable[[], bool] = lambda: True,
    quiet_s: float = 2.0,
    poll_s: float = 0.2,
) -> threading.Thread:
    """Compile every generator of ``registry`` one after the other in a daemon thread; stop early when
    ``registry`` has been replaced by a reload (``is_current`` false).

    Each compile starts only once the service has been ``idle`` for ``quiet_s``: tracing and code
    generation are Python that holds the GIL, and every small op of an edit waits for it (on the 2-core
    EPYC, two hot reloads whose compiles ran under 8 editing clients made the slowest edit 8.2 s instead
    of 0.6 s). Under steady load the models keep serving eagerly.
    """

    for served in registry.generators.values():
        served.compile_report = {"used": False, "state": "queued"}

    def work() -> None:
        # compile at the lowest CPU priority (the C++ compiler it starts inherits it): edits first;
        # where threads have no priority of their own (not Linux) it keeps the process's
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        for served in list(registry.generators.values()):
            if not _wait_quiet(idle, quiet_s, is_current, poll_s):
                for rest in registry.generators.values():
                    if (rest.compile_report or {}).get("state") == "queued":
                        rest.compile_report = {"used": False, "state": "skipped: replaced by a reload"}
                return
            served.compile_report = {"used": False, "state": "compiling"}
            served.compile_report = compile_decoder(served, run_timed)

    thread = threading.Thread(target=work, name="compile-decoders", daemon=True)
    thread.start()
    return thread
