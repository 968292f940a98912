"""The one place that turns a device setting into a torch device (training, evaluation and the server)."""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; anything else as torch spells it (``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
