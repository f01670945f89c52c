"""Partial sums of a whole-volume run: in memory within a budget, on disk past it.

A block task leaves its weighted logit sum (over its extended box, a torch tensor) for
the up to 2^3 chunks that read it. On one machine it stays in memory as one piece per
reading chunk, each freed as soon as its chunk has read it (on the device where the
budget fits its free memory, else host RAM), while the bytes held fit the run's budget
(:func:`budget`, computed from the chunk and patch sizes, so memory is flat in the
volume size); past it a sum is spilled to ``.scrollseg/partial/<block>.npy``
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

    def put(self, path: str, array: Any, pieces: Mapping[str, tuple[slice, ...]]) -> bool:
        """Keep the ``pieces`` of ``array`` (a tensor) that its readers need (each reader's
        name: the spatial slices it reads) in memory if they fit the budget, else write the
        whole array; True if written. Each piece is a copy, freed when its reader takes it
        (:meth:`take`): a block's sum is not held whole until its last reader has run."""
        sizes = {n: math.prod(s.stop - s.start for s in sl) for n, sl in pieces.items()}
        nbytes = array.shape[0] * sum(sizes.values()) * array.element_size()
        with self._lock:
            fits = self.held_bytes + nbytes <= self.budget
            if fits:
                self.held_bytes += nbytes
        if fits:
            held = {
                n: array[(slice(None), *sl)].to(self.device, copy=True) for n, sl in pieces.items()
            }
            with self._lock:
                self._held[path] = held
            return False
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.tmp.npy")
        np.save(tmp, array.cpu().numpy())
        os.replace(tmp, target)
        return True

    def take(self, path: str, name: str, src: tuple[slice, ...]) -> tuple[Any, bool]:
        """Reader ``name``'s piece (``src`` of the sum) and whether it came from disk: from
        memory the piece, which is then freed; from disk a memory-mapped view (the file
        stays until :meth:`drop`)."""
        with self._lock:
            held = self._held.get(path)
            piece = None if held is None else held.pop(name, None)
            if piece is not None:
                self.held_bytes -= piece.numel() * piece.element_size()
                if not held:
                    del self._held[path]
        if piece is not None:
            return piece, False
        return np.load(path, mmap_mode="r")[(slice(None), *src)], True

    def drop(self, path: str) -> None:
        """Forget a sum every reader has consumed (what is left of it in memory, or its file)."""
        with self._lock:
            held = self._held.pop(path, None)
            if held is not None:
                self.held_bytes -= sum(p.numel() * p.element_size() for p in held.values())
                return
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
