"""Process-wide state of the app: settings, the swappable model registry, detector and edit service."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from models.device import pick_device
from models.memory import retain_freed_memory
from server import paste_kernel
from server.admission import Admission
from server.compiled import compile_in_background, should_compile
from server.compute import ComputePool, run_in_own_thread
from server.config import Settings
from server.faces import FaceDetector
from server.served_models import ModelRegistry
from server.service import EditService

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    device: torch.device
    registry: ModelRegistry = field(default_factory=ModelRegistry)
    _detector: FaceDetector | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    service: EditService = field(init=False)
    compute: ComputePool = field(init=False)
    #: Set once the start-up load of weights/ has finished (or failed): requests that need a model
    #: wait for it, /healthz and /readyz never do.
    loaded: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        s = self.settings
        admission = Admission(s.max_concurrent, s.max_queue, s.queue_timeout_s)
        self.compute = ComputePool(s.compute_workers)
        self.service = EditService(
            lambda: self.registry, self.detector, s.max_pixels, s.max_faces, s.cache_size, admission, self.compute
        )

    def detector(self) -> FaceDetector:
        with self._lock:
            if self._detector is None:
                self._detector = FaceDetector(self.device, self.settings.detect_max_side, self.settings.min_face_score)
            return self._detector

    def warm_up(self) -> None:
        """Load MTCNN and run it on a portrait and a landscape photo of the size it detects at, and fit one
        alignment transform, on the compute thread, so the first user does not pay for it: oneDNN builds its
        kernels for the image pyramid's shapes on first use (portrait-1 detected 317 ms the first time and 91 ms
        the second in a fresh process on the 2-core EPYC; 102 ms after this warm-up, which took 154 ms)."""

        def run() -> None:
            import numpy as np

            from server.faces import similarity_transform

            side = self.settings.detect_max_side
            noise = np.random.default_rng(0).integers(0, 256, (side, side * 3 // 4, 3), dtype=np.uint8)
            for photo in (noise, noise.transpose(1, 0, 2)):
                self.detector().detect(np.ascontiguousarray(photo))
            # the alignment's first use imports scikit-image's transforms (0.3 s alone, seconds while the
            # start-up's other background work holds the GIL): py-spy caught a first edit waiting in it
            points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.7]])
            similarity_transform(points, points * 2 + 1)

        self.compute.run(run)

    def start_up(self) -> None:
        """The start-up load (run off the event loop): weights/, then MTCNN's warm-up."""
        try:
            self.load_models()
            if self.registry.generators:
                self.warm_up()
                paste_kernel.warm_up_in_background()  # the eager paste-back serves until it is compiled
        except Exception:  # pragma: no cover - logged; /readyz stays 503
            log.exception("loading the models failed")
        finally:
            self.loaded.set()

    def load_models(self, compile_decoders: bool = True) -> ModelRegistry:
        """Load weights/ into a new registry and swap it in whole; in-flight requests keep the old one.
        With ``compile_decoders`` (and the ``compile`` setting on), the new registry's decoders are
        then compiled in the background (:mod:`server.compiled`)."""
        s = self.settings
        # with one compute thread there are never two decoder calls to merge, and a batcher thread
        # would be a second OpenMP team (see server/compute.py)
        micro_batch = s.micro_batch if s.compute_workers > 1 else 1
        # The load runs on a thread of its own, so edits keep being served during a hot reload (and the
        # OpenMP team the load creates ends with that thread: server/compute.py); only the bf16 timing trial
        # (hardware with bf16 units, an architecture not timed yet) runs on the compute thread.
        compiling = compile_decoders and should_compile(s.compile, self.device)
        layout = served_layout(s.layout, self.device, compiling)
        new = run_in_own_thread(
            ModelRegistry.load,
            s.weights_dir,
            self.device,
            s.default_model,
            s.precision,
            s.bf16_tolerance,
            micro_batch,
            s.micro_batch_wait_ms,
            layout,
            self.compute.run,
        )
        old, self.registry = self.registry, new
        old.close()  # its batchers finish what is queued, then their threads end
        self.service.cache.clear()
        if compiling and new.generators:
            idle = self.service.admission.idle
            compile_in_background(new, self.compute.run, lambda: self.registry is new, s.compile_cache_dir, idle)
        return new


def served_layout(layout: str, device: torch.device, compiling: bool) -> str:
    """The layout the models load in: ``layout`` as set, except that ``auto`` on a CPU whose decoders will
    be compiled is channels_last without the eager trial. The compiled decoder serves the slider moves, and
    it is the faster in channels_last: on the 2-core EPYC, interleaved (40 rounds of 5, fp32), STGAN 26.8 ms
    NCHW against 24.6 ms channels_last (faster in 38 of 40 rounds), MU-GAN 27.4 against 26.8 ms (23 of 40),
    while the eager trial had picked NCHW for STGAN in some runs (bench/RESULTS.md, slider)."""
    if layout == "auto" and device.type == "cpu" and compiling:
        return "channels_last"
    return layout


def create_state(settings: Settings) -> AppState:
    if settings.cpu_threads > 0:
        torch.set_num_threads(settings.cpu_threads)
    if settings.retain_freed_mb > 0:
        retain_freed_memory(settings.retain_freed_mb << 20)
    return AppState(settings, pick_device(settings.device))
