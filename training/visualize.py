"""Sample grids: every attribute flipped on fixed faces (or several at once), with the attention mask
under each edit."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.attributes import EditGain, condition_vector, exclusive_groups_for, gain_vector
from models.generators import AttributeGenerator
from training.metrics import flip_targets, to_uint8

HEADER = 14


@torch.no_grad()
def edit_grid(
    generator: AttributeGenerator,
    x: torch.Tensor,
    c_src: torch.Tensor,
    attributes: tuple[str, ...],
    amp: bool = False,
    with_masks: bool = True,
    gain: EditGain = 1.0,
) -> Image.Image:
    """Columns: input, reconstruction, then each attribute flipped (difference ±1 times ``gain``);
    a mask row under each face."""
    was_training = generator.training
    generator.eval()
    mode = generator.config.conditioning
    groups = exclusive_groups_for(list(attributes))
    gains = gain_vector(attributes, gain, x.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        encoded = generator.prepare_decode(generator.encode(x))
        cols = [(x, torch.zeros_like(x[:, :1]))]
        cols.append(generator.decode(encoded, condition_vector(c_src, torch.zeros_like(c_src), mode)))
        for i in range(len(attributes)):
            c_trg = flip_targets(c_src, i, groups)
            cols.append(generator.decode(encoded, condition_vector(c_src, c_trg - c_src, mode, gains)))
    generator.train(was_training)
    names = ["input", "reconstruction", *[a.replace("_", " ") for a in attributes]]
    return _compose(x, cols, names, with_masks)


#: Combined edits of the README's grids: each tuple's attributes are flipped together, as a user moving
#: several sliders to their ends does (the realism issue's failing case first).
COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("Blond_Hair", "Eyeglasses", "No_Beard"),
    ("Male", "Young"),
    ("Black_Hair", "Bangs"),
    ("Eyeglasses", "Mouth_Slightly_Open", "Pale_Skin"),
    ("Brown_Hair", "Bushy_Eyebrows", "Young", "Bangs"),
)


@torch.no_grad()
def combined_grid(
    generator: AttributeGenerator,
    x: torch.Tensor,
    c_src: torch.Tensor,
    attributes: tuple[str, ...],
    combinations: tuple[tuple[str, ...], ...] = COMBINATIONS,
    gain: EditGain = 1.0,
    with_masks: bool = True,
) -> Image.Image:
    """Columns: input, then each combination's attributes flipped together (differences ±1 times
    ``gain``; a hair colour switched on switches the others off); a mask row under each face.
    Combinations naming an attribute the model does not edit are left out."""
    was_training = generator.training
    generator.eval()
    mode = generator.config.conditioning
    groups = exclusive_groups_for(list(attributes))
    usable = [combo for combo in combinations if all(a in attributes for a in combo)]
    gains = gain_vector(attributes, gain, x.device)
    encoded = generator.prepare_decode(generator.encode(x))
    cols = [(x, torch.zeros_like(x[:, :1]))]
    for combo in usable:
        c_trg = c_src
        for name in combo:
            c_trg = flip_targets(c_trg, attributes.index(name), groups)
        cols.append(generator.decode(encoded, condition_vector(c_src, c_trg - c_src, mode, gains)))
    generator.train(was_training)
    names = ["input", *[" + ".join(a.split("_")[0] for a in combo) for combo in usable]]
    return _compose(x, cols, names, with_masks)


def _compose(
    x: torch.Tensor, cols: list[tuple[torch.Tensor, torch.Tensor]], names: list[str], with_masks: bool
) -> Image.Image:
    size = x.shape[-1]
    n_rows = len(x) * (2 if with_masks else 1)
    canvas = Image.new("RGB", (len(cols) * size, HEADER + n_rows * size), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((j * size + 2, 1), name[: size // 6], fill="black")
    for j, (img, mask) in enumerate(cols):
        imgs = to_uint8(img)
        masks = (mask.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()[:, 0]
        for i in range(len(x)):
            row = i * (2 if with_masks else 1)
            canvas.paste(Image.fromarray(imgs[i]), (j * size, HEADER + row * size))
            if with_masks:
                canvas.paste(Image.fromarray(np.stack([masks[i]] * 3, -1)), (j * size, HEADER + (row + 1) * size))
    return canvas
