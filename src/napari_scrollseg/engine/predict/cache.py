"""A bounded least-recently-used store of per-tile results (the live view's tile cache)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TileCache"]


class TileCache:
    """Least-recently-used store of per-tile weighted logits, for live inference.

    :func:`predict_region` with a cache reuses the tiles it has already run for the same
    model, volume, TTA, precision and blending (the grid's tiles do not move when the
    view pans), so only new tiles reach the network; the answer is unchanged. Drop it
    (or call :meth:`clear`) when the model changes. Thread-safe.

    Parameters
    ----------
    max_bytes
        Memory bound; the least recently used tiles are evicted beyond it.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored (without counting a hit or marking it used)."""
        with self._lock:
            return key in self._items

    def peek(self, key: Hashable) -> np.ndarray | None:
        """The stored array for ``key``, or None, without counting a hit or a miss or
        marking it used (to plan a request)."""
        with self._lock:
            return self._items.get(key)

    def get(self, key: Hashable) -> np.ndarray | None:
        """The stored array for ``key`` (marked as recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        """Store ``value``; evict least recently used entries beyond ``max_bytes``."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        """Forget every tile."""
        with self._lock:
            self._items.clear()
            self.nbytes = 0
