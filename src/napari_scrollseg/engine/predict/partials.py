"""Partial sums of a whole-volume run: in memory within a budget, on disk past it.

A block task leaves its weighted logit sums for the up to 2^3 chunks that read it, as one
*piece* per reading chunk (the part of the chunk its tiles touch, a torch tensor summed
there directly). On one machine the pieces stay in memory, each freed as soon as its
chunk has read it (on the device where the budget fits its free memory, else host RAM),
while the bytes held fit the run's budget (:func:`budget`, computed from the chunk and
patch sizes, so memory is flat in the volume size); past it a block's pieces are
spilled to ``.scrollseg/partial/<block>.npz`` (temporary name, then renamed). Pickled
for a dask.distributed worker, a store is disk-only: files on shared storage are the
exchange between workers. A sum lost with its process (kill -9) is simply computed
again by the rerun.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BUDGET_BLOCKS", "PartialSums", "budget", "place"]

BUDGET_BLOCKS = 64  # block sums held at most: a cross-section of 8 x 8 blocks


def place(device: Any, budget: int) -> Any:
    """Where a run holds its partial sums: the device when ``budget`` fits half its free
    memory (CUDA), else the host."""
    if getattr(device, "type", str(device)) != "cuda":
        return "cpu"
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return device if budget <= free // 2 else "cpu"


def budget(
    chunks: Sequence[int], patch: Sequence[int], channels: int, *, blocks: float | None = None
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

    def __init__(self, budget: int = 0, device: Any = "cpu") -> None:
        self.budget = int(budget)
        self.device = device  # where held sums live
        self.held_bytes = 0
        self._held: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple:  # another process: disk only
        return (PartialSums, (0,))

    def has(self, path: str) -> bool:
        with self._lock:
            if path in self._held:
                return True
        return Path(path).exists()

    def put(self, path: str, pieces: Mapping[str, Any]) -> bool:
        """Keep a block's ``pieces`` (each reader's name: its tensor) in memory if they fit
        the budget, else write them to ``path``; True if written. A held piece is freed
        when its reader takes it (:meth:`take`)."""
        nbytes = sum(p.numel() * p.element_size() for p in pieces.values())
        with self._lock:
            fits = self.held_bytes + nbytes <= self.budget
            if fits:
                self.held_bytes += nbytes
        if fits:
            held = {n: p.to(self.device) for n, p in pieces.items()}
            with self._lock:
                self._held[path] = held
            return False
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.tmp.npz")
        np.savez(tmp, **{n: p.cpu().numpy() for n, p in pieces.items()})
        os.replace(tmp, target)
        return True

    def take(self, path: str, name: str) -> tuple[Any, bool]:
        """Reader ``name``'s piece and whether it came from disk: from memory the tensor,
        which is then freed; from disk a numpy array (the file stays until :meth:`drop`)."""
        with self._lock:
            held = self._held.get(path)
            piece = None if held is None else held.pop(name, None)
            if piece is not None:
                self.held_bytes -= piece.numel() * piece.element_size()
                if not held:
                    del self._held[path]
        if piece is not None:
            return piece, False
        with np.load(path) as saved:
            return saved[name], True

    def drop(self, path: str) -> None:
        """Forget a sum every reader has consumed (what is left of it in memory, or its file)."""
        with self._lock:
            held = self._held.pop(path, None)
            if held is not None:
                self.held_bytes -= sum(p.numel() * p.element_size() for p in held.values())
                return
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
