"""Encoding the answer: the edited photo as PNG (Pillow at level 1 vs the imagecodecs path the server
uses) and as JPEG q95 (the answer to a JPEG upload: Pillow vs the server's imagecodecs call, same bytes),
on the demo portrait; and the README answer's pair (edited photo + overlay) on the server's two encoding
threads.

Run: ``python bench/encode.py [--repeats 10]`` (or ``bench/run_all.py --only encode``).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PHOTOS, machine, repeats_main, summary, table, time_ms
from server.imaging import JPEG_QUALITY_FULL, b64_images, encode_jpeg, encode_png


def pillow_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def pillow_jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def run(repeats: int) -> str:
    arr = np.asarray(Image.open(PHOTOS / "portrait-1.jpg").convert("RGB"))
    rows = []
    for name, fn in (
        ("PNG, Pillow level 1 (before)", lambda: pillow_png(arr)),
        ("PNG, server (imagecodecs: level 1, RLE, SUB filter)", lambda: encode_png(arr)),
        (f"JPEG q{JPEG_QUALITY_FULL}, Pillow (before)", lambda: pillow_jpeg(arr, JPEG_QUALITY_FULL)),
        (f"JPEG q{JPEG_QUALITY_FULL}, server (imagecodecs)", lambda: encode_jpeg(arr, JPEG_QUALITY_FULL)),
        (
            f"JPEG q{JPEG_QUALITY_FULL} of photo + overlay, server's 2 threads, base64",
            lambda: "".join(b64_images([arr, arr[::-1].copy()], "jpeg", JPEG_QUALITY_FULL)),
        ),
    ):
        p50, p95 = summary(time_ms(fn, repeats, warmup=1))
        rows.append([name, p50, p95, f"{len(fn()) / 1e6:.2f}"])
    h, w = arr.shape[:2]
    title = f"### Encoding the answer ({w} × {h} photo, one thread unless noted)"
    return f"{title}\n\n{machine()}\n\n" + table(["encoder", "p50 ms", "p95 ms", "MB"], rows) + "\n"


def main() -> None:
    repeats_main(__doc__, run, 10)


if __name__ == "__main__":
    main()
