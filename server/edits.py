"""What a user asks for, checked: slider values, which faces, and the attribute-difference vector."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch

from models.attributes import exclusive_groups_for
from server.errors import InvalidRequestError

MAX_EDITS_CHARS = 10_000


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def parse_edits(edits: str | Mapping[str, object] | None, attributes: tuple[str, ...]) -> dict[str, float]:
    """``{"Attribute": value}`` (a JSON text or a mapping) with value in [-1, 1]; errors name the
    offending key or value."""
    if edits is None:
        return {}
    if isinstance(edits, str):
        if not edits.strip():
            return {}
        if len(edits) > MAX_EDITS_CHARS:
            raise InvalidRequestError(f"edits is {len(edits)} characters long; the limit is {MAX_EDITS_CHARS}")
        try:
            data = json.loads(edits, parse_constant=_no_constant)
        except (json.JSONDecodeError, ValueError, RecursionError) as exc:
            raise InvalidRequestError(f'edits must be a JSON object such as {{"Blond_Hair": 0.8}} ({exc})') from None
    else:
        data = edits
    if not isinstance(data, Mapping):
        raise InvalidRequestError("edits must be a JSON object mapping attribute names to numbers in [-1, 1]")
    unknown = [k for k in data if k not in attributes]
    if unknown:
        shown = ", ".join(repr(str(k)[:40]) for k in unknown[:5])
        raise InvalidRequestError(f"unknown attribute(s) {shown}; this model edits: {', '.join(attributes)}")
    out = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError(f"edit value for {key} must be a number, got {json.dumps(value)[:40]}")
        if not math.isfinite(value) or not -1.0 <= value <= 1.0:
            raise InvalidRequestError(f"edit value for {key} must be a finite number in [-1, 1], got {value}")
        out[key] = float(value)
    return out


def difference_vector(
    edits: dict[str, float], attributes: tuple[str, ...], c_src: torch.Tensor, exclusive: bool = True
) -> torch.Tensor:
    """(n_attrs,) difference. Raising one hair colour lowers the others the face has (unless set)."""
    diff = torch.zeros(len(attributes))
    for name, value in edits.items():
        diff[attributes.index(name)] = value
    if exclusive:
        for group in exclusive_groups_for(list(attributes)):
            raised = [i for i in group if diff[i] > 0]
            if len(raised) != 1:
                continue
            for j in group:
                if j != raised[0] and attributes[j] not in edits and c_src[j] > 0.5:
                    diff[j] = -diff[raised[0]] * c_src[j]
    return diff


def select_faces(spec: str | None, areas: Sequence[float]) -> list[int]:
    """Indices of the faces to edit: ``all``, ``largest`` or comma-separated indices into ``areas``."""
    n = len(areas)
    spec = (spec or "all").strip().lower()
    if spec == "all":
        return list(range(n))
    if spec == "largest":
        return [max(range(n), key=lambda i: areas[i])]
    try:
        idx = sorted({int(p) for p in spec.split(",") if p.strip()})
    except ValueError:
        raise InvalidRequestError(
            f"faces must be 'all', 'largest' or comma-separated indices, got {spec[:40]!r}"
        ) from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad or not idx:
        raise InvalidRequestError(f"face index {bad or spec!r} out of range: the photo has {n} face(s) (0..{n - 1})")
    return idx
