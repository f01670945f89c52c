"""Where a whole-volume run spends its time and how many partial-sum bytes it moves.

One :class:`PipelineStats` lives on each :class:`~napari_scrollseg.engine.predict.Predictor`
(``session.stats``); the tasks of a threaded run add cheap ``perf_counter`` sums to it.
Times are summed over threads (stages that overlap add up to more than the wall time).
On CUDA the network's time is the launch time; the device work it queues is paid where
the results are next read (``accumulate`` or ``finalize``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

STAGES = (
    "prepare",  # input and output checks, fingerprints, creating the output
    "passes",  # whole-volume passes: nonzero box, normalization statistics, mask index
    "read",
    "normalize",
    "network",
    "accumulate",
    "partial_write",
    "partial_read",
    "finalize",
    "write",
    "pyramid",
)


@dataclass
class PipelineStats:
    """Seconds per stage and partial-sum traffic, summed over the tasks that ran."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    partial_bytes_written: int = 0  # to disk (spilled or exchanged)
    partial_bytes_read: int = 0  # from disk
    partial_peak_memory: int = 0  # largest bytes of partial sums held in memory at once
    partial_budget: int = 0  # the memory budget of the last run (0: disk only)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def count(self, name: str, n: int) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + int(n))

    def peak(self, held: int) -> None:
        with self._lock:
            self.partial_peak_memory = max(self.partial_peak_memory, int(held))

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "seconds": dict(self.seconds),
                "partial_bytes_written": self.partial_bytes_written,
                "partial_bytes_read": self.partial_bytes_read,
                "partial_peak_memory": self.partial_peak_memory,
                "partial_budget": self.partial_budget,
            }

    def __getstate__(self) -> dict:  # travels inside a pickled session without its lock
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())
