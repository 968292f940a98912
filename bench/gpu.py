"""Benchmark 7 — the CUDA paths (issue 15's GPU rows): the decoder's latency, the server's edit path under
concurrent clients with micro-batching, whole photos (detection, alignment, paste-back), and a training step
of both presets, all on one device.

It needs torch, numpy, Pillow and numba, which the lent GPU machine has, and pydantic (models/config.py) and
facenet-pytorch, which ``bench/gpu.sh`` carries there as wheels with two photos of ../shared: the HTTP layer's
packages (FastAPI, …) would not fit beside the weights in what may travel there (64 MiB). So the edit path is
driven in-process through ``server.service.EditService``, the code behind ``/v1/edit`` (compute threads,
micro-batching, the feature cache, the detector, paste-back), by client threads sending synthetic aligned
128-px crops, as ``bench/throughput.py`` sends them over HTTP (speed does not depend on the pixels), and by
whole photos answered as the README's call is. Each part's table goes to ``--out`` as soon as it is measured,
and a part that fails is written down with its error instead of ending the run, so one run on a lent GPU
brings back all it could measure.

Each part also checks the device against the CPU: the decoder's output (fp32, the same weights), one aligned
edit and each photo's edit through the service (faces found, the largest difference in output pixel values).

On a lent GPU, as one prepared command: ``bash bench/gpu.sh prepare`` here, then the device tool's ``run``
of ``bash bench/gpu.sh run`` carrying ``.gpu-carry`` (timeout 540 s: the compiled decoders come last, so a
run cut short keeps the other parts). A smoke run on the CPU: ``python bench/gpu.py --device cpu --quick``.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import EDIT_SETUPS, PHOTOS, ROOT, machine, machine_kind, summary, table, time_ms
from bench.run_all import for_machine
from models.checkpoint import CONFIG_FILE, load_pretrained, read_config
from models.device import pick_device
from models.precision import autocast, device_has_bf16_units

log = logging.getLogger(__name__)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """:func:`bench.common.time_ms` of ``fn`` with the device synchronised after each call (a CUDA call
    returns before its kernels finish)."""

    def call() -> None:
        fn()
        synchronize(device)

    return time_ms(call, repeats, warmup=5)


def served_layout_for(device: torch.device) -> torch.memory_format:
    """channels_last on a GPU (cuDNN's fast layout for these convs); NCHW for a CPU smoke run."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def precisions_for(device: torch.device) -> tuple[str, ...]:
    return ("fp32", "bf16") if device_has_bf16_units(device) else ("fp32",)


def generator_folders(weights: Path) -> list[Path]:
    folders = sorted(p for p in weights.iterdir() if (p / CONFIG_FILE).is_file())
    return [f for f in folders if read_config(f).get("kind") == "generator"]


# ---------------------------------------------------------------------------- 1. the decoder
def decoder_section(weights: Path, device: torch.device, repeats: int) -> str:
    """Slider-move latency (encoder features cached, decoder only) at batch 1 and 16 per served model and
    precision (eager); the fp32 output against the CPU's."""
    rows: list[list[Any]] = []
    for folder in generator_folders(weights):
        net_cpu, info = load_pretrained(folder)
        net_cpu = net_cpu.float().eval()
        net, _ = load_pretrained(folder, device)
        layout = served_layout_for(device)
        net = net.float().eval().to(memory_format=layout)
        g = torch.Generator().manual_seed(0)
        for batch in (1, 16):
            x = torch.rand(batch, 3, info.image_size, info.image_size, generator=g) * 2 - 1
            cond = torch.randint(-1, 2, (batch, len(info.attributes)), generator=g).float()
            x_dev, cond_dev = x.to(device).contiguous(memory_format=layout), cond.to(device)
            with torch.no_grad():
                want = net_cpu.decode(net_cpu.prepare_decode(net_cpu.encode(x)), cond)[0]
            for precision in precisions_for(device):
                step = decode_step(net, x_dev, cond_dev, device, precision)
                ms = timed_ms(step, device, repeats)
                diff = float((step()[0].float().cpu() - want).abs().max())
                p50, p95 = summary(ms)
                rows.append([folder.name, batch, precision, "eager", p50, p95, f"{diff:.1e}"])
    header = ["model", "batch", "precision", "decoder", "p50 ms", "p95 ms", "max abs diff vs CPU fp32"]
    return "#### Decoder on the device (slider move)\n\n" + table(header, rows) + "\n"


def decode_step(
    net: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor, device: torch.device, precision: str
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A slider move: ``x`` encoded (and prepared) once, then each call decodes it under ``cond``."""
    with torch.no_grad(), autocast(device, precision):
        enc = net.prepare_decode(net.encode(x))  # type: ignore[operator]

    def step() -> tuple[torch.Tensor, ...]:
        with torch.no_grad(), autocast(device, precision):
            return net.decode(enc, cond)  # type: ignore[operator]

    return step


def compiled_section(weights: Path, device: torch.device, repeats: int) -> str:
    """The server's compiled decoder (``server/compiled.py``, as with ``FACE_EDITOR_COMPILE=decoder``) at
    batch 1, per served model: the last part, as its compiles take the longest (one compile thread)."""
    rows = [row for folder in generator_folders(weights) for row in compiled_rows(folder, device, repeats)]
    header = ["model", "batch", "precision", "decoder", "p50 ms", "p95 ms"]
    return "#### Compiled decoder on the device (slider move)\n\n" + table(header, rows) + "\n"


def compiled_rows(folder: Path, device: torch.device, repeats: int) -> list[list[Any]]:
    from server.compiled import build_compiled_decoder
    from server.served_models import BF16_TOLERANCE, ServedGenerator, choose_precision

    net, info = load_pretrained(folder, device)
    layout = served_layout_for(device)
    served = ServedGenerator(folder.name, info, net.float().eval().to(memory_format=layout), device)
    choose_precision(served, "auto", BF16_TOLERANCE)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:  # compiled anew, not loaded from an earlier run
        decode = build_compiled_decoder(served, Path(cache))
    compile_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, info.image_size, info.image_size, generator=g) * 2 - 1).to(device)
    cond = torch.zeros(1, len(info.attributes), device=device)
    cond[0, 0] = 1.0
    enc = served.encode(x)

    def step() -> None:
        with torch.no_grad(), served.autocast():
            decode(enc, cond)

    ms = timed_ms(step, device, repeats)
    note = f"compiled in {compile_s:.0f} s"
    return [[folder.name, 1, served.precision, note, *summary(ms)]]


# ---------------------------------------------------------------------------- 2. the edit path
def crop_png(seed: int, size: int = 128) -> bytes:
    """A smooth synthetic face-sized crop (PNG): the edit path's speed does not depend on its pixels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    arr = (img[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def build_service(
    weights: Path,
    device: torch.device,
    workers: int,
    micro_batch: int,
    precision: str = "auto",
    detect: bool = False,
) -> tuple[Any, Any, Any]:
    """An EditService over ``weights`` on ``device``, assembled as server/state.py assembles it (the
    settings' defaults); ``detect``: with the MTCNN face detector on ``device`` (needs facenet-pytorch)."""
    from server.admission import Admission
    from server.compute import ComputePool
    from server.served_models import BF16_TOLERANCE, ModelRegistry
    from server.service import EditService

    compute = ComputePool(workers)
    load = ModelRegistry.load
    registry = compute.run(load, weights, device, None, precision, BF16_TOLERANCE, micro_batch, 5.0, "auto")

    detector = None
    if detect:
        from server.faces import FaceDetector

        detector = compute.run(FaceDetector, device, 640, 0.9)

    def get_detector() -> Any:
        if detector is None:
            raise RuntimeError("aligned crops only: this service has no face detector")
        return detector

    service = EditService(lambda: registry, get_detector, 40_000_000, 16, 256, Admission(16, 64, 60.0), compute)
    return service, registry, compute


def edit_once(service: Any, data: bytes, value: float) -> Any:
    from server.service import EditRequest

    req = EditRequest(image=data, edits={"Eyeglasses": value}, aligned=True, content_type="image/png", crops=False)
    result = service.edit(req)
    result.png()  # the answer with Accept: image/png
    return result


def clients_rate(service: Any, clients: int, seconds: float) -> tuple[float, float, int]:
    """(edits/s, p50 ms, failures) of ``clients`` threads editing their own crops for ``seconds``."""
    crops = [crop_png(k) for k in range(clients)]
    for data in crops:  # features cached, as after a client's first request
        edit_once(service, data, 0.0)
    done, failed, latencies = [0], [0], []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(k: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                edit_once(service, crops[k], (i % 10) / 10)
            except Exception:
                with lock:
                    failed[0] += 1
                continue
            with lock:
                done[0] += 1
                latencies.append((time.perf_counter() - t0) * 1000)
            i += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = done[0] / (time.monotonic() - t0)
    return rate, statistics.median(latencies) if latencies else float("nan"), failed[0]


def device_vs_cpu_edit(service: Any, weights: Path) -> int:
    """The largest pixel difference (of 255) between one edit through ``service`` and the same edit
    through an fp32 service on the CPU."""
    got = edit_once(service, crop_png(99), 0.8).image.astype(np.int16)
    cpu_service, cpu_registry, cpu_compute = build_service(weights, torch.device("cpu"), 1, 1, "fp32")
    try:
        want = edit_once(cpu_service, crop_png(99), 0.8).image.astype(np.int16)
    finally:
        cpu_registry.close()
        cpu_compute.close()
    return int(np.abs(got - want).max())


def edit_path_section(weights: Path, device: torch.device, seconds: float, clients: tuple[int, ...]) -> str:
    rows: list[list[Any]] = []
    note = ""
    for label, workers, micro_batch in EDIT_SETUPS:
        service, registry, compute = build_service(weights, device, workers, micro_batch)
        try:
            if not note:  # the first set-up's service stands for all three
                served = registry.generators[registry.default]
                note = (
                    f"Default model {served.name} ({served.precision}); aligned crops, PNG answers, in-process "
                    f"clients. One edit on the device against the same edit on the CPU (fp32): largest pixel "
                    f"difference {device_vs_cpu_edit(service, weights)} of 255."
                )
            for n in clients:
                rate, p50, failed = clients_rate(service, n, seconds)
                rows.append([label, n, rate, p50, failed])
        finally:
            registry.close()
            compute.close()
    header = ["service", "clients", "edits/s", "p50 latency ms", "failed"]
    title = "#### The edit path on the device (EditService)"
    return f"{title}\n\n{note}\n\n" + table(header, rows) + "\n"


def photo_section(weights: Path, device: torch.device, photos: list[Path], cold_runs: int, repeats: int) -> str:
    """Whole photos through the service with the detector on the device, answered as the README's call is
    (a JPEG upload: JPEG q95 image and overlay): first request (the cache cleared) and the same photo again,
    p50 and the stages; then each photo's edit against the CPU's (faces found, largest pixel difference)."""
    from server.imaging import JPEG_QUALITY_FULL, encode_jpeg
    from server.service import EditRequest

    def edit(service: Any, data: bytes) -> Any:
        req = EditRequest(image=data, edits={"Blond_Hair": 0.8}, content_type="image/jpeg")
        result = service.edit(req)
        encode_jpeg(result.image, JPEG_QUALITY_FULL)
        encode_jpeg(result.overlay, JPEG_QUALITY_FULL)
        return result

    rows: list[list[Any]] = []
    checks: list[str] = []
    service, registry, compute = build_service(weights, device, 1, 1, detect=True)
    cpu_service, cpu_registry, cpu_compute = build_service(weights, torch.device("cpu"), 1, 1, "fp32", detect=True)
    try:
        for photo in photos:
            data = photo.read_bytes()
            runs: dict[str, list[float]] = {"first request": [], "again (cache hit)": []}
            stages: dict[str, dict[str, float]] = {}
            for _ in range(cold_runs):
                service.cache.clear()
                for kind, n in (("first request", 1), ("again (cache hit)", repeats)):
                    for _ in range(n):
                        t0 = time.perf_counter()
                        result = edit(service, data)
                        runs[kind].append((time.perf_counter() - t0) * 1000)
                        stages[kind] = result.timings_ms
            for kind, ms in runs.items():
                stage_text = ", ".join(f"{k} {v:.0f}" for k, v in stages[kind].items())
                rows.append([photo.name, kind, *summary(ms), stage_text])
            got, want = edit(service, data), edit(cpu_service, data)
            same_size = got.image.shape == want.image.shape
            diff = int(np.abs(got.image.astype(np.int16) - want.image.astype(np.int16)).max()) if same_size else -1
            checks.append(
                f"{photo.name}: {len(got.faces)} faces (CPU {len(want.faces)}), largest pixel difference {diff}"
            )
    finally:
        for reg, pool in ((registry, compute), (cpu_registry, cpu_compute)):
            reg.close()
            pool.close()
    header = ["photo", "request", "p50 ms", "p95 ms", "stages of the last, ms"]
    title = "#### Whole photos on the device (detector, alignment, paste-back; JPEG answers)"
    note = "Against the CPU (fp32): " + "; ".join(checks) + "."
    return f"{title}\n\n{note}\n\n" + table(header, rows) + "\n"


# ---------------------------------------------------------------------------- 3. training
#: The training presets timed: the served models' (generator preset, overrides of TrainConfig).
TRAIN_PRESETS: tuple[tuple[str, dict[str, Any]], ...] = (("stgan-cpu", {}), ("mugan-cpu", {}))


def training_section(
    device: torch.device,
    steps: int,
    batches: tuple[int, ...],
    presets: tuple[tuple[str, dict[str, Any]], ...] = TRAIN_PRESETS,
    size: int = 128,
) -> str:
    from training.config import TrainConfig
    from training.data import prepare_cache
    from training.synthetic import make_celeba_folder
    from training.trainer import Trainer

    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_celeba_folder(Path(tmp) / "data", n=2 * max(batches), size=size)
        cache = Path(tmp) / "cache"
        prepare_cache(folder, cache, image_size=size)
        for preset, overrides in presets:
            for batch in batches:
                for precision in precisions_for(device):
                    cfg = TrainConfig(
                        preset=preset,
                        cache_dir=str(cache),
                        batch_size=batch,
                        precision=precision,
                        device=str(device),
                        eval_every=10**9,
                        sample_every=10**9,
                        classifier=str(Path(tmp) / "none"),
                        # on a CPU (a smoke run) without the generator pass's compile, minutes with an
                        # empty inductor cache; bench/train_ab.py times the CPU's training with it
                        compile_generator="auto" if device.type == "cuda" else "off",
                        **overrides,
                    )
                    trainer = Trainer(cfg, Path(tmp) / f"run-{preset}-{batch}-{precision}")
                    for _ in range(3):  # warm-up, lazy R1 at step 0 included
                        trainer.train_step()
                    synchronize(device)
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        trainer.train_step()
                    synchronize(device)
                    dt = (time.perf_counter() - t0) / steps
                    rows.append([preset, batch, precision, batch / dt, dt * 1000])
    header = ["preset", "batch", "precision", "images/s", "ms/step"]
    return "#### Training step on the device (G + D)\n\n" + table(header, rows) + "\n"


# ---------------------------------------------------------------------------- the run
def run(
    weights: Path,
    device: torch.device,
    *,
    repeats: int = 100,
    seconds: float = 5.0,
    clients: tuple[int, ...] = (1, 4, 16),
    train_steps: int = 10,
    train_batches: tuple[int, ...] = (16, 64),
    train_presets: tuple[tuple[str, dict[str, Any]], ...] = TRAIN_PRESETS,
    train_size: int = 128,
    compiled: bool = True,
    photos: tuple[Path, ...] = (),
    photo_runs: tuple[int, int] = (3, 5),
    out: Path | None = None,
) -> str:
    """Every part in turn; the document so far is written to ``out`` after each part."""
    parts: list[tuple[str, Callable[[], str]]] = [
        ("decoder", lambda: decoder_section(weights, device, repeats)),
        ("edit path", lambda: edit_path_section(weights, device, seconds, clients)),
    ]
    if photos:
        parts.append(("whole photos", lambda: photo_section(weights, device, list(photos), *photo_runs)))
    parts.append(("training", lambda: training_section(device, train_steps, train_batches, train_presets, train_size)))
    if compiled:
        parts.append(("compiled decoder", lambda: compiled_section(weights, device, repeats)))
    doc = f"### CUDA paths\n\n{machine()}; device {describe(device)}\n"
    for name, part in parts:
        t0 = time.perf_counter()
        try:
            doc += "\n" + part().rstrip("\n") + "\n"
        except Exception:
            log.exception("%s failed", name)
            doc += f"\n#### {name}: failed\n\n```\n{traceback.format_exc()[-3000:]}```\n"
        log.info("%s took %.0f s", name, time.perf_counter() - t0)
        if out is not None:  # titled with the machine's kind, as run_all titles RESULTS.md's sections
            out.write_text(for_machine(doc, machine_kind()))
    return doc


#: A smoke run's settings (``--quick``): a few repeats, short client runs, one tiny training step.
QUICK: dict[str, Any] = {
    "repeats": 3,
    "seconds": 0.5,
    "clients": (1, 4),
    "train_steps": 1,
    "train_batches": (4,),
    "compiled": False,
    "photo_runs": (1, 2),
}


def run_for_results(weights: Path, quick: bool = False) -> str:
    """The section for bench/RESULTS.md (``run_all.py --only cuda``), on the CUDA device."""
    return run(weights, torch.device("cuda"), photos=default_photos(), **(QUICK if quick else {}))


def default_photos() -> tuple[Path, ...]:
    """The demo photos of ../shared, else those ``bench/gpu.sh prepare`` put beside the wheels: a portrait and
    the six-face group (the micro-batched decode of several faces)."""
    names = ("portrait-2.jpg", "group-six-faces.jpg")
    for folder in (PHOTOS, ROOT / ".gpu-carry" / "photos"):
        found = tuple(folder / n for n in names if (folder / n).is_file())
        if found:
            return found
    return ()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{device.type} (a smoke run: no GPU)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path(__file__).resolve().parents[1] / "weights")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:1, cpu")
    p.add_argument("--out", type=Path, help="write the Markdown here after each part")
    p.add_argument("--quick", action="store_true", help="a smoke run: few repeats, short client runs, tiny steps")
    p.add_argument("--photos", type=Path, nargs="*", help="whole photos to edit (default: a portrait, six faces)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = pick_device(args.device)
    photos = tuple(args.photos) if args.photos is not None else default_photos()
    doc = run(args.weights, device, photos=photos, out=args.out, **(QUICK if args.quick else {}))
    log.info("\n%s", doc)


if __name__ == "__main__":
    main()
