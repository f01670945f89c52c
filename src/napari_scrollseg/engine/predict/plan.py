"""The whole-volume plan: output chunks, blocks of tiles, and who owns which tile (pure).

The output (the ROI) is cut into chunks; the same grid of *blocks* owns the tiles of
nnU-Net's global grid: a tile belongs to the block its start lies in (clamped to the
ROI), so every tile touching the ROI runs exactly once. A block's *extended box* is the
union of its tiles inside the ROI; a chunk reads the partial sums of the blocks whose
extended boxes overlap it. ``superchunk`` groups chunks so that blocks share partial sums
only inside a group (tiles on group borders then run once per group). A ``keep``
predicate (the mask) drops tiles; blocks left without tiles have no task.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Block", "Chunk", "Plan", "plan"]

Span = tuple[int, int]  # [start, stop) along one axis
Index = tuple[int, ...]


@dataclass(frozen=True)
class _Axis:
    """Tile ownership along one axis (the grid is a product of per-axis starts)."""

    chunks: tuple[Span, ...]  # output chunk spans, volume coordinates
    owned: tuple[tuple[int, ...], ...]  # tile starts owned by each block (same index as chunks)
    ext: tuple[Span | None, ...]  # extended out box of each block inside the roi
    sources: tuple[tuple[int, ...], ...]  # blocks whose ext box overlaps each chunk


def _plan_axis(starts: Sequence[int], patch: int, span: Span, chunk: int) -> _Axis:
    lo, hi = span
    n = math.ceil((hi - lo) / chunk)
    chunks = tuple((lo + i * chunk, min(hi, lo + (i + 1) * chunk)) for i in range(n))
    owned: list[list[int]] = [[] for _ in range(n)]
    for s in starts:
        if s < hi and s + patch > lo:  # the tile touches the roi
            owned[min(max((s - lo) // chunk, 0), n - 1)].append(int(s))
    ext = tuple((max(lo, min(o)), min(hi, max(o) + patch)) if o else None for o in owned)
    sources = tuple(
        tuple(b for b, e in enumerate(ext) if e is not None and e[0] < c1 and e[1] > c0)
        for c0, c1 in chunks
    )
    return _Axis(chunks, tuple(tuple(o) for o in owned), ext, sources)


@dataclass(frozen=True)
class Block:
    """A block task: run ``tiles`` once, sum their weighted logits over ``ext``.

    ``index`` is the super-chunk's index followed by the block's index inside it."""

    index: Index
    tiles: tuple[tuple[int, ...], ...]
    ext: tuple[Span, ...]


@dataclass(frozen=True)
class Chunk:
    """An output chunk: its ``box`` (volume coordinates) and the blocks it reads."""

    index: Index
    box: tuple[Span, ...]
    sources: tuple[Index, ...]


@dataclass(frozen=True)
class Plan:
    """Every chunk and every block with tiles; counts cover the whole output.

    ``tiles_total`` counts tiles before the mask (``tiles_skipped`` of them are dropped);
    ``grid_tiles`` is the number of tiles of nnU-Net's grid touching the ROI."""

    chunks: tuple[Chunk, ...]
    blocks: dict[Index, Block]
    consumers: dict[Index, tuple[Index, ...]]  # block -> the chunks that read it
    tiles_total: int
    tiles_skipped: int
    grid_tiles: int


def plan(
    axis_starts: Sequence[Sequence[int]],
    patch: Sequence[int],
    roi: Sequence[Span],
    chunks: Sequence[int],
    *,
    superchunk: int | None = None,
    keep: Callable[[tuple[int, ...]], bool] | None = None,
) -> Plan:
    """Plan a whole-volume run.

    Parameters
    ----------
    axis_starts
        Tile starts per axis in volume coordinates (the grid is their product).
    patch
        Tile shape.
    roi
        ``(start, stop)`` per axis: the output box.
    chunks
        Output chunk shape (also the block shape).
    superchunk
        Chunks per group and axis sharing partial sums; None: one group.
    keep
        ``keep(tile_start) -> bool``: False drops the tile (an empty mask under it).
    """
    n_chunks = [math.ceil((hi - lo) / c) for (lo, hi), c in zip(roi, chunks, strict=True)]
    group = [min(int(superchunk or n), n) for n in n_chunks]
    axes = [
        [_plan_axis(st, p, (lo + g * c, min(hi, lo + (g + k) * c)), c) for g in range(0, n, k)]
        for st, p, (lo, hi), c, n, k in zip(axis_starts, patch, roi, chunks, n_chunks, group)
    ]
    blocks: dict[Index, Block | None] = {}
    names: dict[Index, Index] = {}
    tiles_total = tiles_skipped = 0
    out: list[Chunk] = []
    for c in itertools.product(*(range(n) for n in n_chunks)):
        g = tuple(i // k for i, k in zip(c, group))
        local = tuple(i % k for i, k in zip(c, group))
        ax = [axes[a][g[a]] for a in range(len(c))]
        found = []
        for b in itertools.product(*(x.sources[i] for x, i in zip(ax, local))):
            index = (*g, *b)
            index = names.setdefault(index, index)  # one tuple per block, shared by chunks
            if index not in blocks:
                tiles = list(itertools.product(*(x.owned[i] for x, i in zip(ax, b))))
                kept = tuple(t for t in tiles if keep is None or keep(t))
                ext = tuple(x.ext[i] for x, i in zip(ax, b))
                blocks[index] = Block(index, kept, ext) if kept else None  # type: ignore[arg-type]
                tiles_total += len(tiles)
                tiles_skipped += len(tiles) - len(kept)
            if blocks[index] is not None:
                found.append(index)
        box = tuple(
            (lo + i * k, min(hi, lo + (i + 1) * k)) for i, k, (lo, hi) in zip(c, chunks, roi)
        )
        out.append(Chunk(c, box, tuple(found)))
    consumers: dict[Index, list[Index]] = {}
    for chunk in out:
        for b in chunk.sources:
            consumers.setdefault(b, []).append(chunk.index)
    grid_tiles = math.prod(
        sum(1 for s in st if s < hi and s + p > lo)
        for st, p, (lo, hi) in zip(axis_starts, patch, roi)
    )
    return Plan(
        chunks=tuple(out),
        blocks={i: b for i, b in blocks.items() if b is not None},
        consumers={b: tuple(cs) for b, cs in consumers.items()},
        tiles_total=tiles_total,
        tiles_skipped=tiles_skipped,
        grid_tiles=grid_tiles,
    )
