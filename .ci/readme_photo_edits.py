"""The README's figure of a real photo edited by the served models: single sliders and several at once.

Each row is a served model; the columns are the photo and its edits, cropped around the face. The edits
go through the same in-process edit service as the REST API (detection, alignment, paste-back), so the
figure shows what a user gets.

Run: ``python .ci/readme_photo_edits.py`` (after exporting or calibrating a model), then commit the PNG.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT.parent / "shared" / "photos"

from PIL import Image, ImageDraw  # noqa: E402

from models.attributes import gain_text  # noqa: E402
from server.config import Settings  # noqa: E402
from server.service import EditRequest  # noqa: E402
from server.state import create_state  # noqa: E402

log = logging.getLogger("readme_photo_edits")

#: (label, sliders): single sliders first, then several at once (the realism issue's failing case too).
EDITS: list[tuple[str, dict[str, float]]] = [
    ("photo", {}),
    ("Blond Hair +1", {"Blond_Hair": 1.0}),
    ("Eyeglasses +1", {"Eyeglasses": 1.0}),
    ("Male +1", {"Male": 1.0}),
    ("Young -1", {"Young": -1.0}),
    ("Blond + Glasses + No Beard", {"Blond_Hair": 1.0, "Eyeglasses": 1.0, "No_Beard": 1.0}),
    ("Black Hair + Bangs + Young", {"Black_Hair": 1.0, "Bangs": 1.0, "Young": -0.6}),
    ("Mouth + Bushy Eyebrows + Pale", {"Mouth_Slightly_Open": 1.0, "Bushy_Eyebrows": 0.8, "Pale_Skin": 0.7}),
]
TILE = 220
HEADER = 16
LABEL = 150


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--photo", type=Path, default=PHOTOS / "portrait-1.jpg")
    p.add_argument("--models", default="stgan,mugan")
    p.add_argument("--out", type=Path, default=ROOT / "frontend" / "photo-edits.png")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    state = create_state(Settings(weights_dir=args.weights, device="cpu"))
    state.load_models()
    data = args.photo.read_bytes()
    models = [m for m in args.models.split(",") if m in state.registry.generators]
    canvas = Image.new("RGB", (LABEL + len(EDITS) * TILE, HEADER + len(models) * TILE), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (label, _) in enumerate(EDITS):
        draw.text((LABEL + j * TILE + 3, 2), label, fill="black")
    for i, model in enumerate(models):
        # "stgan\nx1.5\n(Blond Hair x1,\nMale x1)": one slider of its own per line, the label column is narrow
        gain = gain_text(state.registry.generators[model].info.gain()).replace("×", "x")
        label = model + "\n" + gain.replace(" (", "\n(").replace(", ", ",\n")
        draw.multiline_text((3, HEADER + i * TILE + TILE // 2 - 20), label, fill="black")
        for j, (_, edits) in enumerate(EDITS):
            result = state.service.edit(EditRequest(image=data, edits=edits, model=model, faces="largest"))
            x0, y0, x1, y1 = result.faces[0].region
            side = max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
            tile = Image.fromarray(result.image).crop(box).resize((TILE, TILE), Image.Resampling.LANCZOS)
            canvas.paste(tile, (LABEL + j * TILE, HEADER + i * TILE))
            log.info("%s %s: %.0f ms", model, edits, sum(result.timings_ms.values()))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    args.out.write_bytes(buf.getvalue())
    state.registry.close()
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
