"""What the service remembers about a photo between slider moves, and the bounded cache that holds it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from models.generators import Encoded
from server.faces import Alignment, Face


@dataclass
class FaceState:
    """Everything about one face that does not depend on the slider values."""

    face: Face | None
    alignment: Alignment | None
    crop: torch.Tensor  # (1, 3, S, S) in [-1, 1]
    probs: dict[str, float]
    c_src: torch.Tensor  # (n_attrs,) in {0, 1}
    encoded: Encoded | None = None
    reconstruction: torch.Tensor | None = None  # zero-difference output, for models without a mask head


@dataclass
class PhotoState:
    photo: np.ndarray
    faces: list[FaceState]
    #: "jpeg" for a JPEG upload, else "png": the default encoding of the answers about this photo
    source_format: str = "png"
    lock: threading.Lock = field(default_factory=threading.Lock)


CacheKey = tuple[str, str, int, bool]  # photo id, model name, id of the loaded network, aligned


class FeatureCache:
    """Bounded LRU of decoded photos, detections, crops and encoder features, with hit/miss counts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[CacheKey, PhotoState] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> PhotoState | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: CacheKey, value: PhotoState) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def stats(self) -> dict[str, int]:
        return {"size": len(self._items), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}
