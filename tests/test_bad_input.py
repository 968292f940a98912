"""Every kind of broken or unusual upload: a clear 4xx JSON error (or a correct edit), never a 500."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.api.errors import status_for
from server.app import create_app
from server.config import Settings
from server.edits import parse_edits
from server.errors import InvalidRequestError, ServiceError
from server.imaging import decode_upload
from tests.server_utils import PHOTOS, make_weights

ATTRS = ("Bald", "Bangs", "Blond_Hair")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    weights = make_weights(tmp_path_factory.mktemp("weights"))
    app = create_app(Settings(weights_dir=weights, max_upload_bytes=4_000_000, max_pixels=30_000_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def face() -> Image.Image:
    """A real face, small enough to keep the corpus fast."""
    with Image.open(PHOTOS / "portrait-2.jpg") as im:
        return im.convert("RGB").resize((375, 537))


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _post(client: TestClient, data: bytes, mime: str = "image/jpeg", edits: str = '{"Bald": 0.5}', **form: str):  # type: ignore[no-untyped-def]
    return client.post("/v1/edit", files={"image": ("upload", data, mime)}, data={"edits": edits, **form})


def _rejected(client: TestClient, resp, status: int | tuple[int, ...], needle: str = "") -> None:  # type: ignore[no-untyped-def]
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, (resp.status_code, resp.text[:300])
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and needle.lower() in detail.lower()
    assert client.get("/healthz").status_code == 200


def test_zero_bytes(client: TestClient) -> None:
    _rejected(client, _post(client, b""), 422, "empty")


def test_truncated_jpeg(client: TestClient, face: Image.Image) -> None:
    data = _encode(face, "JPEG")
    _rejected(client, _post(client, data[: len(data) // 3]), 422, "decodable")


def test_png_declaring_30000_squared_pixels(client: TestClient) -> None:
    _rejected(client, _post(client, _png_header_only(30000, 30000), "image/png"), 413, "pixels")


def test_animated_gif(client: TestClient, face: Image.Image) -> None:
    frames = [face.convert("P"), face.rotate(10).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    _rejected(client, _post(client, buf.getvalue(), "image/gif"), 415, "GIF")


def test_text_file_named_jpg(client: TestClient) -> None:
    _rejected(client, _post(client, b"just some text, honestly\n" * 20), 422, "decodable")


def test_ten_by_ten_image(client: TestClient) -> None:
    _rejected(client, _post(client, _encode(Image.new("RGB", (10, 10)), "PNG"), "image/png"), 422, "small")


def test_photo_with_no_face(client: TestClient) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    _rejected(client, _post(client, _encode(noise, "JPEG")), 422, "no face")


@pytest.mark.parametrize(
    ("edits", "needle"),
    [
        ("{Bald: 1}", "JSON"),
        ('{"Bald": NaN}', "NaN"),
        ('{"Bald": Infinity}', "Infinity"),
        ('{"Bald": -Infinity}', "Infinity"),
        ('{"Bald": 1e308}', "Bald"),
        ('{"Bald": 1e999}', "Bald"),
        ('{"Bald": true}', "Bald"),
        ('{"Bald": null}', "Bald"),
        ('{"Bald": [1]}', "Bald"),
        ('{"Лысый": 1}', "Лысый"),
        ('{"禿げ": 1}', "禿げ"),
        ('{"Bald\\u0000": 1}', "unknown"),
        ("[" * 100_000 + "]" * 100_000, "limit"),
        ('{"Bald": 0.5, "x": "' + "a" * 1_000_000 + '"}', "limit"),
    ],
)
def test_bad_edits(client: TestClient, face: Image.Image, edits: str, needle: str) -> None:
    _rejected(client, _post(client, _encode(face, "JPEG"), edits=edits), 422, needle)


@pytest.mark.parametrize("name", ["../stgan", "stgan/../../etc", "..\\stgan", "/etc/passwd", "stgan\x00", ""])
def test_model_names_with_path_separators(client: TestClient, face: Image.Image, name: str) -> None:
    resp = _post(client, _encode(face, "JPEG"), model=name)
    if name == "":  # empty means the default model
        assert resp.status_code == 200
        return
    _rejected(client, resp, 422, "unknown model")


def _modes(face: Image.Image) -> dict[str, tuple[bytes, str]]:
    gray = face.convert("L")
    rgba = face.convert("RGBA")
    rgba.putalpha(200)
    arr16 = (np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "16-bit PNG": (_encode(Image.fromarray(arr16), "PNG"), "image/png"),
        "CMYK JPEG": (_encode(face.convert("CMYK"), "JPEG"), "image/jpeg"),
        "grayscale JPEG": (_encode(gray, "JPEG"), "image/jpeg"),
        "RGBA PNG": (_encode(rgba, "PNG"), "image/png"),
        "palette PNG": (_encode(face.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "image/png"),
        "LA PNG": (_encode(face.convert("LA"), "PNG"), "image/png"),
        "WebP": (_encode(face, "WEBP", quality=90), "image/webp"),
    }


@pytest.mark.parametrize(
    "kind", ["16-bit PNG", "CMYK JPEG", "grayscale JPEG", "RGBA PNG", "palette PNG", "LA PNG", "WebP"]
)
def test_unusual_modes_are_converted_and_edited(client: TestClient, face: Image.Image, kind: str) -> None:
    data, mime = _modes(face)[kind]
    resp = _post(client, data, mime)
    assert resp.status_code == 200, resp.text[:300]
    body = resp.json()
    assert len(body["faces"]) == 1
    out = Image.open(io.BytesIO(__import__("base64").b64decode(body["image"])))
    assert out.size == face.size and out.mode == "RGB"


def test_exif_rotated_jpeg_is_handled_not_rejected(client: TestClient, face: Image.Image) -> None:
    rotated = face.rotate(90, expand=True)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag that says "rotate 90° clockwise to display"
    resp = _post(client, _encode(rotated, "JPEG", exif=exif.tobytes()))
    assert resp.status_code == 200, resp.text[:300]
    body = resp.json()
    out = Image.open(io.BytesIO(__import__("base64").b64decode(body["image"])))
    assert out.size == face.size  # returned upright
    assert len(body["faces"]) == 1


# ---------------------------------------------------------------------------- property-based


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_decode_never_raises_anything_but_a_service_error(data: bytes) -> None:
    try:
        arr = decode_upload(data, max_pixels=1_000_000)
    except ServiceError as exc:
        assert status_for(exc) in (413, 415, 422)
    else:
        assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=8, max_size=2048), st.integers(min_value=16, max_value=2000))
def test_decode_of_mutated_png_headers(tail: bytes, size: int) -> None:
    data = _png_header_only(size, size)[:33] + tail
    try:
        decode_upload(data, max_pixels=1_000_000)
    except ServiceError as exc:
        assert status_for(exc) in (413, 415, 422)


def _json_containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)


# Named functions, not lambdas: to describe a lambda, hypothesis reads its source and walks sys.modules, which
# the server's threads may be importing into meanwhile ("dictionary changed size during iteration", seen once).
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=20),
    _json_containers,
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps)))
def test_edits_parser_accepts_only_valid_objects(text: str) -> None:
    try:
        edits = parse_edits(text, ATTRS)
    except InvalidRequestError as exc:
        assert status_for(exc) == 422 and exc.detail
    else:
        assert set(edits) <= set(ATTRS)
        assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in edits.values())
