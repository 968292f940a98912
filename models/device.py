"""The one place that turns a device setting into a torch device (training, evaluation and the server)."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import torch


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; anything else as torch spells it (``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def has_cxx_compiler() -> bool:
    """Inductor's CPU backend writes C++ and builds it with the compiler in ``$CXX`` (default ``c++``)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++") if c)


def machine_description() -> str:
    """CPU model, core count and GPU, for model cards and benchmark tables."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"
