"""The one edit code path: the REST endpoint, the Gradio page and the batch CLI all call
:meth:`EditService.edit` with an :class:`EditRequest`.

photo bytes -> decode -> detect -> align -> classify -> encode (cached) -> decode with the requested
attribute differences -> paste back into the photo -> overlay and crops.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from models.attributes import condition_vector
from models.generators import Encoded
from server.admission import Admission
from server.cache import FaceState, FeatureCache, PhotoState
from server.compute import ComputePool
from server.edits import difference_vector, parse_edits, select_faces
from server.errors import InvalidRequestError, NoFaceFoundError, PhotoNotCachedError, UnavailableError
from server.faces import (
    FaceDetector,
    align_face,
    compose_faces,
    crop_footprint,
    paste_source,
    tint_overlay,
)
from server.imaging import b64_png, decode_upload, encode_png, is_jpeg
from server.served_models import ModelRegistry, ServedGenerator

PHOTO_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """One edit. ``image`` (the photo's bytes) or ``photo_id`` (from an earlier result) names the photo."""

    image: bytes | None = None
    photo_id: str | None = None
    #: ``{"Attribute": value in [-1, 1]}`` as JSON text or a mapping; empty: no change
    edits: str | Mapping[str, object] | None = None
    #: a served model's name; None: the default model
    model: str | None = None
    #: ``all``, ``largest`` or comma-separated face indices
    faces: str = "all"
    #: the photo is already an aligned face crop: no detection
    aligned: bool = False
    #: the upload's declared content type, checked against the accepted formats
    content_type: str | None = None
    #: also compose the mask overlay on the photo
    overlay: bool = True
    #: also encode each face's aligned crop, edited crop and mask (base64 PNG)
    crops: bool = True


@dataclass(frozen=True)
class FaceEdit:
    """One edited face. Boxes and regions are ``[x0, y0, x1, y1]`` in photo pixels."""

    index: int
    attributes: dict[str, float]
    region: list[float]
    box: list[float]
    score: float
    landmarks: list[list[float]]
    aligned: str = ""  # base64 PNGs, empty unless the request asked for crops
    edited: str = ""
    mask: str = ""


@dataclass
class EditResult:
    model: str
    image: np.ndarray
    overlay: np.ndarray
    faces: list[FaceEdit]
    timings_ms: dict[str, float]
    cache_hit: bool
    photo_id: str = ""
    #: "jpeg" when the photo was uploaded as JPEG, else "png": the default encoding of the answer
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
            raise UnavailableError("no model is loaded (no weights yet): train and export one into weights/")
        if name is None or name == "":
            if reg.default is None:  # a registry always names a default when it has generators
                raise UnavailableError("no default model is set: name one with `model`")
            return reg.generators[reg.default]
        if name not in reg.generators:
            raise InvalidRequestError(f"unknown model {name[:60]!r}; known models: {', '.join(reg.generators)}")
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
        if aligned:
            img = torch.from_numpy(photo).permute(2, 0, 1).unsqueeze(0).float()
            crop = torch.nn.functional.interpolate(img, size=(size, size), mode="area", antialias=False) / 127.5 - 1
            crops = [(None, None, crop.clamp(-1, 1))]
            timer.lap("align")
        else:
            faces = self._detector().detect(photo)
            timer.lap("detect")
            if not faces:
                raise NoFaceFoundError("no face found in the photo")
            if len(faces) > self.max_faces:  # the largest ones, still left to right
                faces = sorted(
                    sorted(faces, key=lambda f: -f.area)[: self.max_faces], key=lambda f: (f.box.x0, f.box.y0)
                )
            crops = []
            for face in faces:
                crop, alignment = align_face(photo, face.landmarks, model.template, size)
                crops.append((face, alignment, crop))
            timer.lap("align")
        probs, c_src = self._classify(model, torch.cat([c for _, _, c in crops]))
        timer.lap("classify")
        states = [
            FaceState(face, alignment, crop, probs[i], c_src[i]) for i, (face, alignment, crop) in enumerate(crops)
        ]
        return PhotoState(photo, states, "jpeg" if is_jpeg(data) else "png")

    # ------------------------------------------------------------------ the edit
    def edit(self, request: EditRequest) -> EditResult:
        """Edit the photo ``request.image``, or the cached photo ``request.photo_id``."""
        if request.image is None and (request.photo_id is None or not PHOTO_ID.fullmatch(request.photo_id)):
            raise InvalidRequestError("send the photo as `image`, or the `photo_id` (64 hex digits) of an earlier edit")
        with self.admission:
            if self.compute is None:
                return self._edit(request)
            return self.compute.run(self._edit, request)

    def _state(self, request: EditRequest, model: ServedGenerator, timer: Timer) -> tuple[PhotoState, str, bool]:
        """The photo's cached analysis (or a new one), its id, and whether it came from the cache."""
        photo_id = hashlib.sha256(request.image).hexdigest() if request.image is not None else request.photo_id or ""
        key = (photo_id, model.name, id(model.net), request.aligned)
        state = self.cache.get(key)
        if state is not None:
            return state, photo_id, True
        if request.image is None:
            raise PhotoNotCachedError("this photo_id is not (or no longer) cached for this model: send the image again")
        state = self._analyse(request.image, request.content_type, model, request.aligned, timer)
        self.cache.put(key, state)
        return state, photo_id, False

    def _edit(self, request: EditRequest) -> EditResult:
        timer = Timer()
        model = self.resolve_model(request.model)
        edits = parse_edits(request.edits, model.info.attributes)
        state, photo_id, cache_hit = self._state(request, model, timer)
        areas = [f.face.area if f.face is not None else 0.0 for f in state.faces]
        selected = select_faces(request.faces, areas)
        with state.lock:
            out, mask = self._decode(model, state, selected, edits, timer)
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
        if request.aligned:
            image, full_mask = self._compose_aligned(state.photo, deltas, mask)
            overlay = tint_overlay(image, full_mask) if request.overlay else image
        else:
            sources = []
            for k, i in enumerate(selected):
                source = paste_source(state.photo.shape, state.faces[i].alignment, deltas[k][0], mask[k, 0])  # type: ignore[arg-type]
                if source is not None:
                    sources.append(source)
            image, overlay = compose_faces(state.photo, sources, request.overlay)
        timer.lap("compose")
        faces = [self._face_edit(i, state, out[k], mask[k, 0], request.crops) for k, i in enumerate(selected)]
        timer.lap("crops_png")
        return EditResult(model.name, image, overlay, faces, timer.ms, cache_hit, photo_id, state.source_format)

    @staticmethod
    def _decode(
        model: ServedGenerator, state: PhotoState, selected: list[int], edits: dict[str, float], timer: Timer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the faces not encoded yet, then decode the selected ones with the edits (call under
        ``state.lock``). Models without a mask head also get their zero-edit reconstruction cached."""
        todo = [i for i in selected if state.faces[i].encoded is None]
        if todo:
            enc = model.encode(torch.cat([state.faces[i].crop for i in todo]))
            for k, i in enumerate(todo):
                state.faces[i].encoded = enc.select(k)
        timer.lap("encode")
        encoded = Encoded.cat([state.faces[i].encoded for i in selected])  # type: ignore[misc]
        c_src = torch.stack([state.faces[i].c_src for i in selected])
        diffs = torch.stack([difference_vector(edits, model.info.attributes, state.faces[i].c_src) for i in selected])
        mode = model.info.conditioning or "diff"
        out, mask = model.decode_batched(encoded, condition_vector(c_src, diffs, mode, model.info.gains()))
        if not model.info.mask_head:
            missing = [i for i in selected if state.faces[i].reconstruction is None]
            if missing:
                sub = Encoded.cat([state.faces[i].encoded for i in missing])  # type: ignore[misc]
                cs = torch.stack([state.faces[i].c_src for i in missing])
                rec, _ = model.decode(sub, condition_vector(cs, torch.zeros_like(cs), mode))
                for k, i in enumerate(missing):
                    state.faces[i].reconstruction = rec[k : k + 1].cpu()
        timer.lap("decode")
        return out.cpu(), mask.cpu()

    @staticmethod
    def _face_edit(index: int, state: PhotoState, edited: torch.Tensor, mask: torch.Tensor, crops: bool) -> FaceEdit:
        f = state.faces[index]
        if f.face is not None and f.alignment is not None:
            region = [float(v) for v in crop_footprint(f.alignment, state.photo.shape)]
            box = [round(v, 1) for v in f.face.box]
            score = round(f.face.score, 4)
            landmarks = [[round(float(x), 1), round(float(y), 1)] for x, y in f.face.landmarks]
        else:  # an aligned upload: the whole photo is the face
            h, w = state.photo.shape[:2]
            region = box = [0.0, 0.0, float(w), float(h)]
            score, landmarks = 1.0, []
        images = {}
        if crops:
            images = {
                "aligned": b64_png(_to_uint8(f.crop[0])),
                "edited": b64_png(_to_uint8(edited)),
                "mask": b64_png((mask.clamp(0, 1) * 255).round().to(torch.uint8).numpy()),
            }
        return FaceEdit(index, f.probs, region, box, score, landmarks, **images)

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
