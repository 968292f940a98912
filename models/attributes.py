"""Attribute names and codings shared by training and serving.

Labels are binary (0/1). A generator is conditioned on either

* the **difference** ``c_diff = c_trg - c_src`` in [-1, 1] (STGAN), where 0 means "keep", or
* the **target** ``c_trg`` coded in [-1, 1] (AttGAN, MU-GAN, StarGAN).

:func:`condition_vector` turns (source labels, requested difference) into what a model expects, so
callers (training, evaluation, server) only ever deal with differences: a zero difference always
means "reconstruct", whatever the model's conditioning.

An **edit gain** g scales how far a requested difference moves the conditioning, as STGAN's
``test_int`` does at test time: the models train on flips of ±1 and their edits at ±1 are timid,
so a released model carries the gain (calibrated on the val split) that maps the API's
difference of ±1 to a confident edit. Training always uses g = 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

#: The 13 attributes STGAN (and AttGAN's comparison) edit.
STGAN_ATTRIBUTES: tuple[str, ...] = (
    "Bald",
    "Bangs",
    "Black_Hair",
    "Blond_Hair",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Eyeglasses",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "No_Beard",
    "Pale_Skin",
    "Young",
)

#: Groups of attributes of which at most one may be on at a time.
EXCLUSIVE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"),
    ("Straight_Hair", "Wavy_Hair"),
)

#: What an attribute's new value implies for others in CelebA's labelling: ``(attribute, value) ->
#: {other: value}``. Each holds for at least 98 % of the CelebA-HQ training faces with that value
#: (tests/test_attributes.py checks them against the data): nobody bald has bangs or a hair colour,
#: a moustache or a goatee is facial hair (No_Beard = 0), and every bald or bearded face in the data
#: is labelled Male. An edit to such a value may change the implied attribute without breaking
#: preservation (:func:`implied_changes`): a moustache on a woman either reads as a man's, or does
#: not read as a moustache, to any classifier trained on these labels.
IMPLIED_VALUES: dict[tuple[str, int], dict[str, int]] = {
    ("Bald", 1): {
        "Bangs": 0,
        "Black_Hair": 0,
        "Blond_Hair": 0,
        "Brown_Hair": 0,
        "Straight_Hair": 0,
        "Wavy_Hair": 0,
        "Male": 1,
    },
    ("Bangs", 1): {"Bald": 0},
    ("Black_Hair", 1): {"Bald": 0},
    ("Blond_Hair", 1): {"Bald": 0},
    ("Brown_Hair", 1): {"Bald": 0},
    ("Mustache", 1): {"No_Beard": 0, "Male": 1},
    ("Goatee", 1): {"No_Beard": 0, "Male": 1},
    ("Sideburns", 1): {"Male": 1},
    ("No_Beard", 0): {"Male": 1},
    ("No_Beard", 1): {"Mustache": 0, "Goatee": 0},
    ("Male", 0): {"Mustache": 0, "Goatee": 0, "Sideburns": 0, "5_o_Clock_Shadow": 0, "No_Beard": 1, "Bald": 0},
}

CONDITIONING_MODES = ("diff", "target")


#: What an attribute may be called: CelebA's 40, or a column a user adds to their attribute file.
ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,63}")


def validate_attributes(names: Sequence[str]) -> tuple[str, ...]:
    """Return ``names`` as a tuple, raising ``ValueError`` naming any malformed or repeated attribute.

    Any identifier-like name is an attribute (CelebA's 40 and the new columns of a user's attribute
    file); whether the data has it is checked where the data is read."""
    bad = [n for n in names if not isinstance(n, str) or not ATTRIBUTE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"not a valid attribute name: {', '.join(map(repr, bad))} (letters, digits and _)")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"repeated attribute name(s): {', '.join(repeated)}")
    if not names:
        raise ValueError("at least one attribute is needed")
    return tuple(names)


def exclusive_groups_for(names: Sequence[str]) -> list[list[int]]:
    """Index groups (into ``names``) of mutually exclusive attributes with at least two members."""
    groups = []
    for group in EXCLUSIVE_GROUPS:
        idx = [names.index(n) for n in group if n in names]
        if len(idx) >= 2:
            groups.append(idx)
    return groups


def implied_changes(c_src: torch.Tensor, c_trg: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """(B, n_attrs) float mask, 1 where an edit implies a change of another attribute.

    Attribute ``b`` is marked for a sample when the edit moves some attribute ``a`` to a value ``v``
    (source not ``v``, target ``v``; labels in [0, 1], thresholded at 0.5), :data:`IMPLIED_VALUES`
    says ``(a, v)`` comes with ``b = w``, and the source's ``b`` is not ``w``. Such an attribute is
    neither asked to change nor one the edit keeps: preservation and the kept-attribute loss leave
    it out."""
    out = torch.zeros(c_src.shape, dtype=torch.float32, device=c_src.device)
    src_on, trg_on = c_src > 0.5, c_trg > 0.5
    for (a, v), implied in IMPLIED_VALUES.items():
        if a not in names:
            continue
        i = names.index(a)
        moved = (trg_on[:, i] == bool(v)) & (src_on[:, i] != bool(v))
        for b, w in implied.items():
            if b in names:
                j = names.index(b)
                out[:, j] = torch.maximum(out[:, j], (moved & (src_on[:, j] != bool(w))).float())
    return out


def implications_for(names: Sequence[str]) -> dict[str, dict[str, dict[str, int]]]:
    """What moving each of ``names`` on (``"on"``) or off (``"off"``) implies for other CelebA
    attributes (:data:`IMPLIED_VALUES`), for a UI to warn that a slider may change them too."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name in names:
        sides = {side: dict(IMPLIED_VALUES.get((name, v), {})) for side, v in (("on", 1), ("off", 0))}
        if any(sides.values()):
            out[name] = {side: implied for side, implied in sides.items() if implied}
    return out


def implication_text(name: str) -> str | None:
    """One line for a UI beside ``name``'s slider: what its ends come with in the training labels
    (``"+1 comes with Male, without No Beard"``), or None when they imply nothing."""
    sides = implications_for([name]).get(name)
    if not sides:
        return None

    def values(implied: dict[str, int]) -> str:
        have = [n.replace("_", " ") for n, v in implied.items() if v == 1]
        lack = [n.replace("_", " ") for n, v in implied.items() if v == 0]
        return ", ".join(filter(None, [have and "with " + ", ".join(have), lack and "without " + ", ".join(lack)]))

    parts = [f"{'+1' if side == 'on' else '−1'} comes {values(implied)}" for side, implied in sides.items()]
    return "In the training labels: " + "; ".join(parts) + ". The edit may change those too."


#: One gain for every slider, or each attribute's own gain (a mapping over all of a model's attributes).
EditGain = float | Mapping[str, float]


def edit_gain_spec(
    attributes: Sequence[str], edit_gain: float, attribute_gains: Mapping[str, float] | None = None
) -> EditGain:
    """A model's gain from its ``config.json`` fields: ``edit_gain`` for every attribute, except those
    ``attribute_gains`` names (sliders calibrated on their own). A float where none does."""
    if not attribute_gains or all(float(g) == float(edit_gain) for g in attribute_gains.values()):
        return float(edit_gain)
    unknown = sorted(set(attribute_gains) - set(attributes))
    if unknown:
        raise ValueError(f"attribute gains for unknown attributes: {', '.join(unknown)}")
    return {a: float(attribute_gains.get(a, edit_gain)) for a in attributes}


def gain_vector(
    attributes: Sequence[str], gain: EditGain, device: torch.device | str | None = None
) -> float | torch.Tensor:
    """What :func:`condition_vector` multiplies by: a float for one gain, so those models keep their exact
    arithmetic; an (n_attrs,) tensor on ``device`` that scales each attribute's difference by its own gain."""
    if not isinstance(gain, Mapping):
        return float(gain)
    if set(gain) != set(attributes):
        raise ValueError(f"per-attribute gains must name exactly the model's attributes, got {sorted(gain)}")
    return torch.tensor([float(gain[a]) for a in attributes], device=device)


def gain_record(gain: EditGain) -> float | dict[str, float]:
    """A gain as metrics and configs record it (JSON: a number, or an object over the attributes)."""
    return {a: float(g) for a, g in gain.items()} if isinstance(gain, Mapping) else float(gain)


def gain_text(gain: EditGain) -> str:
    """``×1`` or, with sliders of their own, the most common gain and the others: ``×1 (Bald ×1.5)``."""
    if not isinstance(gain, Mapping):
        return f"×{float(gain):g}"
    values = [float(g) for g in gain.values()]
    base = max(values, key=lambda v: (values.count(v), -v))
    own = ", ".join(f"{a.replace('_', ' ')} ×{g:g}" for a, g in gain.items() if float(g) != base)
    return f"×{base:g} ({own})" if own else f"×{base:g}"


def condition_vector(
    c_src: torch.Tensor, c_diff: torch.Tensor, mode: str, gain: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """What a generator is fed, from source labels in [0, 1] and a requested difference in [-1, 1].

    ``diff`` models see the difference itself, times ``gain``. ``target`` models see the target coded
    in [-1, 1], ``t = 2 * clamp(c_src + c_diff, 0, 1) - 1``, moved away from the source coding
    ``s = 2 * c_src - 1`` by ``gain``: ``s + gain * (t - s)``. A zero difference gives back the
    source coding (reconstruction) whatever the gain. ``gain`` may be a (B, 1) tensor (one per sample).
    """
    if mode == "diff":
        return c_diff * gain
    if mode == "target":
        c_trg = 2.0 * (c_src + c_diff).clamp(0.0, 1.0) - 1.0
        if (
            not torch.is_tensor(gain) and gain == 1.0
        ):  # exactly the training coding (s + (t - s) can differ from t by rounding)
            return c_trg
        c_base = 2.0 * c_src - 1.0
        return c_base + gain * (c_trg - c_base)
    raise ValueError(f"unknown conditioning mode {mode!r}; expected one of {CONDITIONING_MODES}")
