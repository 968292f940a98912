"""Models served by the app: loaded once from the weights folder, in eval mode, bf16 where it pays."""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.attributes import implications_for
from models.checkpoint import CONFIG_FILE, CheckpointError, ModelInfo, load_pretrained
from models.generators import AttributeGenerator, Encoded
from models.precision import device_has_bf16_units
from server.batching import MicroBatcher
from server.faces import DEFAULT_TEMPLATE

log = logging.getLogger(__name__)


#: Largest |bf16 - fp32| of a model's output image (values in [-1, 1]) for which bf16 may serve it;
#: the server's setting ``bf16_tolerance`` overrides it.
BF16_TOLERANCE = 0.08


@dataclass
class ServedGenerator:
    name: str
    info: ModelInfo
    net: AttributeGenerator
    device: torch.device
    precision: str = "fp32"
    bf16_max_abs_diff: float | None = None
    bf16_tolerance: float = BF16_TOLERANCE  # set by choose_precision
    speedup_bf16: float | None = None
    batcher: MicroBatcher | None = None
    memory_format: torch.memory_format = torch.channels_last
    layout_ms: dict[str, float] | None = None  # the layout trial's decode p50s, when one ran
    #: The decoder compiled by :mod:`server.compiled` once it is built, checked and faster; else eager.
    compiled_decode: Callable[[Encoded, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    compile_report: dict[str, Any] | None = None

    def enable_batching(self, max_batch: int, max_wait_ms: float) -> None:
        if max_batch > 1:
            self.batcher = MicroBatcher(lambda enc, cond: self.decode(enc, cond), max_batch, max_wait_ms, self.name)

    def decode_batched(self, encoded: Encoded, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`decode`, merged with concurrent callers' rows when micro-batching is on."""
        if self.batcher is None:
            return self.decode(encoded, cond)
        return self.batcher(encoded, cond)

    @property
    def template(self) -> list[list[float]]:
        tpl = self.info.alignment_template
        return tpl["landmarks"] if tpl else DEFAULT_TEMPLATE

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoded:
        with self.autocast():
            return self.net.prepare_decode(
                self.net.encode(x.to(self.device).contiguous(memory_format=self.memory_format))
            )

    @torch.no_grad()
    def decode(self, encoded: Encoded, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decode = self.compiled_decode or self.net.decode
        with self.autocast():
            out, mask = decode(encoded, cond.to(self.device))
        return out.float(), mask.float()

    def describe(self, default: str | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": "loaded",
            "architecture": self.info.architecture,
            "attributes": list(self.info.attributes),
            # what a slider's end implies for other attributes in the training labels (the UI warns)
            "implies": implications_for(self.info.attributes),
            "image_size": self.info.image_size,
            "conditioning": self.info.conditioning,
            "learned_mask": self.info.mask_head,
            "edit_gain": self.info.edit_gain,
            # sliders calibrated on their own gain (absent: every slider uses edit_gain)
            "attribute_gains": self.info.attribute_gains,
            "default": self.name == default,
            "precision": self.precision,
            "layout": layout_name(self.memory_format),
            "layout_decode_ms": self.layout_ms,
            "compiled_decoder": self.compile_report,
            "micro_batching": None if self.batcher is None else self.batcher.stats(),
            "bf16_max_abs_diff": self.bf16_max_abs_diff,
            "metrics": summarise_metrics(self.info.metrics),
            "training": {
                k: self.info.training.get(k) for k in ("steps", "wall_hours", "images_per_s") if k in self.info.training
            },
        }


@dataclass
class ServedClassifier:
    info: ModelInfo
    net: torch.nn.Module
    device: torch.device

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, n_attrs) for aligned faces in [-1, 1]."""
        size = self.info.image_size
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
        logits = self.net(x.to(self.device).contiguous(memory_format=torch.channels_last))
        return torch.sigmoid(logits.float()).cpu()


def summarise_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for split, m in metrics.items():
        if isinstance(m, dict):
            out[split] = {
                k: m[k] for k in ("psnr", "ssim", "mean_edit_success", "mean_preservation", "n_images") if k in m
            }
            if "edit_success" in m:
                out[split]["edit_success"] = m["edit_success"]
    return out


def run_here(fn: Callable[..., Any], *args: Any) -> Any:
    """A ``run_timed`` that runs ``fn`` in the calling thread."""
    return fn(*args)


@dataclass
class ModelRegistry:
    """A snapshot of what is served; a reload builds a new one and swaps it in whole."""

    generators: dict[str, ServedGenerator] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    classifier: ServedClassifier | None = None
    default: str | None = None
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def load(
        cls,
        weights_dir: Path,
        device: torch.device,
        default: str | None = None,
        precision: str = "auto",
        bf16_tolerance: float = BF16_TOLERANCE,
        micro_batch: int = 8,
        micro_batch_wait_ms: float = 5.0,
        layout: str = "auto",
        run_timed: Callable[..., Any] = run_here,
    ) -> ModelRegistry:
        """``run_timed`` runs the bf16 timing trial (:func:`choose_precision`)."""
        reg = cls()
        folders = (
            sorted(p for p in Path(weights_dir).glob("*") if (p / CONFIG_FILE).is_file())
            if Path(weights_dir).is_dir()
            else []
        )
        for folder in folders:
            try:
                net, info = load_pretrained(folder, device)
            except (CheckpointError, ValueError, TypeError, RuntimeError) as exc:
                reg.failed[folder.name] = str(exc)
                log.error("model %s failed to load: %s", folder.name, exc)
                continue
            # Frozen: nothing served needs gradients, and under bf16 autocast the casts of weights that require
            # grad are kept in autocast's process-wide cache. Leaving autocast, an edit cleared that cache holding its
            # mutex, and freeing the casts' autograd nodes waited for the GIL, which a background compile held
            # while it waited for the mutex (its traced conv2d casting through the cache): the server hung
            # (py-spy --native, EPYC with avx512-bf16, 1 compute thread, 4 clients). Frozen weights are never cached.
            net = net.float().to(memory_format=torch.channels_last).eval().requires_grad_(False)
            if info.kind == "classifier":
                if reg.classifier is None or folder.name == "classifier":
                    reg.classifier = ServedClassifier(info, net, device)
                continue
            if info.kind != "generator":
                continue
            served = ServedGenerator(folder.name, info, net, device)  # type: ignore[arg-type]
            choose_precision(served, precision, bf16_tolerance, run_timed)
            choose_layout(served, layout)
            served.enable_batching(micro_batch, micro_batch_wait_ms)
            reg.generators[folder.name] = served
            log.info(
                "loaded %s (%s, %s, %s)",
                folder.name,
                info.architecture,
                served.precision,
                layout_name(served.memory_format),
            )
        if default and default in reg.generators:
            reg.default = default
        elif default and reg.generators:
            log.warning("default model %r is not loaded; using %s", default, next(iter(reg.generators)))
        if reg.default is None and reg.generators:
            preferred = [n for n in ("stgan", "mugan") if n in reg.generators]
            reg.default = preferred[0] if preferred else next(iter(reg.generators))
        if not reg.generators:
            log.warning("no weights yet: no generator could be loaded from %s", weights_dir)
        return reg

    def close(self) -> None:
        for g in self.generators.values():
            if g.batcher is not None:
                g.batcher.close()

    def describe(self) -> list[dict[str, Any]]:
        out = [g.describe(self.default) for g in self.generators.values()]
        out += [{"name": n, "state": "failed", "error": e} for n, e in self.failed.items()]
        return out


# (architecture config, device, threads) -> bf16's speed-up over fp32 in the first timing trial. A hot reload of
# the same architecture only checks that bf16 agrees with fp32 for the new weights (one untimed decode in
# each precision), so edits are not held up by a trial: on the 2-core EPYC with avx512-bf16 two reloads
# that timed both models again held edits up to 2.3 s (bench/RESULTS.md, start-up and hot reload).
_PRECISION_DECISIONS: dict[str, float] = {}


def decision_key(architecture: str, config: Any, device: torch.device) -> str:
    """What a timing decision (precision, layout) depends on: the network's shape, the device, the threads."""
    return json.dumps([architecture, config, str(device), torch.get_num_threads()], sort_keys=True, default=str)


def _time_precisions(
    served: ServedGenerator, x: torch.Tensor, cond: torch.Tensor, rounds: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each precision's output image for ``x`` under ``cond`` and, with ``rounds``, the seconds of ``rounds``
    encode + decode passes after a warm-up (the first pass)."""
    timings, outputs = {}, {}
    for p in ("fp32", "bf16"):
        served.precision = p
        outputs[p] = served.decode(served.encode(x), cond)[0]
        if rounds:
            t0 = time.perf_counter()
            for _ in range(rounds):
                outputs[p] = served.decode(served.encode(x), cond)[0]
            timings[p] = time.perf_counter() - t0
    return timings, outputs


def choose_precision(
    served: ServedGenerator, precision: str, tolerance: float, run_timed: Callable[..., Any] = run_here
) -> None:
    """bf16 autocast if asked, or (auto) if it is faster on this device and agrees with fp32.

    ``auto`` on a device without bf16 units (a CPU with neither AMX nor avx512-bf16) stays fp32
    without a trial: there bf16 is emulated, one decode took 3 s instead of 74 ms, and the trial
    alone cost 17 s of start-up per model. The speed is timed once per architecture
    (:data:`_PRECISION_DECISIONS`), through ``run_timed`` (the server's compute thread, so the timing
    does not race edits for the cores); the agreement with fp32 is checked for every load, where it runs.
    """
    served.bf16_tolerance = tolerance
    if precision == "fp32" or served.device.type not in ("cpu", "cuda"):
        return
    if precision == "auto" and not device_has_bf16_units(served.device):
        served.precision = "fp32"
        log.info("%s: fp32 (this %s has no bf16 units; no bf16 trial)", served.name, served.device.type)
        return
    key = decision_key(served.info.architecture, served.info.config, served.device)
    timed = key not in _PRECISION_DECISIONS
    size = served.info.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, size, size, generator=g) * 2 - 1
    cond = torch.randint(-1, 2, (4, len(served.info.attributes)), generator=g).float()
    if timed:
        timings, outputs = run_timed(_time_precisions, served, x, cond, 3)
        _PRECISION_DECISIONS[key] = round(timings["fp32"] / timings["bf16"], 2)
    else:
        outputs = _time_precisions(served, x, cond, 0)[1]
    diff = float((outputs["bf16"] - outputs["fp32"]).abs().max())
    served.bf16_max_abs_diff = round(diff, 5)
    served.speedup_bf16 = _PRECISION_DECISIONS[key]
    ok = diff <= tolerance
    served.precision = "bf16" if precision == "bf16" or (ok and served.speedup_bf16 > 1) else "fp32"
    log.info(
        "%s: bf16 max |diff| %.4f (tolerance %.3f), speed-up %.2fx (%s) -> %s",
        served.name,
        diff,
        tolerance,
        served.speedup_bf16,
        "timed" if timed else "timed at an earlier load",
        served.precision,
    )


LAYOUTS: dict[str, torch.memory_format] = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# (architecture config, device, threads) -> the layout the fp32 trial chose: a hot reload of
# the same architecture reuses it instead of timing decodes again while clients are being served.
_LAYOUT_DECISIONS: dict[str, tuple[str, dict[str, float]]] = {}


def layout_name(memory_format: torch.memory_format) -> str:
    return next(name for name, fmt in LAYOUTS.items() if fmt == memory_format)


def set_layout(served: ServedGenerator, name: str) -> None:
    served.memory_format = LAYOUTS[name]
    served.net.to(memory_format=served.memory_format)


def decode_ms(served: ServedGenerator, rounds: int = 3) -> dict[str, float]:
    """Median decoder time (ms, batch 1, cached encoding: a slider move) in each layout, on a copy of
    the network per layout (so no weights are converted back and forth), interleaved so that load
    from other processes hits both alike."""
    size = served.info.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=g, device=served.device) * 2 - 1
    cond = torch.zeros(1, len(served.info.attributes), device=served.device)
    cond[0, 0] = 1.0
    nets, encoded = {}, {}
    with torch.no_grad():
        for name, fmt in LAYOUTS.items():
            nets[name] = copy.deepcopy(served.net).to(memory_format=fmt)
            encoded[name] = nets[name].prepare_decode(nets[name].encode(x.contiguous(memory_format=fmt)))
            nets[name].decode(encoded[name], cond)  # warm-up: oneDNN builds its kernels for this layout
        times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(rounds):
            for name in LAYOUTS:
                t0 = time.perf_counter()
                nets[name].decode(encoded[name], cond)
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: round(statistics.median(ms), 2) for name, ms in times.items()}


def choose_layout(
    served: ServedGenerator, layout: str, timer: Callable[[ServedGenerator], dict[str, float]] = decode_ms
) -> None:
    """Memory layout of the served network: ``channels_last`` or ``contiguous`` (NCHW) when asked;
    ``auto``: channels_last on CUDA and under bf16 (the layout oneDNN's bf16 kernels want), and on a
    CPU in fp32 the faster of the two in a timing trial. Neither wins everywhere, nor for good: on an
    AMD EPYC without bf16 units MU-GAN's decoder was faster in channels_last, STGAN's 13 % faster in
    NCHW one day and 7 % slower the next (bench/slider.py)."""
    if layout != "auto":
        set_layout(served, layout)
        return
    if served.device.type != "cpu" or served.precision == "bf16":
        set_layout(served, "channels_last")
        return
    key = decision_key(served.info.architecture, served.info.config, served.device)
    if key not in _LAYOUT_DECISIONS:
        ms = timer(served)
        _LAYOUT_DECISIONS[key] = (min(ms, key=ms.__getitem__), ms)
        log.info("%s: decoder %s ms per layout -> %s", served.name, ms, _LAYOUT_DECISIONS[key][0])
    name, served.layout_ms = _LAYOUT_DECISIONS[key]
    set_layout(served, name)
