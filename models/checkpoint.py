"""Released checkpoints: a folder with ``model.safetensors`` + ``config.json`` (+ ``card.md``).

Loading never unpickles anything: tensors come from safetensors, everything else from JSON. A folder
whose config does not match its tensors is refused with an error that names the mismatch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.attributes import EditGain, edit_gain_spec, gain_vector
from models.config import config_to_dict
from models.registry import build, get_architecture, parse_config

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "card.md"
#: A release's discriminator (what fine-tuning needs beside the generator; the server never loads it).
DISCRIMINATOR_FILE = "discriminator.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says why."""


@dataclass
class ModelInfo:
    """Everything ``config.json`` says about a released model, next to the built network."""

    name: str
    architecture: str
    kind: str
    config: Any
    attributes: tuple[str, ...]
    image_size: int
    conditioning: str | None = None
    mask_head: bool = False
    alignment_template: dict[str, Any] | None = None
    edit_gain: float = 1.0
    #: sliders calibrated on their own: attribute -> its gain in place of ``edit_gain``
    attribute_gains: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def gain(self) -> EditGain:
        """The model's gain: one float, or each attribute's (:func:`models.attributes.edit_gain_spec`)."""
        return edit_gain_spec(self.attributes, self.edit_gain, self.attribute_gains)

    def gains(self) -> float | torch.Tensor:
        """The gain the generator's condition is built with (:func:`models.attributes.gain_vector`)."""
        return gain_vector(self.attributes, self.gain())


def contiguous_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with contiguous, non-shared CPU tensors (what safetensors can store)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; released files must be readable by a service user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(
    folder: str | Path,
    model: nn.Module,
    *,
    architecture: str,
    name: str | None = None,
    alignment_template: dict[str, Any] | None = None,
    edit_gain: float = 1.0,
    attribute_gains: dict[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (and ``card.md`` if given) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = get_architecture(architecture)
    cfg = model.config  # type: ignore[attr-defined]
    doc: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name or folder.name,
        "architecture": architecture,
        "kind": arch.kind,
        "config": config_to_dict(cfg),
        "attributes": list(getattr(cfg, "attributes", ())),
        "image_size": cfg.image_size,
        "conditioning": getattr(cfg, "conditioning", None),
        "mask_head": bool(getattr(cfg, "mask_head", False)),
        "alignment_template": alignment_template,
        "edit_gain": check_edit_gain(edit_gain, folder / CONFIG_FILE),
        "metrics": metrics or {},
        "training": training or {},
        "extra": extra or {},
    }
    if attribute_gains:
        doc["attribute_gains"] = check_attribute_gains(attribute_gains, doc["attributes"], folder / CONFIG_FILE)
    atomic_save_tensors(folder / WEIGHTS_FILE, contiguous_state_dict(model), metadata={"format": "pt"})
    write_config(folder, doc)
    if card is not None:
        atomic_write_bytes(folder / CARD_FILE, card.encode())
    return folder


def check_edit_gain(value: Any, where: Path) -> float:
    """The edit gain (see :mod:`models.attributes`) as a float in (0, 10], or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 10:
        raise CheckpointError(f"{where}: 'edit_gain' must be a number in (0, 10], got {value!r}")
    return float(value)


def check_attribute_gains(value: Any, attributes: Sequence[str], where: Path) -> dict[str, float]:
    """Per-attribute gains as ``{attribute: gain in (0, 10]}`` over the model's attributes, or a clear error."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: 'attribute_gains' must map attribute names to gains, got {value!r}")
    unknown = sorted(set(value) - set(attributes))
    if unknown:
        raise CheckpointError(f"{where}: 'attribute_gains' names unknown attributes: {', '.join(unknown)}")
    return {a: check_edit_gain(g, where) for a, g in value.items()}


def write_config(folder: str | Path, doc: dict[str, Any]) -> None:
    """Atomically (re)write ``config.json`` of a model folder."""
    atomic_write_bytes(Path(folder) / CONFIG_FILE, (json.dumps(doc, indent=2) + "\n").encode())


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("architecture", "config"):
        if key not in doc:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return doc


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected and wrongly shaped tensors."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    for key in sorted(set(expected) & set(found)):
        if tuple(expected[key].shape) != tuple(found[key].shape):
            problems.append(
                f"shape mismatch for {key}: config gives {tuple(expected[key].shape)}, "
                f"file has {tuple(found[key].shape)}"
            )
    if problems:
        raise CheckpointError("; ".join(problems))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a ``CheckpointError`` saying it is missing or unreadable."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Build the network from ``config.json`` and load ``model.safetensors`` (eval mode)."""
    folder = Path(folder)
    doc = read_config(folder)
    architecture = doc["architecture"]
    try:
        config = parse_config(architecture, doc["config"])
    except ValueError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {exc}") from None
    # Built on the meta device and given the file's tensors (assign): no random initialisation to throw
    # away, which was most of a load (STGAN: 181 of ~250 ms), so a hot reload takes less CPU from serving.
    with torch.device("meta"):
        model = build(architecture, config)
    attributes = tuple(doc.get("attributes") or getattr(config, "attributes", ()))
    if hasattr(config, "attributes") and tuple(config.attributes) != attributes:
        raise CheckpointError(f"{folder / CONFIG_FILE}: 'attributes' does not match config.attributes")
    tensors = read_tensors(folder / WEIGHTS_FILE)
    expected = model.state_dict()
    check_state_dict(expected, tensors)
    # in the network's dtypes, as copying into initialised parameters gave (a file may hold bf16)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # every tensor of a network must come from the file
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: no values for {', '.join(left[:5])}")
    model.to(device).eval()
    info = ModelInfo(
        name=doc.get("name") or folder.name,
        architecture=architecture,
        kind=get_architecture(architecture).kind,
        config=config,
        attributes=attributes,
        image_size=int(doc.get("image_size") or config.image_size),
        conditioning=doc.get("conditioning"),
        mask_head=bool(doc.get("mask_head", False)),
        alignment_template=doc.get("alignment_template"),
        edit_gain=check_edit_gain(doc.get("edit_gain", 1.0), folder / CONFIG_FILE),
        attribute_gains=check_attribute_gains(doc.get("attribute_gains") or {}, attributes, folder / CONFIG_FILE),
        metrics=doc.get("metrics") or {},
        training=doc.get("training") or {},
        extra=doc.get("extra") or {},
    )
    return model, info
