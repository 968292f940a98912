"""Which float precision to compute in, per machine: bf16 only where the hardware has bf16 units.

On an Intel Xeon with AMX (or avx512-bf16) bf16 autocast made a conv training step 2-3x faster than
fp32; on a CPU without bf16 units (e.g. an AMD EPYC with AVX2 only) oneDNN emulates bf16 and one
STGAN decode took 3.1 s instead of 74 ms. ``auto`` therefore asks the hardware, not a timing trial.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")

#: oneDNN instruction-set caps (``ONEDNN_MAX_CPU_ISA``) below its bf16 instructions: under one of them
#: oneDNN emulates bf16, as on a CPU without bf16 units, whatever the CPU has.
ISA_CAPS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})
#: The environment variables that cap an instruction set: oneDNN's (and its older name), ATen's and inductor's, MKL's.
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def isa_caps() -> dict[str, str]:
    """The instruction-set caps set in the environment: oneDNN's (``ONEDNN_MAX_CPU_ISA``, or its older
    name ``DNNL_MAX_CPU_ISA``), ATen's and inductor's (``ATEN_CPU_CAPABILITY``) and MKL's
    (``MKL_ENABLE_INSTRUCTIONS``). ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
    MKL_ENABLE_INSTRUCTIONS=AVX2`` makes a Xeon compute as an AVX2-only CPU (an AMD EPYC without bf16
    units) does: the bench's stand-in for one."""
    return {name: os.environ[name].strip() for name in ISA_CAP_VARIABLES if os.environ.get(name, "").strip()}


def separate_inductor_cache() -> str | None:
    """Under an instruction-set cap (:func:`isa_caps`), point inductor at a cache directory of its own
    (``TORCHINDUCTOR_CACHE_DIR``, unless it is set) and return it; None without a cap.

    Inductor's FX graph cache keys a compiled graph on torch's version and configuration but not on the
    vector width its C++ was generated for, while the C++ is compiled for the ISA at hand. A training graph
    generated under ``ATEN_CPU_CAPABILITY=avx2`` (8-float vectors), then run without the cap on the same
    Xeon, was compiled with AVX-512's 16-float vectors: its kernels stored past their buffers and glibc
    aborted ("corrupted double-linked list"); the other way round, the capped run's training step took 1.7x
    as long (oneDNN's backward convolutions 5x slower on what those kernels wrote). Called when this module
    is imported, so every process of the project (trainer, server, compile worker, bench) and its children
    use the cap's cache."""
    caps = isa_caps()
    if not caps:
        return None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(f"{k}={v}" for k, v in sorted(caps.items())))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), "capped-" + slug)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def bf16_capped_off() -> bool:
    """Whether oneDNN's instruction-set cap stops below its bf16 instructions (:data:`ISA_CAPS_WITHOUT_BF16`)."""
    caps = isa_caps()
    cap = caps.get("ONEDNN_MAX_CPU_ISA") or caps.get("DNNL_MAX_CPU_ISA") or ""
    return cap.upper() in ISA_CAPS_WITHOUT_BF16


@functools.cache
def cpu_has_bf16_units() -> bool:
    """True where the CPU computes bf16 natively (AMX tiles or avx512-bf16) and oneDNN may use them (no
    ``ONEDNN_MAX_CPU_ISA`` cap below its bf16 instructions)."""
    if bf16_capped_off():
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        if probe is not None:
            try:
                if probe():
                    return True
            except RuntimeError:  # pragma: no cover - a build without the probe's backend
                continue
    return False


def device_has_bf16_units(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16_units()
    return False


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` where the device has bf16 units, else ``fp32``; explicit values pass through."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    return "bf16" if device_has_bf16_units(device) else "fp32"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"``, else a no-op context."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_cpu_bf16() -> str:
    """For logs and cards: which bf16 capability this CPU has."""
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    text = f"AMX {'yes' if amx else 'no'}, avx512-bf16 {'yes' if avx512_bf16 else 'no'}"
    caps = isa_caps()
    if caps:
        text += ", capped: " + " ".join(f"{k}={v}" for k, v in caps.items())
        if bf16_capped_off():
            text += " (no bf16 units in use)"
    return text


separate_inductor_cache()
