"""The training checkpoint format: one safetensors file per checkpoint holding G, D, the EMA
generator and both optimisers' state as tensors, and the train config, counters and selection state
as JSON metadata. Written to a temp file and renamed (:func:`models.checkpoint.atomic_save_tensors`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from models.checkpoint import CheckpointError, atomic_save_tensors
from models.generators import AttributeGenerator
from models.registry import build, parse_config

CHECKPOINT_FORMAT = "face-attr-training-checkpoint/1"


def flatten_optimizer(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """An optimiser's per-parameter state as named tensors, and its param groups as JSON."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{prefix}.{pid}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).contiguous()
    return tensors, json.dumps(sd["param_groups"])


def unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], groups_json: str) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        pid, key = name[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": json.loads(groups_json)}


def write_training_checkpoint(
    path: Path,
    networks: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    metadata: dict[str, str],
) -> Path:
    """Save ``networks`` (prefix -> module) and ``optimizers`` (prefix -> optimiser) with ``metadata``."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in networks.items():
        tensors |= {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    groups = {}
    for prefix, opt in optimizers.items():
        flat, groups[f"{prefix}.param_groups"] = flatten_optimizer(prefix, opt)
        tensors |= {k: v.cpu() for k, v in flat.items()}
    atomic_save_tensors(path, tensors, {"format": CHECKPOINT_FORMAT, **metadata, **groups})
    return path


def load_networks(path: str | Path, tensors: dict[str, torch.Tensor], networks: dict[str, nn.Module]) -> None:
    """Load each ``prefix -> module`` of ``networks`` from a checkpoint's ``tensors``; a mismatch names
    the network and the checkpoint."""
    for prefix, module in networks.items():
        sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(sub)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: its {prefix} does not fit this run's network ({exc})") from None


def load_optimizers(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    optimizers: dict[str, torch.optim.Optimizer],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> None:
    for prefix, opt in optimizers.items():
        opt.load_state_dict(unflatten_optimizer(prefix, tensors, meta[f"{prefix}.param_groups"]))
        for p, state in opt.state.items():  # keep optimiser state in the parameters' memory format
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.dim() == 4:
                    state[k] = v.contiguous(memory_format=memory_format)


def read_training_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for broken files
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a training checkpoint of this project")
    return tensors, meta


def ema_generator_from_checkpoint(path: str | Path) -> tuple[str, AttributeGenerator, dict[str, str]]:
    """The EMA generator stored in a training checkpoint (for evaluate/export)."""
    tensors, meta = read_training_checkpoint(path)
    arch = meta["architecture"]
    gen = build(arch, parse_config(arch, json.loads(meta["generator_config"])))
    gen.load_state_dict({k[len("G_ema.") :]: v for k, v in tensors.items() if k.startswith("G_ema.")})
    return arch, gen.eval(), meta  # type: ignore[return-value]
