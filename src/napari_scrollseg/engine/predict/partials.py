"""Partial sums of a whole-volume run: in memory within a budget, on disk past it.

A block task leaves its weighted logit sum (over its extended box) for the up to 2^3
chunks that read it. On one machine they stay in memory while the bytes held fit the
run's budget (:func:`budget`, computed from the chunk and patch sizes, so memory is flat
in the volume size); past it a sum is spilled to ``.scrollseg/partial/<block>.npy``
(temporary name, then renamed). Pickled for a dask.distributed worker, a store is
disk-only: files on shared storage are the exchange between workers. A sum lost with
its process (kill -9) is simply computed again by the rerun.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["BUDGET_BLOCKS", "PartialSums", "budget"]

BUDGET_BLOCKS = 64  # block sums held at most: a cross-section of 8 x 8 blocks


def budget(
    chunks: Sequence[int], patch: Sequence[int], channels: int, *, blocks: int | None = None
) -> int:
    """Bytes of partial sums one machine holds in memory: ``blocks`` (default
    :data:`BUDGET_BLOCKS`) extended boxes (chunk + patch per axis) of ``channels`` float32
    values, at most a quarter of the RAM."""
    blocks = BUDGET_BLOCKS if blocks is None else blocks
    block = channels * 4 * math.prod(int(c) + int(p) for c, p in zip(chunks, patch))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        ram = 16 << 30
    return int(min(blocks * block, ram // 4))


class PartialSums:
    """The partial sums of one run, keyed by their file path (``str``)."""

    def __init__(self, budget: int = 0) -> None:
        self.budget = int(budget)
        self.held_bytes = 0
        self._held: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple:  # another process: disk only
        return (PartialSums, (0,))

    def has(self, path: str) -> bool:
        with self._lock:
            if path in self._held:
                return True
        return Path(path).exists()

    def put(self, path: str, array: np.ndarray) -> bool:
        """Keep ``array`` in memory if it fits the budget, else write it; True if written."""
        with self._lock:
            if self.held_bytes + array.nbytes <= self.budget:
                self._held[path] = array
                self.held_bytes += array.nbytes
                return False
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, target)
        return True

    def get(self, path: str) -> tuple[np.ndarray, bool]:
        """The sum and whether it came from disk (memory-mapped)."""
        with self._lock:
            array = self._held.get(path)
        if array is not None:
            return array, False
        return np.load(path, mmap_mode="r"), True

    def drop(self, path: str) -> None:
        """Forget a sum every reader has consumed (memory or file)."""
        with self._lock:
            array = self._held.pop(path, None)
            if array is not None:
                self.held_bytes -= array.nbytes
                return
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
