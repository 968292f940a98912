"""``face-edit``: edit folders of photos from the command line, in-process, with the service's pipeline.

    face-edit PHOTOS... --edits '{"Young": 1}' --out DIR [--model stgan] [--faces all] [--format same]

PHOTOS are files, folders (their images, not recursive) or globs. Each photo goes through the same
detection, alignment, edit and paste-back as ``POST /v1/edit``; the edited photo is written to
``DIR/<name>.<ext>``. A photo that fails (no face, a corrupt file) is reported and skipped and the
rest go on; ``DIR/summary.csv`` holds each photo's outcome, faces found, time and output path.
Outputs already there are skipped unless ``--overwrite``, so an interrupted batch resumes. The
inputs are never written over: an output folder that holds inputs is refused.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from server import paste_kernel
from server.config import Settings
from server.errors import ServiceError
from server.imaging import encode_jpeg, encode_png, is_jpeg
from server.service import EditRequest
from server.state import create_state

log = logging.getLogger("face-edit")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif", ".tif", ".tiff"}
SUMMARY_FILE = "summary.csv"


class BatchError(ValueError):
    """Arguments that cannot work (no photos, an output folder that holds inputs); nothing was written."""


@dataclass
class Outcome:
    photo: str
    outcome: str  # edited | skipped | failed
    faces: int
    seconds: float
    output: str
    detail: str = ""


def collect_photos(items: list[str]) -> list[Path]:
    """Files, folders (their images) and globs -> image files, each once, in the order given."""
    out: list[Path] = []
    for item in items:
        paths = [Path(p) for p in sorted(glob.glob(item))] if any(ch in item for ch in "*?[") else [Path(item)]
        for path in paths:
            if path.is_dir():
                out += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            elif path.is_file():
                out.append(path)
            else:
                raise BatchError(f"{item}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def output_path(photo: Path, out_dir: Path, fmt: str, data: bytes | None = None) -> Path:
    ext = {"jpeg": ".jpg", "png": ".png"}.get(fmt)
    if ext is None:  # "same": JPEG stays JPEG, anything else (browsers cannot show HEIC) becomes PNG
        ext = ".jpg" if (data is not None and is_jpeg(data)) or photo.suffix.lower() in (".jpg", ".jpeg") else ".png"
    return out_dir / f"{photo.stem}{ext}"


def run_batch(
    photos: list[Path],
    edits: str,
    out_dir: Path,
    settings: Settings,
    model: str | None = None,
    faces: str = "all",
    fmt: str = "same",
    overwrite: bool = False,
) -> list[Outcome]:
    out_dir = out_dir.resolve()
    inputs = {p.resolve().parent for p in photos}
    if out_dir in inputs:
        raise BatchError(f"{out_dir} holds input photos: choose another --out folder (inputs are never overwritten)")
    try:
        json.loads(edits)
    except json.JSONDecodeError as exc:
        raise BatchError(f"--edits is not JSON: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    state = create_state(settings)
    state.load_models(compile_decoders=False)  # a batch run ends before a compile would pay off
    if not state.registry.generators:
        raise BatchError(f"no model could be loaded from {settings.weights_dir}")
    paste_kernel.warm_up_in_background()  # the eager paste-back serves until it is compiled
    outcomes: list[Outcome] = []
    bar = tqdm(photos, desc="face-edit", unit="photo", dynamic_ncols=True)
    for photo in bar:
        t0 = time.perf_counter()
        target = output_path(photo, out_dir, fmt)
        if target.exists() and not overwrite:
            outcomes.append(Outcome(str(photo), "skipped", 0, 0.0, str(target), "output exists (--overwrite)"))
            continue
        try:
            data = photo.read_bytes()
            target = output_path(photo, out_dir, fmt, data)
            request = EditRequest(image=data, edits=edits, model=model, faces=faces, overlay=False, crops=False)
            result = state.service.edit(request)
            encoded = encode_jpeg(result.image, 95) if target.suffix == ".jpg" else encode_png(result.image)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(encoded)
            tmp.replace(target)
            seconds = time.perf_counter() - t0
            outcomes.append(Outcome(str(photo), "edited", len(result.faces), round(seconds, 3), str(target)))
        except ServiceError as exc:
            outcomes.append(Outcome(str(photo), "failed", 0, round(time.perf_counter() - t0, 3), "", exc.detail))
            log.warning("%s: %s", photo, exc.detail)
        except OSError as exc:
            outcomes.append(Outcome(str(photo), "failed", 0, round(time.perf_counter() - t0, 3), "", str(exc)))
            log.warning("%s: %s", photo, exc)
        done = [o for o in outcomes if o.outcome == "edited"]
        if done:
            bar.set_postfix(photos_per_s=f"{len(done) / max(sum(o.seconds for o in done), 1e-9):.2f}")
    bar.close()
    write_summary(out_dir / SUMMARY_FILE, outcomes)
    state.registry.close()
    return outcomes


def write_summary(path: Path, outcomes: list[Outcome]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["photo", "outcome", "faces", "seconds", "output", "detail"])
        for o in outcomes:
            writer.writerow([o.photo, o.outcome, o.faces, o.seconds, o.output, o.detail])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="face-edit", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("photos", nargs="+", help="files, folders or globs")
    p.add_argument("--edits", required=True, help='JSON {"Attribute": value in [-1, 1]}, e.g. \'{"Young": 1}\'')
    p.add_argument("--out", required=True, type=Path, help="output folder (not one that holds inputs)")
    p.add_argument("--model", help="served model name (default: the default model)")
    p.add_argument("--faces", default="all", help="all, largest, or face indices like 0,2")
    p.add_argument("--format", dest="fmt", default="same", choices=["same", "jpeg", "png"], help="output format")
    p.add_argument("--overwrite", action="store_true", help="redo photos whose output exists")
    p.add_argument("--weights", type=Path, help="weights folder (default: FACE_EDITOR_WEIGHTS_DIR or weights/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = Settings() if args.weights is None else Settings(weights_dir=args.weights)
    try:
        photos = collect_photos(args.photos)
        if not photos:
            raise BatchError("no photos found in the arguments")
        outcomes = run_batch(photos, args.edits, args.out, settings, args.model, args.faces, args.fmt, args.overwrite)
    except BatchError as exc:
        log.error("%s", exc)
        return 2
    counts = {k: sum(o.outcome == k for o in outcomes) for k in ("edited", "skipped", "failed")}
    log.info("%s; summary in %s", ", ".join(f"{v} {k}" for k, v in counts.items()), args.out / SUMMARY_FILE)
    return 1 if counts["failed"] and not counts["edited"] and not counts["skipped"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
