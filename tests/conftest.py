"""Shared fixtures: tiny CelebA-format datasets made in a temp dir, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.synthetic import make_celeba_folder

torch.set_num_threads(min(2, torch.get_num_threads()))
# Apps made by the tests serve eagerly: a background compile per app would take the test machine's
# cores for tens of seconds each (tests/test_compiled.py exercises the compiled path on its own).
os.environ["FACE_EDITOR_COMPILE"] = "off"

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def celeba_folder(tmp_path: Path) -> Path:
    return make_celeba_folder(tmp_path / "celeba")


@pytest.fixture
def prepared_cache(celeba_folder: Path, tmp_path: Path) -> Path:
    from training.data import prepare_cache

    cache = tmp_path / "cache"
    prepare_cache(celeba_folder, cache, image_size=32)
    return cache
