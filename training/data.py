"""CelebA-format datasets: validation, a decoded uint8 cache, and deterministic batches.

A dataset folder holds ``images/``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` (as
the official CelebA release and ``../shared/datasets/celebahq-128`` are laid out). ``prepare``
decodes every image once into ``images.npy`` (N, H, W, 3 uint8) next to labels and split arrays, so
epochs read memory instead of JPEGs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from models.attributes import validate_attributes
from models.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

ATTR_FILE = "list_attr_celeba.txt"
SPLIT_FILE = "list_eval_partition.txt"
IMAGE_DIR = "images"
SPLITS = {"train": 0, "val": 1, "test": 2}


class DatasetError(ValueError):
    """A dataset folder or cache that cannot be used; the message names the problem."""


@dataclass
class CelebAIndex:
    root: Path
    files: list[str]
    attr_names: list[str]
    labels: np.ndarray  # (N, n_attr) uint8 in {0, 1}
    split: np.ndarray  # (N,) int8 in {0, 1, 2}


def read_index(root: str | Path) -> CelebAIndex:
    """Parse and check the attribute and partition files of a CelebA-format folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    attr_path, split_path, image_dir = root / ATTR_FILE, root / SPLIT_FILE, root / IMAGE_DIR
    if not attr_path.is_file():
        raise DatasetError(f"{attr_path}: missing ({attr_path.name} is required)")
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: missing image folder")

    lines = attr_path.read_text().splitlines()
    if len(lines) < 2:
        raise DatasetError(f"{attr_path}: needs a count line and a header line")
    attr_names = lines[1].split()
    try:  # CelebA's names or new columns of the user's own (letters, digits and _)
        validate_attributes(attr_names)
    except ValueError as exc:
        raise DatasetError(f"{attr_path}: header: {exc}") from None
    files, rows = [], []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(attr_names) + 1:
            raise DatasetError(f"{attr_path}:{lineno}: expected {len(attr_names)} values, got {len(parts) - 1}")
        try:
            values = [int(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(f"{attr_path}:{lineno}: values must be 1 or -1") from None
        if any(v not in (1, -1) for v in values):
            raise DatasetError(f"{attr_path}:{lineno}: values must be 1 or -1")
        files.append(parts[0])
        rows.append([1 if v == 1 else 0 for v in values])

    split_of = read_partition(split_path, files) if split_path.is_file() else made_partition(files)
    return CelebAIndex(
        root=root,
        files=files,
        attr_names=attr_names,
        labels=np.asarray(rows, dtype=np.uint8).reshape(len(files), len(attr_names)),
        split=np.asarray([split_of[f] for f in files], dtype=np.int8),
    )


#: Without a partition file, a split is made from each file name's hash: stable, so it is the same
#: split every time the folder is prepared (and it is recorded in the cache's meta.json).
MADE_SPLIT = {"train": 90, "val": 5, "test": 5}


def made_partition(files: list[str]) -> dict[str, int]:
    out = {}
    for name in files:
        bucket = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100
        out[name] = (
            0 if bucket < MADE_SPLIT["train"] else (1 if bucket < MADE_SPLIT["train"] + MADE_SPLIT["val"] else 2)
        )
    return out


def read_partition(split_path: Path, files: list[str]) -> dict[str, int]:
    split_of: dict[str, int] = {}
    for lineno, line in enumerate(split_path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DatasetError(f"{split_path}:{lineno}: expected '<file> 0|1|2'")
        split_of[parts[0]] = int(parts[1])
    no_split = [f for f in files if f not in split_of]
    if no_split:
        raise DatasetError(f"{split_path}: no split for {len(no_split)} image(s), e.g. {', '.join(no_split[:5])}")
    return split_of


def load_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def prepare_cache(
    root: str | Path, cache_dir: str | Path, image_size: int = 128, max_bad_fraction: float = 0.01
) -> dict:
    """Decode every image of a CelebA-format folder into ``cache_dir``; report bad images by name."""
    index = read_index(root)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    n = len(index.files)
    tmp_path = cache_dir / "images.npy.tmp"
    images = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, 3))
    good = np.zeros(n, dtype=bool)
    bad: list[str] = []
    for i, name in enumerate(tqdm(index.files, desc="decode", unit="img", mininterval=2.0)):
        try:
            images[i] = load_image(index.root / IMAGE_DIR / name, image_size)
            good[i] = True
        except (FileNotFoundError, UnidentifiedImageError, OSError, ValueError) as exc:
            bad.append(f"{name} ({type(exc).__name__}: {exc})")
    images.flush()
    del images
    if bad:
        log.warning("%d unreadable or missing image(s): %s", len(bad), "; ".join(bad[:20]))
    if len(bad) > max_bad_fraction * n:
        tmp_path.unlink(missing_ok=True)
        raise DatasetError(
            f"{len(bad)} of {n} images are missing or unreadable (limit {max_bad_fraction:.0%}): " + "; ".join(bad[:10])
        )
    if bad:  # keep only the readable rows
        full = np.load(tmp_path, mmap_mode="r")
        out = np.lib.format.open_memmap(
            cache_dir / "images.npy.tmp2", mode="w+", dtype=np.uint8, shape=(int(good.sum()), *full.shape[1:])
        )
        out[:] = full[good]
        out.flush()
        del out, full
        (cache_dir / "images.npy.tmp2").replace(tmp_path)
    tmp_path.replace(cache_dir / "images.npy")
    np.save(cache_dir / "labels.npy", index.labels[good])
    np.save(cache_dir / "split.npy", index.split[good])
    meta = {
        "source": str(index.root.resolve()),
        "image_size": image_size,
        "attr_names": index.attr_names,
        "files": [f for f, ok in zip(index.files, good, strict=True) if ok],
        "bad_images": bad,
        "counts": {s: int((index.split[good] == k).sum()) for s, k in SPLITS.items()},
        "split_source": SPLIT_FILE
        if (index.root / SPLIT_FILE).is_file()
        else f"made from file-name hashes {MADE_SPLIT}",
    }
    old = read_meta(cache_dir, missing_ok=True)
    if old and "alignment_template" in old:
        meta["alignment_template"] = old["alignment_template"]
    write_meta(cache_dir, meta)
    return meta


def check_cache_source(cache_dir: str | Path, data: str | Path) -> dict:
    """The meta of ``cache_dir`` ({} if none), refusing a cache prepared from another folder than ``data``."""
    meta = read_meta(cache_dir, missing_ok=True)
    source = str(Path(data).resolve())
    if meta and meta.get("source") != source:
        raise DatasetError(
            f"{cache_dir} holds the cache of {meta.get('source')}, not of {source}: pass another "
            "--cache-dir (e.g. .cache/datasets/<name>), or --overwrite to replace it with prepare"
        )
    return meta


def read_meta(cache_dir: str | Path, missing_ok: bool = False) -> dict:
    path = Path(cache_dir) / "meta.json"
    if not path.is_file():
        if missing_ok:
            return {}
        raise DatasetError(f"{path}: missing; run `python -m training prepare` first")
    return json.loads(path.read_text())


def write_meta(cache_dir: str | Path, meta: dict) -> None:
    atomic_write_bytes(Path(cache_dir) / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())


class CachedFaces:
    """One split of a prepared cache, held in memory as uint8, with labels for chosen attributes."""

    def __init__(
        self, cache_dir: str | Path, split: str, attributes: tuple[str, ...], limit: int | None = None
    ) -> None:
        meta = read_meta(cache_dir)
        attributes = validate_attributes(attributes)
        missing = [a for a in attributes if a not in meta["attr_names"]]
        if missing:
            raise DatasetError(f"attribute(s) not in the dataset: {', '.join(missing)}")
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        split_arr = np.load(Path(cache_dir) / "split.npy")
        rows = np.flatnonzero(split_arr == SPLITS[split])
        if limit is not None:
            rows = rows[:limit]
        if len(rows) == 0:
            raise DatasetError(f"the {split} split of {cache_dir} is empty")
        all_images = np.load(Path(cache_dir) / "images.npy", mmap_mode="r")
        self.images = torch.from_numpy(np.ascontiguousarray(all_images[rows]))  # N, H, W, 3 uint8
        cols = [meta["attr_names"].index(a) for a in attributes]
        self.labels = torch.from_numpy(np.load(Path(cache_dir) / "labels.npy")[rows][:, cols].astype(np.float32))
        self.files = [meta["files"][i] for i in rows]
        self.attributes = attributes
        self.image_size = int(meta["image_size"])
        self.meta = meta

    def __len__(self) -> int:
        return len(self.images)

    def get(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] as (B, 3, H, W) float, and labels (B, n_attrs) in {0, 1}."""
        x = to_float_image(self.images[idx])
        if flip is not None and bool(flip.any()):
            x[flip] = x[flip].flip(-1)
        return x, self.labels[idx]


def to_float_image(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    return images_uint8_nhwc.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


class StepSampler:
    """Batch indices as a pure function of the step: epoch-wise permutations seeded by (seed, epoch).

    Resuming at step k therefore replays exactly the data order an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise DatasetError(f"the split has {n} images, fewer than the batch size {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.batches_per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A torch RNG for everything random in one training step (resume needs no RNG state)."""
    return torch.Generator().manual_seed((seed * 7_919 + step * 104_729 + salt) % (2**63 - 1))


def sample_targets(
    c_src: torch.Tensor,
    generator: torch.Generator,
    groups: list[list[int]],
    single_flip_fraction: float,
    flip_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Targets: another image's labels (STGAN) or, for a fraction, one flipped attribute, drawn
    uniformly or in proportion to ``flip_weights`` (n_attrs,) so rare edits (Bald, Mustache) can
    come up more often.

    Members of an exclusive group (hair colours) never end up on together: the one just switched on
    wins, otherwise a random one of those on is kept.
    """
    b, n = c_src.shape
    c_trg = c_src[torch.randperm(b, generator=generator)].clone()
    single = torch.rand(b, generator=generator) < single_flip_fraction
    if flip_weights is None:
        attr = torch.randint(n, (b,), generator=generator)
    else:
        attr = torch.multinomial(flip_weights.float(), b, replacement=True, generator=generator)
    rows = torch.arange(b)
    flipped = c_src.clone()
    flipped[rows, attr] = 1 - flipped[rows, attr]
    c_trg[single] = flipped[single]
    tie_break = torch.rand(b, n, generator=generator)
    for group in groups:
        g = torch.tensor(group)
        on = c_trg[:, g] > 0.5
        for r in (on.sum(1) > 1).nonzero(as_tuple=True)[0].tolist():
            preferred = int(attr[r]) if bool(single[r]) and int(attr[r]) in group and c_trg[r, attr[r]] > 0.5 else None
            if preferred is None:
                candidates = g[on[r]]
                preferred = int(candidates[tie_break[r, candidates].argmax()])
            c_trg[r, g] = 0
            c_trg[r, preferred] = 1
    return c_trg
