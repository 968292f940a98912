"""Shared fixtures: tiny CelebA-format datasets made in a temp dir, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.synthetic import make_celeba_folder

torch.set_num_threads(min(2, torch.get_num_threads()))

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
