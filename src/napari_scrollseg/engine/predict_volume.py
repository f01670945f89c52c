"""Whole-volume prediction: a dask graph over output chunks, resumable, bounded memory.

The answer equals nnU-Net's ``nnUNetPredictor`` on the whole volume: one global
sliding-window grid (:meth:`~napari_scrollseg.engine.model.LoadedModel.grid`), the
gaussian importance map, the division by the summed weights, softmax and argmax
(:func:`~napari_scrollseg.engine.predict.finalize`, as for a region).
Chunking only decides how that sum is organised:

* the output is cut into chunks (``chunk``); the same grid of *blocks* owns the
  tiles: a tile belongs to the block its start lies in, so every tile of the global
  grid runs exactly once;
* a block task runs its tiles and saves their gaussian-weighted logit sum over the
  block's *extended box* (the block reaching forward by one patch) as a partial
  file in ``OUT.zarr/.scrollseg/partial/`` (written to a temporary name, then
  renamed);
* a chunk task adds the parts of the partial sums of the (at most ``2**ndim``)
  blocks that overlap it, divides by the weight sum (analytic; with a mask, the
  weights of the tiles that ran), writes the uint8
  probabilities and the argmax labels as whole zarr chunks, then an empty
  ``OUT.zarr/.scrollseg/done/<chunk>`` marker (again temp + rename), and deletes
  the partials whose consumers are all done.

Partial sums travel through files, not memory, so the memory of a task is set by
the chunk and patch sizes whatever the volume size, and the graph runs unchanged on
dask's threaded scheduler or on a dask.distributed cluster (the output and the
volume must then be on storage the workers share). A rerun of the same command
skips chunks with a done marker and blocks whose partial is already on disk; a
``.scrollseg/lock`` file keeps two live runs off one output. ``superchunk`` groups
chunks so that partial sums are shared only inside a group, which bounds the disk
they use at the cost of running the tiles on group borders once per group.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    from napari_scrollseg.engine.model import LoadedModel
    from napari_scrollseg.engine.tiling import Grid
    from napari_scrollseg.engine.volumes import Volume

log = logging.getLogger(__name__)

STATE_DIR = ".scrollseg"
LABELS_NAME = "prediction"
CLUSTERS = ("local", "local-cuda", "slurm")
DEFAULT_CHUNK = 128
MAX_MASK_VOXELS = 256 * 1024**2

Span = tuple[int, int]  # [start, stop) along one axis


# -- progress -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictProgress:
    """One progress event of :func:`iter_predict_volume` (yielded once per output chunk).

    ``stage`` is ``"predict"`` while chunks are computed, ``"pyramid"`` while the
    coarser levels are written and ``"done"`` at the end. Counts cover the whole
    output; ``chunks_resumed`` chunks were already done by an earlier run and
    ``tiles_skipped`` tiles were left out because the mask is empty there.
    ``tiles_computed`` counts the tiles this run sent through the network (forward
    passes, one per tile whatever the TTA), ``chunks_computed`` the chunks it wrote and
    ``blocks_total`` the block tasks of its graph. ``grid_tiles`` is the number of
    tiles of nnU-Net's grid that touch the output: ``tiles_total / grid_tiles`` is 1
    without super-chunks (every tile runs once).
    """

    stage: str
    out: Path
    chunks_done: int
    chunks_total: int
    chunks_resumed: int
    tiles_done: int
    tiles_total: int
    tiles_skipped: int
    tiles_computed: int
    chunks_computed: int
    blocks_total: int
    grid_tiles: int
    voxels_per_s: float
    elapsed_s: float
    eta_s: float | None

    @property
    def fraction(self) -> float:
        """Fraction of chunks done, 0..1."""
        return self.chunks_done / self.chunks_total if self.chunks_total else 1.0


# -- small parsers shared with the command line ----------------------------------------------
def parse_roi(text: str | None, shape: Sequence[int]) -> tuple[Span, ...]:
    """``"z0:z1,y0:y1,x0:x1"`` (ends may be empty or negative) to spans inside ``shape``."""
    if not text:
        return tuple((0, int(s)) for s in shape)
    parts = text.split(",")
    if len(parts) != len(shape):
        raise ScrollsegError(
            f"--roi {text!r} needs {len(shape)} ranges like z0:z1,y0:y1,x0:x1 (one per axis)"
        )
    spans = []
    for part, size in zip(parts, shape):
        try:
            sl = slice(*(int(v) if v.strip() else None for v in part.split(":")))
        except ValueError:
            raise ScrollsegError(f"--roi range {part!r} is not start:stop with integers") from None
        start, stop, step = sl.indices(int(size))
        if step != 1 or stop <= start:
            raise ScrollsegError(
                f"--roi range {part!r} is empty or stepped inside an axis of size {size}"
            )
        spans.append((start, stop))
    return tuple(spans)


def parse_folds(text: str | Sequence[int | str] | None) -> tuple[int | str, ...] | None:
    """``"0,1"`` / ``"all"`` / ``[0, 1]`` to a folds tuple (``None`` = every fold found)."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    folds: list[int | str] = []
    for item in items:
        item = str(item).strip()
        if item == "all":
            folds.append("all")
        elif item.isdigit():
            folds.append(int(item))
        else:
            raise ScrollsegError(f"fold {item!r} is neither a number nor 'all'")
    return tuple(folds)


def _chunk_shape(chunk: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if chunk is None:
        chunk = DEFAULT_CHUNK
    chunks = (int(chunk),) * ndim if np.isscalar(chunk) else tuple(int(c) for c in chunk)
    if len(chunks) != ndim or min(chunks) < 1:
        raise ScrollsegError(f"chunk {chunk!r} must be one positive size or {ndim} of them")
    return chunks


# -- the block/chunk plan ----------------------------------------------------------------------
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


def _key(index: Sequence[int]) -> str:
    return "_".join(str(i) for i in index)


# -- task specs (picklable: they travel to dask.distributed workers) ----------------------------
@dataclass(frozen=True)
class _ModelRef:
    path: str
    folds: tuple[int | str, ...] | None
    checkpoint: str
    device: str | None

    def load(self) -> LoadedModel:
        from napari_scrollseg.engine.model import load_model

        return load_model(
            self.path, folds=self.folds, checkpoint=self.checkpoint, device=self.device
        )


@dataclass(frozen=True)
class _Job:
    """Everything a task needs, shared by all tasks of one run."""

    model: _ModelRef
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


@dataclass(frozen=True)
class _BlockSpec:
    index: tuple[int, ...]
    tiles: tuple[tuple[int, ...], ...]
    ext: tuple[Span, ...]
    partial: str


@dataclass(frozen=True)
class _ChunkSpec:
    index: tuple[int, ...]
    box: tuple[Span, ...]
    marker: str
    blocks: tuple[_BlockSpec, ...]
    # for each source block, the done markers of every chunk that reads it
    consumers: tuple[tuple[str, ...], ...] = field(default=())


_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def _device_lock(device: object) -> threading.Lock:
    """One lock per device: forward passes on a device are serialized, I/O overlaps."""
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


@functools.lru_cache(maxsize=8)
def _open_cached(source: str) -> Volume:
    from napari_scrollseg.engine.volumes import open_volume

    return open_volume(source)


def _source(volume: Volume) -> str:
    """Where a volume came from: an absolute path for local files, else as given (URL)."""
    src = str(volume.source)
    return str(Path(src).absolute()) if Path(src).exists() else src


def _resolve(volume: Any) -> Volume:
    return _open_cached(volume) if isinstance(volume, str) else volume


@functools.lru_cache(maxsize=16)
def _output_array(path: str, run: str, write_empty_chunks: bool) -> Any:
    """The output level-0 array at ``path``, opened once per process and run.

    ``run`` keeps an array recreated by another run (``overwrite``) from being served
    with stale metadata. ``write_empty_chunks`` skips zarr's per-chunk comparison with
    the fill value (for probabilities, whose chunks are never all zero).
    """
    import zarr

    arr = zarr.open_array(path, mode="r+")
    return arr.with_config({"write_empty_chunks": True}) if write_empty_chunks else arr


def _weights(patch: Sequence[int]) -> np.ndarray:
    from napari_scrollseg.engine.tiling import weight_map

    return weight_map(tuple(int(p) for p in patch), "gaussian")


def _atomic_touch(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(b"")
    os.replace(tmp, path)


def _run_block(job: _Job, spec: _BlockSpec) -> dict:
    """Run a block's tiles once; save their weighted logit sum over its extended box."""
    partial = Path(spec.partial)
    if partial.exists():  # computed by an interrupted earlier run
        return {"block": spec.index, "tiles": len(spec.tiles), "computed": 0}
    import dask

    from napari_scrollseg.engine.predict import run_tiles
    from napari_scrollseg.engine.tiling import tile_overlap

    model = job.model.load()
    volume = _resolve(job.volume)
    patch = tuple(job.grid.patch)
    tiles = spec.tiles
    # prefetch: read + normalise the union of the tiles outside the device lock
    lo = tuple(min(t[a] for t in tiles) for a in range(len(patch)))
    hi = tuple(max(t[a] for t in tiles) + patch[a] for a in range(len(patch)))
    read_box = tuple(slice(a, b) for a, b in zip(lo, hi))
    # the driver's bbox and normaliser: workers do no whole-volume reductions; the read
    # runs in this task's thread (parallelism comes from tasks, not nested thread pools)
    read_all = model.reader(volume, bbox=job.grid.data, normalizer=job.normalizer)
    with dask.config.set(scheduler="synchronous"):
        data = read_all(read_box)

    def read(box: tuple[slice, ...]) -> np.ndarray:
        local = tuple(slice(s.start - o, s.stop - o) for s, o in zip(box, lo))
        return data[(slice(None), *local)]

    out_box = tuple(slice(a, b) for a, b in spec.ext)
    with _device_lock(model.device):
        logits = run_tiles(
            model,
            read,
            [tuple(t) for t in tiles],
            out_box=out_box,
            mirror=job.mirror,
            batch_size=job.batch_size,
            half=job.half,
        )
    parts = [np.asarray(logits, dtype=np.float32)]
    if job.mask is not None:  # tiles were skipped: the weights of the run ones are needed
        weights = np.zeros(logits.shape[1:], dtype=np.float32)
        gmap = _weights(patch)
        for t in tiles:  # the extended box holds every tile of the block whole
            src, dst = tile_overlap(t, patch, out_box)
            weights[dst] += gmap[src]
        parts.append(weights[None])
    partial.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial.with_name(f".{partial.stem}.{uuid.uuid4().hex}.tmp.npy")
    np.save(tmp, np.concatenate(parts) if len(parts) > 1 else parts[0])
    os.replace(tmp, partial)
    return {"block": spec.index, "tiles": len(tiles), "computed": len(tiles)}


def _mask_region(mask: Volume, box: tuple[Span, ...], shape: Sequence[int]) -> np.ndarray:
    """The mask over ``box`` of the volume, nearest-neighbour scaled from a coarser mask."""
    mdata = mask.data
    mshape = mdata.shape[-len(shape) :]
    idx = [
        np.minimum((np.arange(a, b) * m) // s, m - 1) for (a, b), m, s in zip(box, mshape, shape)
    ]
    lo = [int(i[0]) for i in idx]
    hi = [int(i[-1]) + 1 for i in idx]
    region = mdata[(..., *(slice(a, b) for a, b in zip(lo, hi)))]
    region = np.asarray(
        region.compute(scheduler="synchronous") if hasattr(region, "compute") else region
    )
    if region.ndim > len(shape):
        region = region.reshape(-1, *region.shape[-len(shape) :]).any(axis=0)
    return region[np.ix_(*(i - o for i, o in zip(idx, lo)))] != 0


def _finish_chunk(job: _Job, spec: _ChunkSpec, *_blocks: dict) -> dict:
    """Sum the partials over a chunk, normalise, write it, then mark it done."""
    from napari_scrollseg.engine.predict import finalize
    from napari_scrollseg.engine.tiling import weight_sum

    shape = tuple(b - a for a, b in spec.box)
    acc = np.zeros((job.n_classes, *shape), dtype=np.float32)
    weights = np.zeros(shape, dtype=np.float32) if job.mask is not None else None
    for block in spec.blocks:
        part = np.load(block.partial, mmap_mode="r")
        src, dst = [], []
        for (c0, c1), (e0, e1) in zip(spec.box, block.ext):
            a0, a1 = max(c0, e0), min(c1, e1)
            src.append(slice(a0 - e0, a1 - e0))
            dst.append(slice(a0 - c0, a1 - c0))
        acc[(slice(None), *dst)] += part[(slice(0, job.n_classes), *src)]
        if weights is not None:
            weights[tuple(dst)] += part[(job.n_classes, *src)]
    if weights is None:
        box = tuple(slice(a, b) for a, b in spec.box)
        weights = np.asarray(weight_sum(job.grid, box, _weights(job.grid.patch)))
    inside = np.zeros(shape, dtype=bool)
    inside[
        tuple(
            slice(min(max(d.start, c0), c1) - c0, max(min(d.stop, c1), c0) - c0)
            for d, (c0, c1) in zip(job.grid.data, spec.box)
        )
    ] = True
    if job.mask is not None:
        inside &= _mask_region(_resolve(job.mask), spec.box, job.volume_shape)
    probs, labels = finalize(acc, weights, data=inside)
    local = tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(spec.box, job.roi))
    # probabilities hold 255 for class 0 wherever nothing was predicted: never all zero
    probs_arr = _output_array(job.probs_path, job.run, True)
    labels_arr = _output_array(job.labels_path, job.run, False)
    np.multiply(probs, 255, out=probs)  # in place: the same float32 values, no temporaries
    np.rint(probs, out=probs)
    probs_arr[(slice(None), *local)] = probs.astype(np.uint8)
    # stored in the annotation's class ids: nnU-Net label k-1 is class k
    labels_arr[local] = np.add(labels, 1, dtype=labels_arr.dtype)
    marker = Path(spec.marker)
    _atomic_touch(marker)
    # free the partials that every reader has now consumed
    for block, consumers in zip(spec.blocks, spec.consumers):
        if all(Path(c).exists() for c in consumers):
            with contextlib.suppress(FileNotFoundError):
                os.remove(block.partial)
    return {"chunk": spec.index, "voxels": int(np.prod(shape))}


def _axis_starts(grid: Grid) -> list[tuple[int, ...]]:
    """Tile starts per axis in volume coordinates."""
    return [tuple(int(o + s) for s in st) for o, st in zip(grid.offset, grid.starts)]


# -- output layout ---------------------------------------------------------------------------
def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _scrollseg_info(out: Path) -> dict | None:
    """The ``scrollseg`` attributes of an existing prediction output, else None."""
    try:
        attrs = json.loads((out / ".zattrs").read_text())
    except (OSError, ValueError):
        return None
    info = attrs.get("scrollseg") if isinstance(attrs, dict) else None
    return info if isinstance(info, dict) and info.get("kind") == "prediction" else None


def _check_location(out: Path) -> None:
    """Refuse an output path that is a file, holds something else, or cannot be written."""
    for p in [out.parent, *out.parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise ScrollsegError(f"cannot write {out}: {p} is a file, not a folder")
            break
    if out.exists():
        if not out.is_dir():
            raise ScrollsegError(f"{out} is a file; choose another output path (nothing changed)")
        if _scrollseg_info(out) is None and any(out.iterdir()):
            raise ScrollsegError(
                f"{out} holds something that is not a scrollseg prediction; choose another "
                "output path (scrollseg never replaces it, even with --overwrite)"
            )
        probe_dir, made = out, False
    else:
        probe_dir, made = out, True
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        probe = probe_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ScrollsegError(
            f"cannot write to {out} ({exc.strerror or exc}); choose a writable output location"
        ) from None
    finally:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()


def _check_resume(out: Path, config_hash: str, overwrite: bool) -> bool:
    """True when ``out`` holds an unfinished or finished run of the same configuration."""
    info = _scrollseg_info(out)
    if info is None:
        return False
    if overwrite:
        log.info("replacing %s (--overwrite)", out)
        shutil.rmtree(out)
        return False
    if info.get("config_hash") != config_hash:
        raise ScrollsegError(
            f"{out} holds a prediction made with another model or other arguments; "
            "pass --overwrite to replace it or choose another output path"
        )
    if not (out / "labels" / LABELS_NAME / "0" / ".zarray").is_file():
        log.info("%s was interrupted while being created: creating it again", out)
        return False
    return True


def _create_output(
    out: Path,
    *,
    model: LoadedModel,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    spacing: Sequence[float],
    origin: Sequence[float],
    attrs: dict,
) -> None:
    from napari_scrollseg.engine.annotations import ClassTable
    from napari_scrollseg.engine.omezarr import create_image, create_labels

    n_levels = None
    table = ClassTable.from_dataset_json(model.dataset_json)
    omero = {  # names the probability channels (nnU-Net label k-1 = class k)
        "channels": [
            {
                "label": c.name,
                "color": "{:02X}{:02X}{:02X}".format(*c.color),
                "window": {"min": 0, "max": 255, "start": 0, "end": 255},
                "active": c.id == len(table),
            }
            for c in table.classes
        ]
    }
    create_image(
        out,
        shape=(model.n_classes, *shape),
        dtype="uint8",
        chunks=(model.n_classes, *chunks),
        spacing=spacing,
        origin=origin,
        axes="czyx",
        n_levels=n_levels,
        name="probabilities",
        attrs={"scrollseg": attrs, "omero": omero},
        overwrite=True,
    )
    create_labels(
        out,
        LABELS_NAME,
        names={c.id: c.name for c in table.classes},
        colors={c.id: (*c.color, 255) for c in table.classes},
        shape=shape,
        dtype="uint8" if model.n_classes < 255 else "uint16",
        chunks=chunks,
        spacing=spacing,
        origin=origin,
        axes="zyx",
        n_levels=n_levels,
    )


def _write_attrs(out: Path, info: dict) -> None:
    import zarr

    group = zarr.open_group(str(out), mode="r+")
    group.attrs["scrollseg"] = info


def _mask_filter(
    mask: Volume, volume_shape: Sequence[int], patch: Sequence[int]
) -> Callable[[tuple[int, ...]], bool]:
    """A test "does the mask have any nonzero voxel under this tile" (summed-area table)."""
    data = mask.data
    if data.ndim > len(volume_shape):
        data = (data != 0).any(axis=0)
    if data.ndim != len(volume_shape):
        raise ScrollsegError(
            f"the mask has {data.ndim} axes but the volume {len(volume_shape)}; give a (z, y, x) mask"
        )
    if math.prod(data.shape) > MAX_MASK_VOXELS:
        raise ScrollsegError(
            f"the mask {tuple(data.shape)} is too large to index; give a coarser mask "
            "(a pyramid level with at most 256 M voxels is enough)"
        )
    mshape = data.shape
    for m, s in zip(mshape, volume_shape):
        if m > s:
            raise ScrollsegError(
                f"the mask {tuple(mshape)} is larger than the volume {tuple(volume_shape)}; "
                "give a mask of the volume's shape or a coarser level of it"
            )
    nz = np.asarray(data != 0) if not hasattr(data, "compute") else (data != 0).compute()
    sat = np.pad(nz.astype(np.int64), [(1, 0)] * nz.ndim)
    for a in range(nz.ndim):
        sat = np.cumsum(sat, axis=a)

    def any_under(start: tuple[int, ...]) -> bool:
        lo = [min(m, max(0, (t * m) // s)) for t, m, s in zip(start, mshape, volume_shape)]
        hi = [
            min(m, max(0, -((-(t + p) * m) // s)))
            for t, p, m, s in zip(start, patch, mshape, volume_shape)
        ]
        if any(h <= low for low, h in zip(lo, hi)):
            return False
        total = 0
        for corner in itertools.product((0, 1), repeat=len(lo)):
            idx = tuple(h if c else low for c, low, h in zip(corner, lo, hi))
            sign = (-1) ** (len(lo) - sum(corner))
            total += sign * int(sat[idx])
        return total > 0

    return any_under


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def _run_lock(state: Path) -> Iterator[None]:
    """Refuse a second run on the same output while one is alive (stale locks are taken)."""
    lock = state / "lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        host, _, pid = lock.read_text().partition(" ")
        if host != socket.gethostname():
            raise ScrollsegError(
                f"{state.parent} is being written by a scrollseg run on {host}; if no run is "
                f"active any more, delete {lock} and start again"
            ) from None
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            raise ScrollsegError(
                f"{state.parent} is being written by another scrollseg run (pid {pid}); wait "
                "for it to finish or stop it"
            ) from None
        lock.write_text(me)  # the run that held it is gone (killed): take over
    else:
        os.write(fd, me.encode())
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


# -- schedulers ------------------------------------------------------------------------------
class _Cancelled(Exception):
    pass


def _run_threaded(
    dsk: dict, keys: list, num_workers: int, cancel: threading.Event
) -> Iterator[tuple[Any, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    from dask.callbacks import Callback
    from dask.threaded import get

    events: queue.Queue = queue.Queue()

    class _Events(Callback):
        def _pretask(self, key, dsk, state):
            if cancel.is_set():
                raise _Cancelled

        def _posttask(self, key, result, dsk, state, worker_id):
            events.put(("task", key, result))

    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="scrollseg-task")

    def target() -> None:
        try:
            get(dsk, keys, num_workers=num_workers, pool=pool, callbacks=[_Events()._callback])
            events.put(("end", None, None))
        except BaseException as exc:  # handed to the consuming thread
            events.put(("error", None, exc))

    thread = threading.Thread(target=target, name="scrollseg-predict", daemon=True)
    thread.start()
    try:
        while True:
            kind, key, value = events.get()
            if kind == "task":
                yield key, value
            elif kind == "end" or isinstance(value, _Cancelled):
                return
            else:
                raise value
    finally:
        cancel.set()
        thread.join()
        pool.shutdown(wait=True)  # tasks already running finish; none is left behind


def _run_distributed(client, dsk: dict, keys: list) -> Iterator[tuple[Any, Any]]:
    from distributed import as_completed

    futures = client.get(dsk, keys, sync=False)
    try:
        for future in as_completed(futures):
            yield future.key, future.result()
    finally:
        client.cancel(futures)


@contextlib.contextmanager
def open_client(
    *,
    scheduler: str | None = None,
    cluster: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    queue: str | None = None,
    account: str | None = None,
    walltime: str = "04:00:00",
    job_cores: int = 8,
    job_memory: str = "64GB",
    job_extra: Sequence[str] = (),
):
    """A dask.distributed client for ``scheduler`` (address) or a new ``cluster``.

    ``cluster`` is ``"local"`` (LocalCluster of ``workers`` processes), ``"local-cuda"``
    (dask-cuda, one worker per GPU) or ``"slurm"`` (dask-jobqueue SLURMCluster scaled
    to ``workers`` jobs). Yields ``None`` when neither is given (threaded scheduler).
    """
    if scheduler and cluster:
        raise ScrollsegError("give either --scheduler or --cluster, not both")
    if not scheduler and not cluster:
        yield None
        return
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ScrollsegError(
                f"cannot reach the dask scheduler at {scheduler} ({exc}); check the address"
            ) from None
        with client:
            yield client
        return
    if cluster == "local":
        from distributed import LocalCluster

        made = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        )
    elif cluster == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ScrollsegError(
                "--cluster local-cuda needs dask-cuda: pip install dask-cuda"
            ) from None
        made = LocalCUDACluster(dashboard_address=None)
    elif cluster == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ScrollsegError(
                "--cluster slurm needs dask-jobqueue: pip install 'napari-scrollseg[cluster]'"
            ) from None
        made = SLURMCluster(
            queue=queue,
            account=account,
            walltime=walltime,
            cores=job_cores,
            memory=job_memory,
            processes=1,
            job_extra_directives=list(job_extra),
        )
        made.scale(jobs=workers)
    else:
        raise ScrollsegError(f"unknown cluster {cluster!r}; use one of {', '.join(CLUSTERS)}")
    with made, Client(made) as client:
        yield client


# -- the runner ------------------------------------------------------------------------------
def iter_predict_volume(
    model: str | os.PathLike,
    volume: str | os.PathLike | Volume,
    out: str | os.PathLike,
    *,
    folds: str | Sequence[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    device: str | None = None,
    step: float = 0.5,
    mirror: bool = True,
    half: bool | None = None,
    batch_size: int = 4,
    chunk: int | Sequence[int] | None = None,
    superchunk: int | None = None,
    roi: str | Sequence[Span] | None = None,
    mask: str | os.PathLike | Volume | None = None,
    overwrite: bool = False,
    ignore_spacing: bool = False,
    prob_reduction: str = "mean",
    label_reduction: str = "mode",
    num_workers: int = 3,
    client: Any = None,
) -> Iterator[PredictProgress]:
    """Predict a whole volume chunk by chunk, yielding a :class:`PredictProgress` per chunk.

    Parameters
    ----------
    model
        nnU-Net v2 trained-model folder or exported zip.
    volume
        Path/URL of the volume (anything :func:`~napari_scrollseg.engine.volumes.open_volume`
        reads) or an open :class:`Volume`. Distributed runs need a path the workers can open.
    out
        Output OME-Zarr (the prediction layout). Rerunning with the same arguments resumes.
    folds, checkpoint, device, step, mirror, half, batch_size
        As nnU-Net's predictor. ``half``: autocast; None (default) autocasts on CUDA
        devices only, as nnU-Net does (each worker decides for its own device).
    chunk
        Output chunk size (one or three ints); also the size of the blocks of tiles.
    superchunk
        Share partial sums only inside groups of ``superchunk`` chunks per axis; tiles
        straddling two groups run once for each. Bounds the scratch disk held by
        partial sums (whole volume: ~ one slab of blocks; grouped: ~ one slab of a
        group) at the cost of extra tiles (``tiles_total / grid_tiles``). Default: the
        whole output is one group (every tile runs once).
    roi
        ``"z0:z1,y0:y1,x0:x1"`` or spans: predict this box only (tiles from the whole grid).
    mask
        A volume of the same shape or a coarser level of it: tiles under an all-zero
        mask are skipped and voxels where the mask is zero get no prediction (0).
    overwrite
        Replace an existing scrollseg prediction made with other arguments.
    ignore_spacing
        Predict even if the volume's spacing differs from the model's (scrollseg does
        not resample).
    prob_reduction, label_reduction
        Pyramid reductions (see :func:`~napari_scrollseg.engine.omezarr.write_pyramid`).
    num_workers
        Threads of the threaded scheduler (reading and writing overlap the forward pass).
    client
        A ``distributed.Client``: run the graph on its cluster instead.

    Returns (as the generator's value) the output path. Closing the generator cancels.
    """
    from napari_scrollseg import __version__
    from napari_scrollseg.engine.volumes import open_volume

    out = Path(out).absolute()
    _check_location(out)
    from napari_scrollseg.engine.annotations import ClassTable
    from napari_scrollseg.engine.builtin import resolve_model

    model_ref = _ModelRef(
        str(resolve_model(model).absolute()), parse_folds(folds), checkpoint, device
    )
    # in the driver, a distributed run only needs the model's metadata
    loaded = _ModelRef(
        model_ref.path, model_ref.folds, checkpoint, "cpu" if client is not None else device
    ).load()
    vol = volume if hasattr(volume, "levels") else open_volume(volume)
    shape = tuple(int(s) for s in vol.data.shape[-3:])
    spans = roi if roi is not None and not isinstance(roi, str) else parse_roi(roi, shape)
    spans = tuple((int(a), int(b)) for a, b in spans)
    chunks = _chunk_shape(chunk, len(shape))
    loaded.check_volume(vol, ignore_spacing=ignore_spacing)
    grid = loaded.grid(vol, step)
    normalizer = loaded.normalizer(vol)  # whole-volume statistics where the scheme needs them
    patch = tuple(int(p) for p in grid.patch)
    mask_vol = None
    if mask is not None:
        mask_vol = mask if hasattr(mask, "levels") else open_volume(mask)
    keep = _mask_filter(mask_vol, shape, patch) if mask_vol is not None else (lambda start: True)

    config = {
        "model": model_ref.path,
        "model_sha256": loaded.sha256,
        "configuration": loaded.configuration,
        "folds": [str(f) for f in loaded.folds],
        "checkpoint": checkpoint,
        "step": step,
        "tta": "mirror" if mirror else "none",
        "mirror_axes": list(loaded.mirror_axes) if mirror else [],
        "half": "auto" if half is None else half,  # auto: autocast on CUDA workers
        "volume": _source(vol),
        "volume_shape": list(shape),
        "roi": [list(s) for s in spans],
        "chunk": list(chunks),
        "superchunk": superchunk,
        "mask": None if mask_vol is None else _source(mask_vol),
        "label_ids": "class",  # labels/prediction holds class k for nnU-Net label k-1
    }
    config_hash = _config_hash(config)
    resume = _check_resume(out, config_hash, overwrite)
    was_complete = resume and bool((_scrollseg_info(out) or {}).get("complete"))
    state = out / STATE_DIR
    out_shape = tuple(b - a for a, b in spans)
    spacing = tuple(float(s) for s in vol.spacing)
    origin = tuple(
        float(o) + a * s for o, (a, _), s in zip(getattr(vol, "origin", (0.0,) * 3), spans, spacing)
    )
    info = {
        "kind": "prediction",
        "version": __version__,
        "config_hash": config_hash,
        "complete": False,
        "labels": {  # class ids of labels/prediction (nnU-Net's label k-1 is class k)
            str(c.id): c.name for c in ClassTable.from_dataset_json(loaded.dataset_json).classes
        },
        **config,
    }
    if not resume:
        _create_output(
            out,
            model=loaded,
            shape=out_shape,
            chunks=chunks,
            spacing=spacing,
            origin=origin,
            attrs=info,
        )
    (state / "done").mkdir(parents=True, exist_ok=True)
    (state / "partial").mkdir(parents=True, exist_ok=True)
    (state / "config.json").write_text(json.dumps(info, indent=1))
    with _run_lock(state):
        # plan: per axis, the chunks; per super-chunk (a group of chunks whose blocks share
        # partial sums), the ownership of tiles; then the product over axes
        axis_starts = _axis_starts(grid)
        n_chunks = [math.ceil((hi - lo) / c) for (lo, hi), c in zip(spans, chunks, strict=True)]
        group = [min(int(superchunk or n), n) for n in n_chunks]
        plans: list[list[_Axis]] = []
        for starts, p, (lo, hi), c, n, k in zip(
            axis_starts, patch, spans, chunks, n_chunks, group, strict=True
        ):
            plans.append(
                [
                    _plan_axis(starts, p, (lo + g * c, min(hi, lo + (g + k) * c)), c)
                    for g in range(0, n, k)
                ]
            )
        grid_tiles = math.prod(
            sum(1 for s in st if s < hi and s + p > lo)
            for st, p, (lo, hi) in zip(axis_starts, patch, spans, strict=True)
        )
        token = config_hash[:8]
        job = _Job(
            model=model_ref,
            volume=_source(vol) if client is not None else vol,
            grid=grid,
            normalizer=normalizer,
            probs_path=str(out / "0"),
            labels_path=str(out / "labels" / LABELS_NAME / "0"),
            state=str(state),
            roi=spans,
            n_classes=loaded.n_classes,
            mirror=mirror,
            batch_size=batch_size,
            half=half,
            mask=None if mask_vol is None else (_source(mask_vol) if client else mask_vol),
            volume_shape=shape,
            run=uuid.uuid4().hex,
        )

        def marker(index: tuple[int, ...]) -> str:
            return str(state / "done" / _key(index))

        all_chunks = list(itertools.product(*(range(n) for n in n_chunks)))
        done = {c for c in all_chunks if Path(marker(c)).exists()}
        pending = [c for c in all_chunks if c not in done]

        blocks: dict[tuple[int, ...], _BlockSpec | None] = {}
        consumers: dict[tuple[int, ...], list[str]] = {}
        tiles_total = tiles_skipped = 0

        def axes_of(c: tuple[int, ...]) -> tuple[tuple[int, ...], list[_Axis], tuple[int, ...]]:
            """Super-chunk index, its per-axis plans, and the chunk's index inside it."""
            g = tuple(i // k for i, k in zip(c, group, strict=True))
            return (
                g,
                [plans[a][g[a]] for a in range(len(c))],
                tuple(i % k for i, k in zip(c, group, strict=True)),
            )

        def sources(c: tuple[int, ...]) -> list[tuple[int, ...]]:
            g, axes, local = axes_of(c)
            found = []
            for b in itertools.product(*(ax.sources[i] for ax, i in zip(axes, local, strict=True))):
                index = (*g, *b)
                if index not in blocks:
                    starts = [ax.owned[i] for ax, i in zip(axes, b, strict=True)]
                    tiles = list(itertools.product(*starts))
                    kept = tuple(t for t in tiles if keep(t))
                    ext = tuple(ax.ext[i] for ax, i in zip(axes, b, strict=True))
                    path = state / "partial" / f"{_key(index)}.npy"
                    blocks[index] = _BlockSpec(index, kept, ext, str(path)) if kept else None
                    nonlocal tiles_total, tiles_skipped
                    tiles_total += len(tiles)
                    tiles_skipped += len(tiles) - len(kept)
                if blocks[index] is not None:
                    found.append(index)
            return found

        # every block and its consumers (cheap: no I/O), so counts cover the whole output
        chunk_sources = {c: sources(c) for c in all_chunks}
        for c, srcs in chunk_sources.items():
            for b in srcs:
                consumers.setdefault(b, []).append(marker(c))

        dsk: dict = {}
        block_keys: dict[tuple[int, ...], tuple] = {}
        chunk_keys: list[tuple] = []
        for c in pending:
            srcs = chunk_sources[c]
            for b in srcs:
                if b not in block_keys:
                    block_keys[b] = (f"scrollseg-block-{token}", *b)
                    dsk[block_keys[b]] = (_run_block, job, blocks[b])
            spec = _ChunkSpec(
                index=c,
                box=tuple(
                    (lo + i * k, min(hi, lo + (i + 1) * k))
                    for i, k, (lo, hi) in zip(c, chunks, spans, strict=True)
                ),
                marker=marker(c),
                blocks=tuple(blocks[b] for b in srcs),  # type: ignore[misc]
                consumers=tuple(tuple(consumers[b]) for b in srcs),
            )
            key = (f"scrollseg-chunk-{token}", *c)
            chunk_keys.append(key)
            dsk[key] = (_finish_chunk, job, spec, *(block_keys[b] for b in srcs))

        total = len(all_chunks)
        resumed = len(done)
        log.info(
            "predict %s -> %s: %d chunks (%d done before), %d tiles (%d skipped by the mask), "
            "%d block tasks",
            config["volume"],
            out,
            total,
            resumed,
            tiles_total,
            tiles_skipped,
            len(block_keys),
        )
        t0 = time.perf_counter()
        chunks_done = resumed
        tiles_done = sum(len(b.tiles) for b in blocks.values() if b is not None) - sum(
            len(blocks[b].tiles)
            for b in block_keys  # type: ignore[union-attr]
        )
        voxels = 0
        tiles_computed = 0
        chunks_computed = 0

        def event(stage: str) -> PredictProgress:
            elapsed = time.perf_counter() - t0
            rate = voxels / elapsed if elapsed > 0 else 0.0
            now = chunks_done - resumed
            eta = elapsed / now * (total - chunks_done) if now else None
            return PredictProgress(
                stage=stage,
                out=out,
                chunks_done=chunks_done,
                chunks_total=total,
                chunks_resumed=resumed,
                tiles_done=tiles_done,
                tiles_total=tiles_total - tiles_skipped,
                tiles_skipped=tiles_skipped,
                tiles_computed=tiles_computed,
                chunks_computed=chunks_computed,
                blocks_total=len(block_keys),
                grid_tiles=grid_tiles,
                voxels_per_s=rate,
                elapsed_s=elapsed,
                eta_s=eta,
            )

        yield event("predict")
        keys = list(block_keys.values()) + chunk_keys
        if keys:
            cancel = threading.Event()
            runner = (
                _run_threaded(dsk, keys, num_workers, cancel)
                if client is None
                else _run_distributed(client, dsk, keys)
            )
            with contextlib.closing(runner):
                for key, result in runner:
                    if key[0].startswith("scrollseg-block"):
                        tiles_done += result["tiles"]
                        tiles_computed += result["computed"]
                    else:
                        chunks_done += 1
                        chunks_computed += 1
                        voxels += result["voxels"]
                        yield event("predict")
        if chunks_done < total:  # pragma: no cover - the runner stops only when all finished
            raise ScrollsegError(f"only {chunks_done} of {total} chunks were written; run again")

        if was_complete and not keys:  # a finished output: nothing to redo
            yield event("done")
            return out

        from napari_scrollseg.engine.omezarr import write_pyramid

        yield event("pyramid")
        from concurrent.futures import ThreadPoolExecutor

        # the two pyramids are independent: the labels' overlaps the probabilities'
        with ThreadPoolExecutor(1, thread_name_prefix="scrollseg-pyramid") as pool:
            labels_pyramid = pool.submit(
                write_pyramid, out / "labels" / LABELS_NAME, reduction=label_reduction
            )
            write_pyramid(out, reduction=prob_reduction)
            labels_pyramid.result()
        shutil.rmtree(state / "partial", ignore_errors=True)
        _write_attrs(out, {**info, "complete": True})
        yield event("done")
        return out


def predict_volume(
    model: str | os.PathLike,
    volume: str | os.PathLike | Volume,
    out: str | os.PathLike,
    *,
    progress: Callable[[PredictProgress], None] | None = None,
    bar: bool | None = None,
    **options: Any,
) -> Path:
    """Run :func:`iter_predict_volume` to the end and return the output path.

    ``progress`` receives every event. ``bar`` shows a tqdm bar on the terminal
    (chunks, tiles, voxels/s, ETA); by default only when there is no ``progress``.
    Other keyword options as :func:`iter_predict_volume`.
    """
    gen = iter_predict_volume(model, volume, out, **options)
    show = bool(bar or (bar is None and progress is None))
    pbar = None
    try:
        while True:
            try:
                ev = next(gen)
            except StopIteration as stop:
                return Path(stop.value)
            if progress is not None:
                progress(ev)
            if show and pbar is None:  # opened at the first event: errors come before it
                from tqdm.auto import tqdm

                pbar = tqdm(unit="chunk", desc="predict", dynamic_ncols=True)
            if pbar is not None:
                pbar.total = ev.chunks_total
                pbar.n = ev.chunks_done
                pbar.set_postfix(
                    stage=ev.stage,
                    tiles=f"{ev.tiles_done}/{ev.tiles_total}",
                    vox_s=f"{ev.voxels_per_s:.3g}",
                    refresh=False,
                )
                pbar.refresh()
    finally:
        gen.close()
        if pbar is not None:
            pbar.close()
