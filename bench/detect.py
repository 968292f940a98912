"""Stages of the cold REST path on the shared photos, each against what it replaced, interleaved
round by round so that a noisy neighbour slows both alike:

- face detection at the server's 640-px side: facenet-pytorch's ``MTCNN.detect`` (one resize call per
  candidate crop) vs :func:`server.mtcnn.detect_faces` (all crops from one summed-area table);
- colour-profile conversion of photos with an embedded profile: one LittleCMS call vs the server's
  two strips on two threads (:func:`server.imaging.to_srgb`).

Run: ``python bench/detect.py [--repeats 12]`` (or ``bench/run_all.py --only detect``).
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PHOTOS, machine, percentile, repeats_main, table
from server.imaging import to_srgb
from server.mtcnn import detect_faces


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each function, one call of each per round (after one warm-up round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def _rows(label: str, times: dict[str, list[float]], extra: str = "") -> list[list[object]]:
    (before, t_before), (after, t_after) = times.items()
    speed = f"{statistics.median(t_before) / statistics.median(t_after):.2f}x"
    return [
        [label, name, statistics.median(t), percentile(t, 0.95), speed if name == after else extra]
        for name, t in ((before, t_before), (after, t_after))
    ]


def run(repeats: int) -> str:
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN(keep_all=True, device=torch.device("cpu"), min_face_size=20, post_process=False)
    detect_rows, colour_rows = [], []
    for photo in sorted(PHOTOS.glob("*.jpg")):
        with Image.open(photo) as im:
            im.load()
            icc = im.info.get("icc_profile")
            rgb = im.convert("RGB")
        scale = min(1.0, 640 / max(rgb.size))
        small = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BILINEAR)
        pixels = np.array(small)
        theirs = mtcnn.detect(small, landmarks=True)[0]
        ours = detect_faces(pixels, mtcnn.pnet, mtcnn.rnet, mtcnn.onet)[0]
        faces = f"{len(ours)} faces ({0 if theirs is None else len(theirs)} by facenet)"
        times = interleaved(
            {
                "facenet MTCNN.detect": lambda small=small: mtcnn.detect(small, landmarks=True),
                "server detect_faces": lambda pixels=pixels: detect_faces(pixels, mtcnn.pnet, mtcnn.rnet, mtcnn.onet),
            },
            repeats,
        )
        detect_rows += _rows(f"{photo.name} at {small.width}×{small.height}", times, faces)
        if icc:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            name = source.profile.profile_description
            srgb = ImageCms.createProfile("sRGB")
            times = interleaved(
                {
                    "ImageCms.profileToProfile": lambda rgb=rgb, source=source, srgb=srgb: ImageCms.profileToProfile(
                        rgb, source, srgb, outputMode="RGB"
                    ),
                    "server to_srgb": lambda rgb=rgb, icc=icc: to_srgb(rgb, icc),
                },
                repeats,
            )
            colour_rows += _rows(f"{photo.name} ({rgb.width}×{rgb.height}, {name})", times)
    header = ["photo", "code", "p50 ms", "p95 ms", "speed-up"]
    out = f"### Cold-path stages, before and after (interleaved, {repeats} rounds)\n\n{machine()}\n\n"
    out += "Face detection (MTCNN, thresholds 0.6/0.7/0.7, min face 20 px):\n\n" + table(header, detect_rows)
    if colour_rows:
        out += "\n\nConversion of an embedded colour profile to sRGB:\n\n" + table(header, colour_rows)
    return out + "\n"


def main() -> None:
    repeats_main(__doc__, run, 12)


if __name__ == "__main__":
    main()
