"""The one edit code path: REST endpoint and browser UI both call :meth:`EditService.edit`.

photo bytes -> decode -> detect -> align -> classify -> encode (cached) -> decode with the requested
attribute differences -> paste back into the photo -> overlay and PNGs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.attributes import condition_vector, exclusive_groups_for
from models.generators import Encoded
from server.compute import ComputePool
from server.faces import (
    Alignment,
    Face,
    FaceDetector,
    align_face,
    compose,
    crop_footprint,
    paste_region,
    regions_box,
    tint_overlay,
)
from server.imaging import ImageError, b64_png, decode_upload, encode_png, is_jpeg
from server.registry import ModelRegistry, ServedGenerator

log = logging.getLogger(__name__)

MAX_EDITS_CHARS = 10_000


class EditError(Exception):
    def __init__(self, status: int, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


PHOTO_ID = re.compile(r"[0-9a-f]{64}")


class Admission:
    """Bounds the work in the service: ``max_running`` at once, ``max_waiting`` more queued.

    Past the bound a request is refused at once with 503 + Retry-After instead of letting memory and
    latency grow; a queued request that waits longer than ``timeout`` is refused the same way.
    """

    def __init__(self, max_running: int, max_waiting: int, timeout: float) -> None:
        self._admitted = threading.BoundedSemaphore(max_running + max_waiting)
        self._running = threading.BoundedSemaphore(max_running)
        self.timeout = timeout
        self.max_running, self.max_waiting = max_running, max_waiting
        self.rejected = 0
        self.timed_out = 0
        self.in_flight = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Admission:
        if not self._admitted.acquire(blocking=False):
            with self._lock:
                self.rejected += 1
            raise EditError(503, "the service is busy: too many edits queued, retry shortly", retry_after=1)
        if not self._running.acquire(timeout=self.timeout):
            self._admitted.release()
            with self._lock:
                self.timed_out += 1
            raise EditError(503, f"the edit waited more than {self.timeout:g} s in the queue", retry_after=2)
        with self._lock:
            self.in_flight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.in_flight -= 1
        self._running.release()
        self._admitted.release()

    def stats(self) -> dict[str, int]:
        return {
            "running_limit": self.max_running,
            "queue_limit": self.max_waiting,
            "in_flight": self.in_flight,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
        }


def parse_edits(text: str | None, attributes: tuple[str, ...]) -> dict[str, float]:
    """``{"Attribute": value}`` with value in [-1, 1]; errors name the offending key or value."""
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_EDITS_CHARS:
        raise EditError(422, f"edits is {len(text)} characters long; the limit is {MAX_EDITS_CHARS}")
    try:
        data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not allowed")))
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise EditError(422, f'edits must be a JSON object such as {{"Blond_Hair": 0.8}} ({exc})') from None
    if not isinstance(data, dict):
        raise EditError(422, "edits must be a JSON object mapping attribute names to numbers in [-1, 1]")
    unknown = [k for k in data if k not in attributes]
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise EditError(422, f"unknown attribute(s) {shown}; this model edits: {', '.join(attributes)}")
    out = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EditError(422, f"edit value for {key} must be a number, got {json.dumps(value)[:40]}")
        if not math.isfinite(value) or not -1.0 <= value <= 1.0:
            raise EditError(422, f"edit value for {key} must be a finite number in [-1, 1], got {value}")
        out[key] = float(value)
    return out


def difference_vector(
    edits: dict[str, float], attributes: tuple[str, ...], c_src: torch.Tensor, exclusive: bool = True
) -> torch.Tensor:
    """(n_attrs,) difference. Raising one hair colour lowers the others the face has (unless set)."""
    diff = torch.zeros(len(attributes))
    for name, value in edits.items():
        diff[attributes.index(name)] = value
    if exclusive:
        for group in exclusive_groups_for(list(attributes)):
            raised = [i for i in group if diff[i] > 0]
            if len(raised) != 1:
                continue
            for j in group:
                if j != raised[0] and attributes[j] not in edits and c_src[j] > 0.5:
                    diff[j] = -diff[raised[0]] * c_src[j]
    return diff


@dataclass
class FaceState:
    """Everything about one face that does not depend on the slider values."""

    face: Face | None
    alignment: Alignment | None
    crop: torch.Tensor  # (1, 3, S, S) in [-1, 1]
    probs: dict[str, float]
    c_src: torch.Tensor  # (n_attrs,) in {0, 1}
    encoded: Encoded | None = None
    reconstruction: torch.Tensor | None = None  # zero-difference output, for models without a mask head


@dataclass
class PhotoState:
    photo: np.ndarray
    faces: list[FaceState]
    #: "jpeg" for a JPEG upload, else "png": the default encoding of the answers about this photo
    source_format: str = "png"
    lock: threading.Lock = field(default_factory=threading.Lock)


class FeatureCache:
    """Bounded LRU of decoded photos, detections, crops and encoder features, with hit/miss counts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, PhotoState] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> PhotoState | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple, value: PhotoState) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def stats(self) -> dict[str, int]:
        return {"size": len(self._items), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}


@dataclass
class EditResult:
    model: str
    image: np.ndarray
    overlay: np.ndarray
    faces: list[dict[str, Any]]
    timings_ms: dict[str, float]
    cache_hit: bool
    photo_id: str = ""
    source_format: str = "png"

    def png(self) -> bytes:
        return encode_png(self.image)


class Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (now - self._t) * 1000, 2)
        self._t = now


class EditService:
    def __init__(
        self,
        registry: Callable[[], ModelRegistry],
        detector: Callable[[], FaceDetector],
        max_pixels: int,
        max_faces: int,
        cache_size: int,
        admission: Admission | None = None,
        compute: ComputePool | None = None,
    ) -> None:
        self._registry = registry
        self.compute = compute
        self._detector = detector
        self.max_pixels, self.max_faces = max_pixels, max_faces
        self.cache = FeatureCache(cache_size)
        self.admission = admission or Admission(2, 16, 30.0)

    # ------------------------------------------------------------------ helpers
    def resolve_model(self, name: str | None) -> ServedGenerator:
        reg = self._registry()
        if not reg.generators:
            raise EditError(503, "no model is loaded (no weights yet): train and export one into weights/")
        if name is None or name == "":
            if reg.default is None:  # a registry always names a default when it has generators
                raise EditError(503, "no default model is set: name one with `model`")
            return reg.generators[reg.default]
        if name not in reg.generators:
            raise EditError(422, f"unknown model {name[:60]!r}; known models: {', '.join(reg.generators)}")
        return reg.generators[name]

    def _classify(self, model: ServedGenerator, crops: torch.Tensor) -> tuple[list[dict[str, float]], torch.Tensor]:
        clf = self._registry().classifier
        attrs = model.info.attributes
        if clf is None:
            return [{} for _ in range(len(crops))], torch.zeros(len(crops), len(attrs))
        probs = clf.predict(crops)
        cols = [clf.info.attributes.index(a) if a in clf.info.attributes else -1 for a in attrs]
        out = torch.zeros(len(crops), len(attrs))
        for j, col in enumerate(cols):
            if col >= 0:
                out[:, j] = probs[:, col]
        named = [
            {a: round(float(out[i, j]), 4) for j, a in enumerate(attrs) if cols[j] >= 0} for i in range(len(crops))
        ]
        return named, (out > 0.5).float()

    def _analyse(
        self, data: bytes, content_type: str | None, model: ServedGenerator, aligned: bool, timer: Timer
    ) -> PhotoState:
        photo = decode_upload(data, self.max_pixels, content_type)
        timer.lap("decode_image")
        size = model.info.image_size
        states: list[FaceState] = []
        if aligned:
            img = torch.from_numpy(photo).permute(2, 0, 1).unsqueeze(0).float()
            crop = torch.nn.functional.interpolate(img, size=(size, size), mode="area", antialias=False) / 127.5 - 1
            crops = [(None, None, crop.clamp(-1, 1))]
            timer.lap("align")
        else:
            faces = self._detector().detect(photo)
            timer.lap("detect")
            if not faces:
                raise EditError(422, "no face found in the photo")
            if len(faces) > self.max_faces:
                keep = sorted(
                    sorted(faces, key=lambda f: -f.area)[: self.max_faces], key=lambda f: (f.box[0], f.box[1])
                )
                faces = keep
            crops = []
            for face in faces:
                crop, alignment = align_face(photo, face.landmarks, model.template, size)
                crops.append((face, alignment, crop))
            timer.lap("align")
        probs, c_src = self._classify(model, torch.cat([c for _, _, c in crops]))
        timer.lap("classify")
        for i, (face, alignment, crop) in enumerate(crops):
            states.append(FaceState(face, alignment, crop, probs[i], c_src[i]))
        return PhotoState(photo, states, "jpeg" if is_jpeg(data) else "png")

    @staticmethod
    def select_faces(spec: str | None, n: int, faces: list[FaceState]) -> list[int]:
        spec = (spec or "all").strip().lower()
        if spec == "all":
            return list(range(n))
        if spec == "largest":
            areas = [f.face.area if f.face is not None else 0 for f in faces]
            return [int(np.argmax(areas))]
        try:
            idx = sorted({int(p) for p in spec.split(",") if p.strip()})
        except ValueError:
            raise EditError(
                422, f"faces must be 'all', 'largest' or comma-separated indices, got {spec[:40]!r}"
            ) from None
        bad = [i for i in idx if not 0 <= i < n]
        if bad or not idx:
            raise EditError(422, f"face index {bad or spec!r} out of range: the photo has {n} face(s) (0..{n - 1})")
        return idx

    # ------------------------------------------------------------------ the edit
    def edit(
        self,
        data: bytes | None,
        edits_json: str | None,
        model_name: str | None = None,
        faces: str | None = "all",
        aligned: bool = False,
        content_type: str | None = None,
        want_overlay: bool = True,
        want_crops: bool = True,
        photo_id: str | None = None,
    ) -> EditResult:
        """Edit the photo ``data``, or the cached photo ``photo_id`` (returned by an earlier edit)."""
        if data is None and (photo_id is None or not PHOTO_ID.fullmatch(photo_id)):
            raise EditError(422, "send the photo as `image`, or the `photo_id` (64 hex digits) of an earlier edit")
        args = (data, edits_json, model_name, faces, aligned, content_type, want_overlay, want_crops, photo_id)
        with self.admission:
            if self.compute is None:
                return self._edit(*args)
            return self.compute.run(self._edit, *args)

    def _edit(
        self,
        data: bytes | None,
        edits_json: str | None,
        model_name: str | None,
        faces: str | None,
        aligned: bool,
        content_type: str | None,
        want_overlay: bool,
        want_crops: bool,
        photo_id: str | None,
    ) -> EditResult:
        timer = Timer()
        model = self.resolve_model(model_name)
        edits = parse_edits(edits_json, model.info.attributes)
        if data is not None:
            photo_id = hashlib.sha256(data).hexdigest()
        key = (photo_id, model.name, id(model.net), aligned)
        state = self.cache.get(key)
        cache_hit = state is not None
        if state is None:
            if data is None:
                raise EditError(404, "this photo_id is not (or no longer) cached for this model: send the image again")
            try:
                state = self._analyse(data, content_type, model, aligned, timer)
            except ImageError as exc:
                raise EditError(exc.status, exc.detail) from None
            self.cache.put(key, state)
        selected = self.select_faces(faces, len(state.faces), state.faces)
        with state.lock:
            todo = [i for i in selected if state.faces[i].encoded is None]
            if todo:
                enc = model.encode(torch.cat([state.faces[i].crop for i in todo]))
                for k, i in enumerate(todo):
                    state.faces[i].encoded = enc.select(k)
            timer.lap("encode")
            encoded = Encoded.cat([state.faces[i].encoded for i in selected])  # type: ignore[misc]
            c_src = torch.stack([state.faces[i].c_src for i in selected])
            diffs = torch.stack(
                [difference_vector(edits, model.info.attributes, state.faces[i].c_src) for i in selected]
            )
            mode = model.info.conditioning or "diff"
            out, mask = model.decode_batched(encoded, condition_vector(c_src, diffs, mode, model.info.edit_gain))
            if not model.info.mask_head:
                missing = [i for i in selected if state.faces[i].reconstruction is None]
                if missing:
                    sub = Encoded.cat([state.faces[i].encoded for i in missing])  # type: ignore[misc]
                    cs = torch.stack([state.faces[i].c_src for i in missing])
                    rec, _ = model.decode(sub, condition_vector(cs, torch.zeros_like(cs), mode))
                    for k, i in enumerate(missing):
                        state.faces[i].reconstruction = rec[k : k + 1].cpu()
            timer.lap("decode")
        out, mask = out.cpu(), mask.cpu()
        deltas = []
        for k, i in enumerate(selected):
            f = state.faces[i]
            base = f.crop if model.info.mask_head else f.reconstruction
            # with a mask head the change is exactly mask * (x_edit - x); otherwise edit - reconstruction,
            # so the model's reconstruction error never reaches the photo
            delta = out[k : k + 1] - base  # type: ignore[operator]
            if not any(edits.values()):
                delta = torch.zeros_like(delta)
            deltas.append(delta)
        box = None
        if aligned:
            image, full_mask = self._compose_aligned(state.photo, deltas, mask)
        else:
            regions = []
            for k, i in enumerate(selected):
                region = paste_region(state.photo.shape, state.faces[i].alignment, deltas[k][0], mask[k, 0])  # type: ignore[arg-type]
                if region is not None:
                    regions.append(region)
            image, full_mask = compose(state.photo, regions)
            box = regions_box(regions) or (0, 0, 0, 0)
        overlay = tint_overlay(image, full_mask, box=box) if want_overlay else image
        timer.lap("compose")
        face_out = []
        for k, i in enumerate(selected):
            f = state.faces[i]
            item: dict[str, Any] = {"index": i, "attributes": f.probs}
            if f.face is not None and f.alignment is not None:
                item |= {
                    "region": [float(v) for v in crop_footprint(f.alignment, state.photo.shape)],
                    "box": [round(v, 1) for v in f.face.box],
                    "score": round(f.face.score, 4),
                    "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in f.face.landmarks],
                }
            else:
                h, w = state.photo.shape[:2]
                item |= {"region": [0.0, 0.0, float(w), float(h)], "box": [0.0, 0.0, float(w), float(h)]}
                item |= {"score": 1.0, "landmarks": []}
            if want_crops:
                item["aligned"] = b64_png(_to_uint8(f.crop[0]))
                item["edited"] = b64_png(_to_uint8(out[k]))
                item["mask"] = b64_png((mask[k, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
            face_out.append(item)
        timer.lap("crops_png")
        return EditResult(
            model.name, image, overlay, face_out, timer.ms, cache_hit, photo_id or "", state.source_format
        )

    @staticmethod
    def _compose_aligned(
        photo: np.ndarray, deltas: list[torch.Tensor], mask: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w = photo.shape[:2]
        delta = torch.nn.functional.interpolate(deltas[0], size=(h, w), mode="bilinear", align_corners=False)[0]
        up_mask = torch.nn.functional.interpolate(mask[:1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        out = torch.from_numpy(photo).permute(2, 0, 1).float() + delta * 127.5
        return out.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy(), up_mask.clamp(0, 1).numpy()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
