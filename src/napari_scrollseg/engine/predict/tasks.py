"""The tasks of a whole-volume run (picklable: they travel to dask.distributed workers).

A block task runs its tiles once and adds their gaussian-weighted logits straight into one
piece per chunk that reads it (the part of the chunk its tiles touch), left in the run's
:class:`~.partials.PartialSums` (memory within a budget on one machine, else a file); a
chunk task adds its pieces in its fixed order of source blocks (the sum does not depend on
which block finished first, so a rerun gives the same bits), divides by the
weight sum (analytic; with a mask, the weights of the tiles that ran), writes the uint8
probabilities and the argmax labels as whole zarr chunks, then its done marker, and drops
the partials all their readers have consumed (a piece held in memory is freed as soon as
its chunk has read it). A task's memory is set by the chunk and patch sizes whatever the
volume size. A block task stops between two tile batches once its run is cancelled.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.dask_compute import thread_scheduler
from napari_scrollseg.engine.predict.mask import mask_region
from napari_scrollseg.engine.predict.partials import PartialSums
from napari_scrollseg.engine.predict.schedule import CancelEvent, Cancelled
from napari_scrollseg.engine.predict.store import (
    atomic_touch,
    marker_path,
    output_array,
    partial_path,
)
from napari_scrollseg.engine.predict.store import key as file_key
from napari_scrollseg.engine.zarr_chunks import write_box

if TYPE_CHECKING:
    from napari_scrollseg.engine.predict.plan import Plan
    from napari_scrollseg.engine.predict.session import ModelRef, Predictor
    from napari_scrollseg.engine.tiling import Grid
    from napari_scrollseg.engine.volumes import ChunkCache, Volume

Span = tuple[int, int]


@dataclass(frozen=True)
class Job:
    """Everything a task needs, shared by all tasks of one run."""

    model: Predictor | ModelRef  # the session (threaded) or how workers load one
    volume: Any  # a Volume (threaded) or its source path (distributed: reopened per worker)
    grid: Grid
    normalizer: Callable[[np.ndarray], np.ndarray]  # computed once by the driver
    probs_path: str
    labels_path: str
    state: str
    roi: tuple[Span, ...]
    n_classes: int
    mirror: bool
    batch_size: int
    half: bool | None
    mask: Any = None  # a Volume / path of the mask, or None
    volume_shape: tuple[int, ...] = ()
    run: str = ""  # unique per run: keys the output arrays opened once per process
    partials: PartialSums = field(default_factory=PartialSums)  # disk only unless budgeted
    cancel: CancelEvent = field(default_factory=CancelEvent)  # set: block tasks stop early
    inputs: ChunkCache | None = None  # decoded input chunks shared by neighbouring blocks


@dataclass(frozen=True)
class BlockSpec:
    index: tuple[int, ...]
    tiles: tuple[tuple[int, ...], ...]
    ext: tuple[Span, ...]
    partial: str
    readers: tuple[tuple[str, tuple[Span, ...]], ...] = ()  # pending chunks: (key, box)


@dataclass(frozen=True)
class ChunkSpec:
    index: tuple[int, ...]
    box: tuple[Span, ...]
    marker: str
    blocks: tuple[BlockSpec, ...]
    # for each source block, the done markers of every chunk that reads it
    consumers: tuple[tuple[str, ...], ...] = field(default=())


def _session(job: Job) -> Predictor:
    """The run's session: the driver's (threaded), else one per worker process and model."""
    from napari_scrollseg.engine.predict.session import Predictor

    if isinstance(job.model, Predictor):
        return job.model
    from distributed import get_worker

    ref = job.model
    worker = get_worker()
    with _WORKER_GUARD:
        sessions = worker.__dict__.setdefault("_scrollseg_sessions", {})
        if ref not in sessions:
            sessions[ref] = Predictor(
                ref.path, folds=ref.folds, checkpoint=ref.checkpoint, device=ref.device, cache=None
            )
        return sessions[ref]


_WORKER_GUARD = threading.Lock()


@functools.lru_cache(maxsize=8)
def _open_cached(source: str) -> Volume:
    from napari_scrollseg.engine.volumes import open_volume

    return open_volume(source)


def source_of(volume: Volume) -> str:
    """Where a volume came from: an absolute path for local files, else as given (URL)."""
    src = str(volume.source)
    return str(Path(src).absolute()) if Path(src).exists() else src


def _resolve(volume: Any) -> Volume:
    return _open_cached(volume) if isinstance(volume, str) else volume


@functools.lru_cache(maxsize=4)
def _weights(patch: tuple[int, ...]) -> np.ndarray:
    """The gaussian tile weights (read-only: shared by every task)."""
    from napari_scrollseg.engine.tiling import weight_map

    gmap = weight_map(tuple(int(p) for p in patch), "gaussian")
    gmap.flags.writeable = False
    return gmap


_SUMS: OrderedDict = OrderedDict()  # a few chunks' weight sums, by the tiles' layout
_SUMS_LOCK = threading.Lock()
_SUMS_KEEP = 8


def _weight_sum(grid: Grid, box: tuple[Span, ...]) -> np.ndarray:
    """:func:`~napari_scrollseg.engine.tiling.weight_sum` of a chunk, remembered for the
    next chunk with the same tiles at the same places relative to it (every inner chunk
    when the chunk is a multiple of the grid's step). Read-only."""
    from napari_scrollseg.engine.tiling import weight_sum

    patch = tuple(int(p) for p in grid.patch)
    key = (
        patch,
        tuple(
            tuple(o + s - a for s in st if a - p < o + s < b)
            for o, st, p, (a, b) in zip(grid.offset, grid.starts, patch, box)
        ),
        tuple(b - a for a, b in box),
    )
    with _SUMS_LOCK:
        if key in _SUMS:
            _SUMS.move_to_end(key)
            return _SUMS[key]
    sums = weight_sum(grid, tuple(slice(a, b) for a, b in box), _weights(patch))
    sums.flags.writeable = False
    with _SUMS_LOCK:
        _SUMS[key] = sums
        while len(_SUMS) > _SUMS_KEEP:
            _SUMS.popitem(last=False)
    return sums


def _overlap(box: tuple[Span, ...], ext: tuple[Span, ...]) -> tuple[tuple[slice, ...], ...]:
    """``(src, dst)``: where a chunk ``box`` and a block's extended box ``ext`` overlap,
    in ``ext``'s and in ``box``'s coordinates."""
    src, dst = [], []
    for (c0, c1), (e0, e1) in zip(box, ext):
        a0, a1 = max(c0, e0), min(c1, e1)
        src.append(slice(a0 - e0, a1 - e0))
        dst.append(slice(a0 - c0, a1 - c0))
    return tuple(src), tuple(dst)


def _check_cancel(job: Job) -> None:
    if job.cancel.is_set():
        raise Cancelled


def _piece_box(box: tuple[Span, ...], ext: tuple[Span, ...]) -> tuple[slice, ...]:
    """The part of a chunk ``box`` that a block with extended box ``ext`` touches (volume
    coordinates): where the block's piece for that chunk lies."""
    return tuple(slice(max(c0, e0), min(c1, e1)) for (c0, c1), (e0, e1) in zip(box, ext))


def _with_weights(
    piece: Any, box: tuple[slice, ...], tiles: Sequence[tuple[int, ...]], patch: tuple[int, ...]
) -> Any:
    """``piece`` with one more channel: the summed gaussian weights of ``tiles`` in ``box``."""
    import torch

    from napari_scrollseg.engine.tiling import tile_overlap

    weights = np.zeros(tuple(piece.shape[1:]), dtype=np.float32)
    gmap = _weights(patch)
    for t in tiles:
        ov = tile_overlap(t, patch, box)
        if ov is not None:
            weights[ov[1]] += gmap[ov[0]]
    return torch.cat([piece, torch.from_numpy(weights[None]).to(piece.device)])


def run_block(job: Job, spec: BlockSpec) -> dict:
    """Run a block's tiles once; leave their weighted logit sums, one piece per chunk
    still to read them (:func:`_piece_box`), in ``job.partials``.

    A cancelled run (``job.cancel``) stops it between two tile batches, keeping nothing
    (:class:`~.schedule.Cancelled`): a rerun computes the block again."""
    if job.partials.has(spec.partial):  # computed earlier (an interrupted run's file)
        return {"block": spec.index, "tiles": len(spec.tiles), "computed": 0}
    _check_cancel(job)
    from napari_scrollseg.engine.predict.tiles import iter_tile_sums, prefetch

    session = _session(job)
    stats = session.stats
    model = session.model
    volume = _resolve(job.volume)
    patch = tuple(job.grid.patch)
    tiles = spec.tiles

    spent = [0.0]  # this task's normalisation time (other tasks' runs concurrently)

    def normalize(raw: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        try:
            return job.normalizer(raw)
        finally:
            spent[0] += time.perf_counter() - t

    # prefetch: read + normalise the union of the tiles outside the device lock, with the
    # driver's bbox and normaliser (workers do no whole-volume reductions); the read runs
    # in this task's thread (parallelism comes from tasks, not nested thread pools)
    read_all = model.reader(volume, bbox=job.grid.data, normalizer=normalize, cache=job.inputs)
    t0 = time.perf_counter()
    with thread_scheduler("synchronous"):  # not dask.config.set: that is every thread's
        read = prefetch(read_all, tiles, patch)
    stats.add("read", time.perf_counter() - t0 - spent[0])
    stats.add("normalize", spent[0])

    names = [name for name, _ in spec.readers]
    boxes = [_piece_box(box, spec.ext) for _, box in spec.readers]
    with session.lock:  # one block on the device at a time: bounded device memory
        _check_cancel(job)
        t0, net0 = time.perf_counter(), stats.seconds["network"]
        sums: list = []
        batches = iter_tile_sums(  # the sums stay on the device
            session,
            read,
            [tuple(t) for t in tiles],
            out_boxes=boxes,
            mirror=job.mirror,
            batch_size=job.batch_size,
            half=job.half,
        )
        with contextlib.closing(batches):
            for _, running in batches:
                _check_cancel(job)  # between two batches: a cancel waits for one batch only
                sums = running
        # the session's lock keeps other blocks' network time out of this difference
        stats.add("accumulate", time.perf_counter() - t0 - (stats.seconds["network"] - net0))
    if job.mask is not None:  # tiles were skipped: the weights of the run ones are needed
        with stats.time("accumulate"):
            sums = [_with_weights(s, box, tiles, patch) for s, box in zip(sums, boxes)]
    with stats.time("partial_write"):
        pieces = dict(zip(names, sums))
        if job.partials.put(spec.partial, pieces):
            stats.count("partial_bytes_written", sum(p.numel() * p.element_size() for p in sums))
        stats.peak(job.partials.held_bytes)
    return {"block": spec.index, "tiles": len(tiles), "computed": len(tiles)}


def _as_tensor(array: np.ndarray, device: Any) -> Any:
    """A read-only numpy array as a tensor on ``device`` (shared memory on the CPU)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch warns that the array is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(device)


TRIM_EVERY = 8  # chunks finished between two trims: each trim makes freed pages fault again
_FINISHED = itertools.count(1)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Hand the memory the heap has freed back to the system (glibc's ``malloc_trim``,
    every thread's arena; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def finish_chunk(job: Job, spec: ChunkSpec, *_blocks: dict) -> dict:
    """Sum the partials over a chunk and finalise it where they are (the session's device),
    write it, then mark it done. Only the uint8 probabilities and labels reach the host."""
    import torch

    from napari_scrollseg.engine.predict.tiles import data_mask, finalize_uint8

    session = _session(job)
    stats, device = session.stats, session.device
    shape = tuple(b - a for a, b in spec.box)
    channels = job.n_classes + (job.mask is not None)  # the weights last, with a mask
    acc = None
    with stats.time("partial_read"):
        for block in spec.blocks:  # in the chunk's fixed order: the same sum on every run
            piece, from_disk = job.partials.take(block.partial, file_key(spec.index))
            if from_disk:
                piece = torch.from_numpy(np.array(piece))  # writable: it may become ``acc``
                stats.count("partial_bytes_read", piece.numel() * 4)
            piece = piece.to(device)
            dst = _overlap(spec.box, block.ext)[1]
            if acc is None and tuple(piece.shape[1:]) == shape:
                acc = piece  # the first piece covers the chunk: it is the sum so far
                continue
            if acc is None:
                acc = torch.zeros((channels, *shape), dtype=torch.float32, device=device)
            acc[(slice(None), *dst)] += piece
    if acc is None:  # no tile touched the chunk (a mask skipped them all)
        acc = torch.zeros((channels, *shape), dtype=torch.float32, device=device)
    weights = acc[job.n_classes] if job.mask is not None else None
    acc = acc[: job.n_classes]
    with stats.time("finalize"):
        if weights is None:  # read-only, shared: never written to
            weights = _as_tensor(_weight_sum(job.grid, spec.box), device)
        box = tuple(slice(a, b) for a, b in spec.box)
        inside = None  # None: the chunk lies wholly inside the data
        if not all(d.start <= b.start and b.stop <= d.stop for d, b in zip(job.grid.data, box)):
            inside = data_mask(job.grid.data, box)
        if job.mask is not None:
            region = mask_region(_resolve(job.mask), spec.box, job.volume_shape)
            inside = region if inside is None else inside & region
        data = None if inside is None else torch.from_numpy(inside).to(device)
        probs8, labels = finalize_uint8(acc, weights, data=data)
        del acc, weights
    local = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(spec.box, job.roi))
    with stats.time("write"):
        # probabilities hold 255 for class 0 wherever nothing was predicted: never all zero
        probs_arr = output_array(job.probs_path, job.run, True)
        labels_arr = output_array(job.labels_path, job.run, False)
        write_box(probs_arr, (slice(0, probs8.shape[0]), *local), probs8)
        # stored in the annotation's class ids: nnU-Net label k-1 is class k
        write_box(labels_arr, local, np.add(labels, 1, dtype=labels_arr.dtype))
    marker = Path(spec.marker)
    atomic_touch(marker)
    # free the partials that every reader has now consumed
    for block, consumers in zip(spec.blocks, spec.consumers):
        if all(Path(c).exists() for c in consumers):
            job.partials.drop(block.partial)
    if next(_FINISHED) % TRIM_EVERY == 0:
        trim_heap()  # hand freed sums back to the system: else the heap keeps the front's peak
    return {"chunk": spec.index, "voxels": int(np.prod(shape))}


@dataclass(frozen=True)
class Graph:
    """The dask graph of the pending chunks and the blocks they read."""

    dsk: dict
    block_keys: dict[tuple[int, ...], tuple]  # block index -> task key
    chunk_keys: list[tuple]

    @property
    def keys(self) -> list[tuple]:
        return [*self.block_keys.values(), *self.chunk_keys]

    @property
    def chunk_order(self) -> list[tuple[tuple, tuple]]:
        """``(chunk key, keys of the blocks it reads)`` in the plan's chunk order."""
        return [(k, tuple(self.dsk[k][3:])) for k in self.chunk_keys]


def build_graph(the_plan: Plan, job: Job, pending: Sequence[tuple[int, ...]], token: str) -> Graph:
    """Tasks for the ``pending`` chunks of ``the_plan`` and the blocks they read."""
    state = Path(job.state)
    chunks = {c.index: c for c in the_plan.chunks}
    todo = set(pending)
    names = {c: (file_key(c), chunks[c].box) for c in todo}  # shared by the blocks read
    specs = {
        i: BlockSpec(
            i,
            b.tiles,
            b.ext,
            str(partial_path(state, i)),
            tuple(names[c] for c in the_plan.consumers[i] if c in todo),
        )
        for i, b in the_plan.blocks.items()
    }
    markers = {c: str(marker_path(state, c)) for c in chunks}
    # one tuple of done markers per block, shared by every chunk that reads the block: a
    # tuple per (chunk, block) grew as chunks x 27 x 27 strings (gigabytes on a scroll)
    readers_done = {
        b: tuple(markers[c] for c in consumers) for b, consumers in the_plan.consumers.items()
    }
    dsk: dict = {}
    block_keys: dict[tuple[int, ...], tuple] = {}
    chunk_keys: list[tuple] = []
    for index in pending:
        chunk = chunks[index]
        for b in chunk.sources:
            if b not in block_keys:
                block_keys[b] = (f"scrollseg-block-{token}", *b)
                dsk[block_keys[b]] = (run_block, job, specs[b])
        spec = ChunkSpec(
            index=index,
            box=chunk.box,
            marker=markers[index],
            blocks=tuple(specs[b] for b in chunk.sources),
            consumers=tuple(readers_done[b] for b in chunk.sources),
        )
        key = (f"scrollseg-chunk-{token}", *index)
        chunk_keys.append(key)
        dsk[key] = (finish_chunk, job, spec, *(block_keys[b] for b in chunk.sources))
    return Graph(dsk, block_keys, chunk_keys)
