"""A synthetic CelebA-format folder, for trying the training CLI end to end in seconds (and for the
tests and the training-step benchmark). Nothing here is a face: it only has the files' layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from models.attributes import CELEBA_ATTRIBUTES


def make_celeba_folder(root: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    """A CelebA-format folder: images/{k}.jpg, list_attr_celeba.txt, list_eval_partition.txt.

    Images are smooth random blobs whose colour depends on a few labels, so there is something to
    learn; splits are 50 % train, 25 % val, 25 % test.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 2, size=(n, len(CELEBA_ATTRIBUTES)))
    yy, xx = np.mgrid[0:size, 0:size] / size
    for k in range(n):
        base = rng.uniform(0, 255, size=3)
        img = base[None, None, :] * (0.6 + 0.4 * np.sin(6 * xx + k)[..., None] * np.cos(4 * yy)[..., None])
        img[..., 0] += 60 * labels[k, CELEBA_ATTRIBUTES.index("Blond_Hair")]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{k}.jpg", quality=95)
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f"{k}.jpg " + " ".join("1" if v else "-1" for v in labels[k]) for k in range(n)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    split = [0 if k < n // 2 else (1 if k < 3 * n // 4 else 2) for k in range(n)]
    (root / "list_eval_partition.txt").write_text("".join(f"{k}.jpg {s}\n" for k, s in enumerate(split)))
    return root
