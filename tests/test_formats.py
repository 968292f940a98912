"""The photos people have: HEIC (iPhone), AVIF, TIFF and 16-bit PNG uploads, upright after EXIF orientation."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from server.config import Settings
from tests.server_utils import make_weights

W, H = 48, 32  # as stored; EXIF orientation 6 says "rotate 90° clockwise to show": upright is 32 wide, 48 high


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(Settings(weights_dir=make_weights(tmp_path_factory.mktemp("w"))))
    with TestClient(app) as c:
        assert app.state.face_editor.loaded.wait(60)
        yield c


def _stored_pixels() -> np.ndarray:
    """A W x H image whose stored top-right corner is red: upright (rotated 90° clockwise) that
    corner is the bottom-right one."""
    arr = np.full((H, W, 3), 90, np.uint8)
    arr[:8, -8:] = (255, 0, 0)
    return arr


def _encode(fmt: str) -> tuple[bytes, str]:
    im = Image.fromarray(_stored_pixels())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buf = io.BytesIO()
    if fmt == "PNG16":
        grey = Image.fromarray(_stored_pixels()[..., 0].astype(np.uint16) * 257)  # mode I;16
        assert grey.mode == "I;16"
        grey.save(buf, format="PNG", exif=exif)
        return buf.getvalue(), "image/png"
    im.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt != "TIFF" else {}))
    return buf.getvalue(), {"HEIF": "image/heic", "AVIF": "image/avif", "TIFF": "image/tiff"}[fmt]


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "TIFF", "PNG16"])
def test_phone_and_camera_formats_are_accepted_upright(client: TestClient, fmt: str) -> None:
    data, mime = _encode(fmt)
    resp = client.post(
        "/v1/edit",
        files={"image": (f"photo.{fmt.lower()}", data, mime)},
        data={"edits": "{}", "aligned": "true", "image_format": "png"},
    )
    assert resp.status_code == 200, resp.text
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(resp.json()["image"]))).convert("RGB"))
    assert out.shape == (W, H, 3)  # rotated: 48 rows, 32 columns
    corner = out[-8:, -8:].reshape(-1, 3).mean(0)
    if fmt == "PNG16":  # grey: the red channel's value in all three
        assert corner.min() > 200
    else:
        assert corner[0] > 180 and corner[1] < 80, corner  # the red mark ended up bottom-right
    assert out[:8, :8].reshape(-1, 3).mean(0)[0] < 140  # and not where it was stored


def test_the_answer_to_a_heic_upload_is_a_format_browsers_show(client: TestClient) -> None:
    data, mime = _encode("HEIF")
    body = client.post(
        "/v1/edit", files={"image": ("p.heic", data, mime)}, data={"edits": "{}", "aligned": "true"}
    ).json()
    assert body["image_format"] == "png"
    assert Image.open(io.BytesIO(base64.b64decode(body["image"]))).format == "PNG"


def test_unsupported_formats_get_415_listing_what_is_accepted(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.fromarray(_stored_pixels()).save(buf, format="BMP")
    resp = client.post("/v1/edit", files={"image": ("p.bmp", buf.getvalue(), "image/bmp")}, data={"edits": "{}"})
    assert resp.status_code == 415
    detail = resp.json()["detail"]
    assert all(name in detail for name in ("JPEG", "PNG", "WebP", "HEIC", "AVIF", "TIFF"))


def test_the_page_offers_the_formats(tmp_path: Path) -> None:
    html = (Path(__file__).resolve().parents[1] / "frontend" / "static" / "index.html").read_text()
    accept = html.split('accept="', 1)[1].split('"', 1)[0]
    assert {"image/heic", "image/avif", "image/tiff", ".heic"} <= set(accept.split(","))


@pytest.mark.parametrize("shape", [(37, 53, 3), (37, 53)])
def test_png_answers_are_lossless_with_the_fast_encoder(shape: tuple[int, ...]) -> None:
    from server.imaging import _imagecodecs, encode_png

    assert _imagecodecs() is not None  # a dependency: the fast path is the one tested
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    png = encode_png(arr)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), arr)


@pytest.mark.parametrize(("shape", "quality"), [((37, 53, 3), 95), ((64, 48, 3), 90), ((37, 53), 95)])
def test_jpeg_answers_are_the_bytes_pillow_writes(shape: tuple[int, ...], quality: int) -> None:
    """The fast encoder (imagecodecs' libjpeg-turbo) is a drop-in for Pillow's default save: same quality,
    same 4:2:0 subsampling, same file."""
    from server.imaging import _imagecodecs, encode_jpeg

    assert _imagecodecs() is not None
    arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    # a strided view, as the server's crops and regions are
    arr = np.repeat(arr, 2, axis=1)[:, ::2]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
    assert encode_jpeg(arr, quality) == buf.getvalue()


def _adobe_rgb_profile() -> bytes:
    """The Adobe RGB (1998) profile embedded in a shared camera photo."""
    with Image.open(Path(__file__).resolve().parents[2] / "shared" / "photos" / "portrait-3.jpg") as im:
        return im.info["icc_profile"]


@pytest.mark.parametrize("size", [(300, 200), (1100, 1000)])  # whole, and in two strips on two threads
def test_embedded_colour_profiles_are_converted_to_srgb(size: tuple[int, int]) -> None:
    from PIL import ImageCms

    from server.imaging import decode_upload

    icc = _adobe_rgb_profile()
    pixels = np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", icc_profile=icc)  # lossless: the decoded pixels are these
    got = decode_upload(buf.getvalue(), max_pixels=10**8)
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    want = ImageCms.profileToProfile(Image.fromarray(pixels), source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    np.testing.assert_array_equal(got, np.asarray(want))
    assert np.abs(got.astype(int) - pixels).mean() > 1  # Adobe RGB is not sRGB: the pixels did change


def test_a_broken_colour_profile_keeps_the_pixels() -> None:
    from server.imaging import to_srgb

    pixels = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_srgb(Image.fromarray(pixels), b"not a profile" * 20)), pixels)
