"""Decoders compiled ahead of time with AOTInductor, in a child process, after the models load.

A slider move runs only the decoder, at batch 1, where eager PyTorch spends much of its time between
small ops. Inductor with ``freezing`` (the weights become constants, so oneDNN prepacks the
convolutions and the element-wise ops around them fuse) made the served decoders about 1.5x faster
on a 2-core AMD EPYC (``bench/slider.py --compiled``). Compiling takes tens of seconds per model, so it
never delays start-up: the models serve eagerly until their compiled decoder is built, checked against
the eager one and timed, and it is swapped in only when it agrees and is faster. Anything that fails
(no C++ compiler, an op inductor cannot lower) leaves the model eager, logged and shown in
``GET /v1/models``.

The compile runs in a child process (:mod:`server.compile_worker`) at the lowest CPU priority, not on a
thread: tracing and lowering are Python that held the server's GIL, and every small op of an edit
waited for it (the README's REST call took 4.4 s instead of 0.29 s while MU-GAN compiled on the 2-core
EPYC with avx512-bf16). Its packages are kept in a cache directory, keyed by the weights, precision,
layout, code and machine: the next start or reload with the same weights loads them in well under a
second instead of compiling again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_pretrained
from models.device import has_cxx_compiler
from models.generators import Encoded
from models.precision import isa_caps
from server.admission import QuietTimer
from server.served_models import ModelRegistry, ServedGenerator, layout_name, run_here

log = logging.getLogger(__name__)

#: Largest |compiled - eager| accepted in the decoder's output image and mask (values in [-1, 1]).
TOLERANCE = 1e-3


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


#: Bump when what the child compiles changes in a way the key below cannot see.
PACKAGE_FORMAT = 1
#: A compile that has not finished after this long is stopped (the model stays eager).
COMPILE_TIMEOUT_S = 1800.0
_ROOT = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    """Where compiled decoders are kept between runs (``FACE_EDITOR_COMPILE_CACHE_DIR`` overrides it)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "face-attribute-editor" / "decoders"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The source of what a package compiles (the networks and the worker): a change makes new packages."""
    files = [*sorted((_ROOT / "models").glob("*.py")), _ROOT / "server" / "compile_worker.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _machine_digest(device: torch.device) -> str:
    """The machine a package's native code was built for: torch, the CPU's instruction sets (and any cap
    set on them, ``models.precision.isa_caps``), the GPU."""
    parts = [torch.__version__, torch.backends.cpu.get_cpu_capability(), str(device.type), str(isa_caps())]
    with contextlib.suppress(OSError):
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        parts.append(" ".join(sorted(flags.split(":", 1)[-1].split())))
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return "|".join(parts)


def _package_key(model_dir: Path, served: ServedGenerator) -> str:
    """The compiled packages' name: the weights and config as written for the child, the precision,
    layout and threads they serve with, the code and the machine."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update((model_dir / name).read_bytes())
    # inductor writes the thread count into its C++ kernels (``#pragma omp parallel num_threads``)
    h.update(f"{served.precision}|{layout_name(served.memory_format)}|{torch.get_num_threads()}|".encode())
    h.update(f"{PACKAGE_FORMAT}|".encode())
    h.update(_code_digest().encode() + _machine_digest(served.device).encode())
    return f"{served.name}-{h.hexdigest()[:24]}"


def compile_packages(
    served: ServedGenerator, cache_dir: Path, is_current: Callable[[], bool] = lambda: True
) -> tuple[Path, Path, bool]:
    """(batch-1 package, batched package, whether they came from ``cache_dir``) of ``served``'s decoder:
    compiled by a child process (:mod:`server.compile_worker`, which lowers its own CPU priority), unless a
    previous run left them. Raises ``RuntimeError`` with the child's last words when it fails, and stops
    it when ``is_current()`` turns false (the registry was replaced by a reload)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="decoder-", dir=cache_dir) as tmp:
        model_dir = Path(tmp) / "model"
        save_pretrained(model_dir, served.net, architecture=served.info.architecture, name=served.name)
        prefix = cache_dir / _package_key(model_dir, served)
        single, batched = Path(f"{prefix}-b1.pt2"), Path(f"{prefix}-batched.pt2")
        if single.is_file() and batched.is_file():
            for path in (single, batched):
                path.touch()  # recently used: kept by _prune
            return single, batched, True
        log_path = Path(tmp) / "worker.log"
        cmd = [
            sys.executable,
            "-m",
            "server.compile_worker",
            str(model_dir),
            str(prefix),
            "--device",
            str(served.device),
            "--precision",
            served.precision,
            "--layout",
            layout_name(served.memory_format),
            "--threads",
            str(torch.get_num_threads()),
        ]
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(torch.get_num_threads()),
            PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
        )
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                cmd,
                cwd=_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + COMPILE_TIMEOUT_S
            while proc.poll() is None:
                if not is_current() or time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError("stopped: " + ("replaced by a reload" if not is_current() else "timed out"))
                time.sleep(0.2)
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"compile worker exited with {proc.returncode}: " + " | ".join(tail))
    _prune(cache_dir)
    return single, batched, False


def _prune(cache_dir: Path, keep: int = 12) -> None:
    """Keep the ``keep`` most recently used packages (a package holds its model's weights)."""
    packages = [p for p in cache_dir.glob("*.pt2") if ".partial" not in p.name]
    packages.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in packages[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


class CompiledDecoder:
    """A decoder's two AOTInductor packages, called like ``net.decode(encoded, cond)``: batch 1 runs the
    package specialised for it, larger batches the batched one. The packages were compiled for the
    dtypes and memory layout ``ServedGenerator.encode`` gives; inputs are brought to them (no copy when
    they already are), since compiled code reads its inputs with the strides it was built for."""

    def __init__(
        self,
        single: Callable[..., Any],
        batched: Callable[..., Any],
        specs: list[tuple[torch.dtype, bool]],
        cached: bool = False,
    ) -> None:
        self.single, self.batched, self.specs = single, batched, specs
        self.cached = cached  # loaded from packages an earlier run compiled

    def __call__(self, encoded: Encoded, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (*encoded.tensors(), cond)
        args = [
            t.to(dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            for t, (dtype, channels_last) in zip(tensors, self.specs, strict=True)
        ]
        runner = self.single if cond.shape[0] == 1 else self.batched
        image, mask = runner(*args)
        return image, mask


def load_compiled(single: Path, batched: Path, cached: bool = False) -> CompiledDecoder:
    """The packages loaded (no compiling: the native code is in them), with the inputs they were built for."""
    from torch._inductor import aoti_load_package

    from server.compile_worker import INPUTS_KEY

    runners = aoti_load_package(str(single)), aoti_load_package(str(batched))
    specs = [(getattr(torch, dtype), bool(cl)) for dtype, cl in json.loads(runners[0].get_metadata()[INPUTS_KEY])]
    return CompiledDecoder(*runners, specs, cached)


def check_compiled(served: ServedGenerator, compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raise ``RuntimeError`` unless ``compiled`` agrees with the eager decoder at batch 1 and 3."""
    with torch.no_grad():
        for batch, seed in ((1, 0), (3, 1)):
            x, cond = _probe(served, batch, seed)
            encoded = served.encode(x)
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


def build_compiled_decoder(
    served: ServedGenerator,
    cache_dir: Path | None = None,
    run: Callable[..., Any] = run_here,
    is_current: Callable[[], bool] = lambda: True,
    wait_turn: Callable[[], bool] = lambda: True,
) -> CompiledDecoder:
    """``served``'s decoder compiled (:func:`compile_packages`, from ``cache_dir`` when it is there),
    loaded and checked against eager at batch 1 and 3; raises ``RuntimeError`` when they disagree.
    ``run`` runs the check (the service's compute thread, where edits run) once ``wait_turn()`` returns
    true (false: the registry was replaced, ``RuntimeError``)."""
    single, batched, cached = compile_packages(served, cache_dir or default_cache_dir(), is_current)
    # loaded here, not on the compute thread: the first load imports inductor's Python and probes the
    # CPU's instruction sets (seconds, no torch compute), which would hold up the edits queued there
    compiled = load_compiled(single, batched, cached)
    if not wait_turn():
        raise RuntimeError("stopped: replaced by a reload")
    run(check_compiled, served, compiled)
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


def compile_decoder(
    served: ServedGenerator,
    run_timed: Callable[..., Any],
    cache_dir: Path | None = None,
    is_current: Callable[[], bool] = lambda: True,
    wait_turn: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """Build, check and time ``served``'s compiled decoder; swap it in when it is faster. Returns the
    report shown in ``GET /v1/models``. ``run_timed`` runs the check and the timing trial (the service's
    compute thread, so they do not race edits for the cores), once ``wait_turn()`` allows."""
    t0 = time.perf_counter()
    try:
        compiled = build_compiled_decoder(served, cache_dir, run_timed, is_current, wait_turn)
    except Exception as exc:  # inductor raises many kinds; any of them leaves the model eager
        log.warning("%s: decoder not compiled (%s: %s); serving eagerly", served.name, type(exc).__name__, exc)
        return {"used": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    cached = bool(getattr(compiled, "cached", False))
    report: dict[str, Any] = {"compile_s": round(time.perf_counter() - t0, 1), "cached": cached}
    report |= run_timed(time_decoders, served, compiled)
    report["used"] = report["compiled_ms"] < report["eager_ms"]
    if report["used"]:
        served.compiled_decode = compiled
    log.info(
        "%s: compiled decoder %s in %.1f s, batch-1 decode %.1f ms (eager %.1f) -> %s",
        served.name,
        "loaded from the cache" if cached else "built",
        report["compile_s"],
        report["compiled_ms"],
        report["eager_ms"],
        "compiled" if report["used"] else "eager",
    )
    return report


def _wait_quiet(idle: Callable[[], bool], quiet_s: float, is_current: Callable[[], bool], poll_s: float) -> bool:
    """Block until ``idle()`` has held for ``quiet_s`` without a break; False if the registry was replaced."""
    timer = QuietTimer(idle, quiet_s)
    while is_current():
        if timer.quiet():
            return True
        time.sleep(poll_s)
    return False


def compile_in_background(
    registry: ModelRegistry,
    run_timed: Callable[..., Any],
    is_current: Callable[[], bool],
    cache_dir: Path | None = None,
    idle: Callable[[], bool] = lambda: True,
    quiet_s: float = 2.0,
    poll_s: float = 0.2,
) -> threading.Thread:
    """Compile every generator of ``registry`` one after the other from a daemon thread, which waits for
    the child processes that compile; stop early (the running child too) when ``registry`` has been
    replaced by a reload (``is_current`` false).

    The compile starts at once (a child process at the lowest priority); what then runs on the compute
    thread, the check against eager and the timing trial (about half a second per model on the 2-core
    EPYC), waits until the service has been ``idle`` for ``quiet_s``: run at once, under 8 editing
    clients two hot reloads (whose packages were cached) made the slowest edit 1.7 s instead of 0.3-0.5 s.
    Under steady load the models keep serving eagerly.
    """

    for served in registry.generators.values():
        served.compile_report = {"used": False, "state": "queued"}

    def wait_turn() -> bool:
        return _wait_quiet(idle, quiet_s, is_current, poll_s)

    def work() -> None:
        for served in list(registry.generators.values()):
            if not is_current():
                for rest in registry.generators.values():
                    if (rest.compile_report or {}).get("state") in ("queued", "compiling"):
                        rest.compile_report = {"used": False, "state": "skipped: replaced by a reload"}
                return
            served.compile_report = {"used": False, "state": "compiling"}
            served.compile_report = compile_decoder(served, run_timed, cache_dir, is_current, wait_turn)

    thread = threading.Thread(target=work, name="compile-decoders", daemon=True)
    thread.start()
    return thread
