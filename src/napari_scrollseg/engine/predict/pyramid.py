"""The output's coarser levels, built while the run goes.

A chunk of level ``L`` is downsampled (:func:`~napari_scrollseg.engine.omezarr.downsample_chunk`)
as soon as every chunk of level ``L - 1`` under it is written, on a few threads of its
own, for the probabilities and the labels: the pyramid overlaps the prediction instead
of following it (on a 16-CPU GPU machine the pass after the last chunk was half of the
pipeline's wall time), and a viewer zoomed out sees the run's progress. A resumed run
feeds the chunks written before it first, so every coarser chunk is rebuilt from final
level-0 data; a killed run leaves whole chunks only (each is written to a temporary
name, then renamed).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.predict.tasks import trim_heap

__all__ = ["PyramidFront", "pyramid_threads"]

Index = tuple[int, ...]


def pyramid_threads(cpus: int | None = None) -> int:
    """Threads for the pyramid: half the CPUs, 2 to 8."""
    cpus = cpus or os.cpu_count() or 2
    return max(2, min(8, cpus // 2))


class _Image:
    """One multiscale image of the output: its level arrays and spatial axes."""

    def __init__(self, path: Path, reduction: str) -> None:
        import zarr

        from napari_scrollseg.engine.omezarr import SPATIAL, check_reduction, pyramid_factors

        check_reduction(reduction)
        group = zarr.open_group(str(path), mode="r+")
        ms = group.attrs["multiscales"][0]
        axes = "".join(a["name"] for a in ms["axes"])
        self.levels = [group[d["path"]] for d in ms["datasets"]]
        self.spatial = [i for i, a in enumerate(axes) if a in SPATIAL]
        self.factors = pyramid_factors(axes)
        self.reduction = reduction

    def shape(self, level: int) -> tuple[int, ...]:
        return tuple(int(self.levels[level].shape[i]) for i in self.spatial)

    def chunks(self, level: int) -> tuple[int, ...]:
        return tuple(int(self.levels[level].chunks[i]) for i in self.spatial)

    def downsample(self, level: int, index: Index, chunks: Sequence[int]) -> None:
        """Write chunk ``index`` (spatial) of ``level`` from ``level - 1``."""
        from napari_scrollseg.engine.omezarr import downsample_chunk

        target = self.levels[level]
        start = [0] * target.ndim
        for axis, i, c in zip(self.spatial, index, chunks):
            start[axis] = i * c
        downsample_chunk(self.levels[level - 1], target, start, self.factors, self.reduction)


class PyramidFront:
    """Builds levels ``1..`` of the output's images as their level-0 chunks are written.

    Call :meth:`chunk_done` with each written level-0 chunk's spatial chunk index (the
    ones written by an earlier run too), then :meth:`finish`; :meth:`close` stops it
    (queued chunks never start). The images must share their spatial chunk grids.
    """

    def __init__(
        self,
        images: Sequence[tuple[str | Path, str]],
        *,
        threads: int | None = None,
        stats: Any = None,
    ) -> None:
        self.images = [_Image(Path(p), r) for p, r in images]
        first = self.images[0]
        self.n_levels = len(first.levels)
        self.shapes = [first.shape(level) for level in range(self.n_levels)]
        self.chunks = [first.chunks(level) for level in range(self.n_levels)]
        for img in self.images[1:]:
            grids = [(img.shape(lv), img.chunks(lv)) for lv in range(self.n_levels)]
            if grids != list(zip(self.shapes, self.chunks)):
                raise ValueError("the pyramid's images must share their spatial chunk grids")
        self.stats = stats
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._remaining: list[dict[Index, int]] = [{} for _ in range(self.n_levels)]
        self._written: list[set[Index]] = [set() for _ in range(self.n_levels)]
        self._pending = 0
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(
            threads or pyramid_threads(), thread_name_prefix="scrollseg-pyramid"
        )

    def _ranges(self, level: int, index: Index) -> list[range]:
        """The chunks of ``level - 1`` under chunk ``index`` of ``level``, per axis."""
        out = []
        for i, c, cp, n in zip(
            index, self.chunks[level], self.chunks[level - 1], self.shapes[level - 1]
        ):
            lo, hi = 2 * i * c, min(2 * (i + 1) * c, n)
            out.append(range(lo // cp, (hi - 1) // cp + 1))
        return out

    def _parents(self, level: int, index: Index) -> list[Index]:
        """The chunks of ``level + 1`` over chunk ``index`` of ``level``."""
        per_axis = []
        for i, c, cn, n in zip(
            index, self.chunks[level], self.chunks[level + 1], self.shapes[level]
        ):
            lo, hi = i * c, min((i + 1) * c, n)  # in this level's coordinates
            per_axis.append(range(lo // 2 // cn, (hi - 1) // 2 // cn + 1))
        return list(itertools.product(*per_axis))

    def chunk_done(self, index: Sequence[int]) -> None:
        """Level-0 chunk ``index`` (spatial chunk index) is written. Raises the first
        error of a coarser chunk that failed: the run stops then, not at its end."""
        with self._lock:
            error = self._error
        if error is not None:
            raise error
        self._written_at(0, tuple(int(i) for i in index))

    def _written_at(self, level: int, index: Index) -> None:
        ready = []
        with self._lock:
            if index in self._written[level]:
                return
            self._written[level].add(index)
            if level + 1 >= self.n_levels:
                return
            for parent in self._parents(level, index):
                left = self._remaining[level + 1].get(parent)
                if left is None:
                    left = math.prod(len(r) for r in self._ranges(level + 1, parent))
                left -= 1
                self._remaining[level + 1][parent] = left
                if left == 0:
                    ready.append(parent)
            self._pending += len(ready)
        for parent in ready:
            future = self._pool.submit(self._build, level + 1, parent)
            future.add_done_callback(functools.partial(self._landed, level + 1, parent))

    def _build(self, level: int, index: Index) -> None:
        t0 = time.perf_counter()
        for img in self.images:
            img.downsample(level, index, self.chunks[level])
        if self.stats is not None:
            self.stats.add("pyramid", time.perf_counter() - t0)
        # each thread's arena keeps what it freed (reads, sums, encodings: a few MB a
        # chunk), which glibc then does not hand back: 2.8 GB peak RSS instead of 1.2 GB
        # on a 256x512x512 run with two pyramid threads
        trim_heap()
        self._written_at(level, index)

    def _landed(self, level: int, index: Index, future: Future) -> None:
        with self._lock:
            exc = None if future.cancelled() else future.exception()
            if exc is not None and self._error is None:
                self._error = ScrollsegError(
                    f"pyramid level {level} chunk {index} could not be written "
                    f"({type(exc).__name__}: {exc}); the full-resolution chunks written are "
                    "kept: run the prediction again to resume"
                )
                self._error.__cause__ = exc
            self._pending -= 1
            self._idle.notify_all()

    def finish(self) -> None:
        """Wait for every coarser chunk; raise the first error of a chunk that failed."""
        with self._lock:
            while self._pending:
                self._idle.wait()
            error = self._error
        self.close()
        if error is not None:
            raise error
        missing = [
            level
            for level in range(self.n_levels)
            if len(self._written[level]) != _count(self.shapes[level], self.chunks[level])
        ]
        if missing:  # pragma: no cover - every level-0 chunk was fed
            raise RuntimeError(f"pyramid levels {missing} are incomplete")

    def close(self) -> None:
        """Stop: queued chunks never start, running ones end."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _count(shape: Sequence[int], chunks: Sequence[int]) -> int:
    return math.prod(-(-s // c) for s, c in zip(shape, chunks))
