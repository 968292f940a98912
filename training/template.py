"""The alignment template: mean 5-point landmarks (MTCNN) over training faces of the dataset.

Landmark order is MTCNN's: left eye, right eye, nose, left mouth corner, right mouth corner (left /
right as seen in the image). Coordinates are fractions of the crop side, so one template serves any
image size. The server aligns photos to exactly this template before a model sees them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.data import SPLITS, DatasetError

log = logging.getLogger(__name__)


def compute_template(cache_dir: str | Path, n_samples: int = 2000, batch_size: int = 64) -> dict:
    from facenet_pytorch import MTCNN

    images = np.load(Path(cache_dir) / "images.npy", mmap_mode="r")
    split = np.load(Path(cache_dir) / "split.npy")
    rows = np.flatnonzero(split == SPLITS["train"])
    if len(rows) == 0:
        raise DatasetError(f"{cache_dir}: no training images for the alignment template")
    rows = rows[np.linspace(0, len(rows) - 1, min(n_samples, len(rows))).round().astype(int)]
    size = images.shape[1]
    mtcnn = MTCNN(keep_all=False, select_largest=False, device=torch.device("cpu"), min_face_size=size // 4)
    found = []
    for start in tqdm(range(0, len(rows), batch_size), desc="template (MTCNN)", mininterval=5.0):
        batch = np.ascontiguousarray(images[rows[start : start + batch_size]])
        _, probs, points = mtcnn.detect(batch, landmarks=True)
        for p, pts in zip(probs, points, strict=True):
            if pts is None or p is None or p[0] is None or p[0] < 0.9:
                continue
            found.append(np.asarray(pts[0], dtype=np.float64) / size)
    if not found:
        raise DatasetError(f"{cache_dir}: MTCNN found no face in {len(rows)} training images")
    arr = np.stack(found)
    mean = arr.mean(0)
    std = arr.std(0)
    log.info("template from %d of %d faces; landmark std (fraction of side): %s", len(arr), len(rows), std.mean(0))
    return {
        "landmarks": [[round(float(x), 5), round(float(y), 5)] for x, y in mean],
        "landmark_std": [[round(float(x), 5), round(float(y), 5)] for x, y in std],
        "order": ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"],
        "units": "fraction of the aligned crop side",
        "n_faces": len(arr),
        "n_sampled": len(rows),
    }
