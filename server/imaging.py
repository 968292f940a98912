"""Upload decoding and image encoding: EXIF orientation, any mode to RGB, size limits, PNG/base64."""

from __future__ import annotations

import base64
import functools
import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from server.errors import ImageTooLargeError, InvalidRequestError, ServiceError, UnsupportedImageError

try:  # HEIC / HEIF (iPhone photos): pillow-heif registers itself as a Pillow plugin
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - a dependency of the project; the server still runs without it
    pillow_heif = None

#: Pillow format name -> content type of the uploads accepted. AVIF and TIFF are Pillow's own.
ALLOWED_FORMATS = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "HEIF": "image/heic",
    "AVIF": "image/avif",
    "TIFF": "image/tiff",
}
ALLOWED_CONTENT_TYPES = {
    *ALLOWED_FORMATS.values(),
    "image/jpg",
    "image/heif",
    "image/heic-sequence",
    "image/heif-sequence",
    "application/octet-stream",
    "",
}
#: For messages: what a user may send.
ACCEPTED = "JPEG, PNG (8 or 16 bit), WebP, HEIC/HEIF, AVIF or TIFF"


def decode_upload(data: bytes, max_pixels: int, content_type: str | None = None) -> np.ndarray:
    """Bytes of an accepted image (see ``ACCEPTED``) -> (H, W, 3) uint8 sRGB, upright (EXIF orientation applied)."""
    if content_type is not None:
        base = content_type.split(";")[0].strip().lower()
        if base not in ALLOWED_CONTENT_TYPES and not base.startswith("image/"):
            raise UnsupportedImageError(f"unsupported content type {base!r}: send a {ACCEPTED} image")
    if not data:
        raise InvalidRequestError("the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            if fmt not in ALLOWED_FORMATS:
                raise UnsupportedImageError(f"unsupported image format {fmt}: send a {ACCEPTED} image")
            if getattr(im, "n_frames", 1) > 1:
                raise UnsupportedImageError(f"animated {fmt} images are not supported: send a single still image")
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
            if min(w, h) < 16:
                raise InvalidRequestError(f"image is {w}x{h}: too small to hold a face")
            im.load()
            im = ImageOps.exif_transpose(im) or im
            rgb = to_srgb(to_rgb(im), im.info.get("icc_profile"))
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequestError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


#: Images at least this large are colour-converted in two strips on two threads.
SPLIT_CONVERSION_PIXELS = 1_000_000


@functools.lru_cache(maxsize=8)
def _to_srgb_transform(icc_profile: bytes) -> Any:
    """LittleCMS transform from an embedded profile to sRGB (perceptual intent, as ``profileToProfile``),
    built once per distinct profile (phones embed the same few)."""
    from PIL import ImageCms

    source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    # without LittleCMS's one-pixel cache a transform holds no state between calls: shared across threads
    return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), "RGB", "RGB", flags=ImageCms.Flags.NOCACHE)


def to_srgb(rgb: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """An RGB image with an embedded colour profile (Display P3 from phones, Adobe RGB from cameras)
    converted to sRGB, which the models were trained on; without a profile it is taken as sRGB.

    LittleCMS converts pixel by pixel and releases the GIL, so a large photo is converted as two strips on
    the encoding threads (with the cached transform: portrait-3, Adobe RGB, 1638 x 2048, 167 -> 89 ms on the
    EPYC, ``bench/detect.py``).
    """
    if not icc_profile:
        return rgb
    try:
        from PIL import ImageCms
    except ImportError:  # pragma: no cover - Pillow's wheels include LittleCMS
        return rgb
    try:
        transform = _to_srgb_transform(icc_profile)
        w, h = rgb.size
        if w * h < SPLIT_CONVERSION_PIXELS or h < 2:
            return ImageCms.applyTransform(rgb, transform) or rgb
        boxes = [(0, 0, w, h // 2), (0, h // 2, w, h)]
        parts = list(_encoders().map(lambda box: ImageCms.applyTransform(rgb.crop(box), transform), boxes))
        out = Image.new("RGB", (w, h))
        for box, part in zip(boxes, parts, strict=True):
            out.paste(part, box[:2])
        return out
    except (OSError, ValueError, ImageCms.PyCMSError):  # a broken profile: keep the pixels
        return rgb


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F …) to RGB; transparency over white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")  # a 2-D uint8 array is mode L
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


@functools.cache
def _imagecodecs() -> Any:
    """imagecodecs, imported on first use (its import takes ~0.15 s, kept off the start-up path)."""
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover - a dependency of the project; Pillow encodes without it
        return None
    return imagecodecs


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG of an (H, W, 3) or (H, W) uint8 array. With imagecodecs (libpng with OpenCV's fast
    settings: run-length deflate, SUB filter) it takes about half Pillow's time at level 1 for a 3 % larger
    file (``bench/encode.py``, bench/RESULTS.md); Pillow is the fallback."""
    codecs = _imagecodecs()
    if codecs is not None:
        return bytes(codecs.png_encode(np.ascontiguousarray(arr), level=1, strategy=3, filter=16))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def b64_png(arr: np.ndarray) -> str:
    return base64.b64encode(encode_png(arr)).decode("ascii")


JPEG_MAGIC = b"\xff\xd8\xff"
#: JPEG quality of an answer that follows a JPEG upload (the editor's live previews ask for 90).
JPEG_QUALITY_FULL = 95


def is_jpeg(data: bytes | None) -> bool:
    return bool(data) and data[:3] == JPEG_MAGIC  # type: ignore[index]


def encode_jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    """Baseline JPEG of an (H, W, 3) or (H, W) uint8 array, 4:2:0 for colour. imagecodecs' libjpeg-turbo
    call writes the same bytes as Pillow's default save, and releases the GIL for the whole encode, so the
    edited photo and its overlay really encode on two cores (``bench/encode.py``); Pillow is the fallback."""
    codecs = _imagecodecs()
    if codecs is not None:
        return bytes(codecs.jpeg8_encode(np.ascontiguousarray(arr), level=quality))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def b64_image(arr: np.ndarray, image_format: str, quality: int = 90) -> str:
    """Base64 PNG (lossless, fast compression) or JPEG (smaller, for live previews)."""
    data = encode_jpeg(arr, quality) if image_format == "jpeg" else encode_png(arr)
    return base64.b64encode(data).decode("ascii")


_ENCODERS: ThreadPoolExecutor | None = None
_ENCODERS_LOCK = threading.Lock()


def _encoders() -> ThreadPoolExecutor:
    """The two encoding threads, started on first use (not at import)."""
    global _ENCODERS
    with _ENCODERS_LOCK:
        if _ENCODERS is None:
            _ENCODERS = ThreadPoolExecutor(2, thread_name_prefix="image-encode")
        return _ENCODERS


def b64_images(arrays: list[np.ndarray], image_format: str, quality: int = 90) -> list[str]:
    """:func:`b64_image` of several images at once: zlib and libjpeg release the GIL, so the edited
    photo and its overlay are encoded on two cores (a 2048-px PNG takes ~200 ms on one)."""
    if len(arrays) < 2:
        return [b64_image(a, image_format, quality) for a in arrays]
    return list(_encoders().map(lambda a: b64_image(a, image_format, quality), arrays))
