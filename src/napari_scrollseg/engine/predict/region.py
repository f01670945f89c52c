"""Predict a region with exactly nnU-Net's whole-volume answer there (live inference).

:func:`iter_predict_region` runs every tile of the model's global grid that touches a
box, batch by batch through a :class:`~napari_scrollseg.engine.predict.Predictor`, and
yields after each batch, so a request the view has left is cancelled by closing the
generator. The result inside the box equals what ``nnUNetPredictor`` gives for the whole
volume there; the session's :class:`TileCache` reuses tiles already run while the view
pans. Given ``blocks`` (live inference's view cut nearest the centre first), tiles run
in the blocks' order and each block lands as soon as its tiles have run; ``max_tiles``
caps a request and ``keep`` drops blocks the view has left. :func:`predict_region` runs
it to the end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.predict.session import Predictor
from napari_scrollseg.engine.predict.tiles import (
    _add_tile,
    _finalize_into,
    data_mask,
    iter_tiles,
    label_dtype,
    prefetch,
)
from napari_scrollseg.engine.tiling import BLEND_MODES, weight_map, weight_sum
from napari_scrollseg.engine.volumes import as_czyx

if TYPE_CHECKING:
    from napari_scrollseg.engine.model import LoadedModel
    from napari_scrollseg.engine.predict.cache import TileCache

log = logging.getLogger(__name__)

__all__ = ["RegionProgress", "cache_prefix", "iter_predict_region", "predict_region"]

Box = tuple[slice, ...]


@dataclass(frozen=True)
class RegionProgress:
    """One event of :func:`iter_predict_region`: after each batch, after each block that
    lands (with ``blocks``), and once at the end.

    ``tiles_total`` tiles touch the box, ``tiles_cached`` of them came from the tile cache
    and ``tiles_done`` of the others have run. A block event has ``block`` set and that
    block's float32 ``probs`` ``(n_classes, *block shape)`` and ``labels``; the last event
    (``done``) carries the answer over the box (background where no block landed). ``capped``:
    ``max_tiles`` stopped the request before some blocks (``tiles_capped`` tiles not run).
    """

    box: Box
    tiles_done: int
    tiles_total: int
    tiles_cached: int
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    block: Box | None = None
    blocks_done: int = 0
    blocks_total: int = 1
    capped: bool = False
    tiles_capped: int = 0

    @property
    def done(self) -> bool:
        return self.probs is not None and self.block is None


def _as_box(box: Any, shape: tuple[int, ...]) -> Box:
    out = []
    if len(box) != len(shape):
        raise ScrollsegError(f"box {box} needs {len(shape)} axes for a volume of shape {shape}")
    for b, n in zip(box, shape):
        if isinstance(b, slice):
            start, stop, stride = b.indices(n)
            if stride != 1:
                raise ScrollsegError(f"box {box}: steps are not supported")
        else:
            start, stop = int(b[0]), int(b[1])
        if not 0 <= start < stop <= n:
            raise ScrollsegError(f"box {box} is empty or outside the volume of shape {shape}")
        out.append(slice(start, stop))
    return tuple(out)


@dataclass
class _Plan:
    """What a request runs: blocks answered whole from the cache, blocks to land (in
    order), the tiles already summed (cache hits) and the tiles to run."""

    whole: list[tuple[int, np.ndarray]]
    pending: list[int]
    summed: set[tuple[int, ...]]
    to_run: dict[tuple[int, ...], None]
    tiles_total: int
    tiles_cached: int
    capped: bool
    tiles_capped: int


def block_keys(prefix: tuple, blocks: Sequence[Box]) -> list[tuple]:
    """The tile cache's keys of blocks' whole answers."""
    return [(*prefix, "block", tuple((s.start, s.stop) for s in b)) for b in blocks]


def plan_tiles(
    lookup: Callable[[tuple], np.ndarray | None] | None,
    prefix: tuple,
    tiles_of: list[list[tuple[int, ...]]],
    block_keys: list[tuple] | None,
    max_tiles: int | None,
    add: Callable[[tuple[int, ...], np.ndarray], None] | None = None,
) -> _Plan:
    """Look the blocks' answers and tiles up (``lookup``: the cache's ``get``, or
    ``peek`` to plan without using it; ``add`` sums each tile hit), nearest block first;
    stop at the first block past ``max_tiles`` (the first block with tiles to run runs
    whatever the cap)."""
    whole, pending = [], []
    summed: set[tuple[int, ...]] = set()
    served: set[tuple[int, ...]] = set()  # tiles of blocks answered whole
    to_run: dict[tuple[int, ...], None] = {}  # ordered: nearest block first
    n_cached, capped = 0, False
    for i, tiles in enumerate(tiles_of):
        answer = lookup(block_keys[i]) if lookup is not None and block_keys else None
        if answer is not None:  # panning back: the block's answer, no tile needed
            whole.append((i, answer))
            new = [t for t in tiles if t not in summed and t not in to_run and t not in served]
            served.update(new)
            n_cached += len(new)
            continue
        miss = []
        for t in tiles:
            if t in summed or t in to_run:
                continue
            hit = lookup((*prefix, t)) if lookup is not None else None
            if hit is None:
                miss.append(t)
            else:
                if add is not None:
                    add(t, hit)
                summed.add(t)
                n_cached += t not in served
        if max_tiles is not None and len(to_run) + len(miss) > max_tiles and to_run:
            capped = True
            break
        to_run.update(dict.fromkeys(miss))
        pending.append(i)
    every = {t for tiles in tiles_of for t in tiles}
    left = len(every - summed - served - to_run.keys())
    return _Plan(whole, pending, summed, to_run, len(every), n_cached, capped, left)


def iter_predict_region(
    predictor: Predictor,
    volume: Any,
    box: Any,
    *,
    step: float = 0.5,
    mirror: bool = True,
    batch_size: int = 4,
    half: bool | None = None,
    tta: str | None = None,
    blend: str = "gaussian",
    ignore_spacing: bool = False,
    bbox: Box | None = None,
    blocks: Sequence[Box] | None = None,
    max_tiles: int | None = None,
    keep: Callable[[list[Box]], list[Box]] | None = None,
    key: tuple = (),
) -> Iterator[RegionProgress]:
    """Predict a box batch by batch: a :class:`RegionProgress` per batch, then the answer.

    Parameters
    ----------
    predictor
        The session (model, device lock, tile cache, counters).
    volume
        A :class:`~napari_scrollseg.engine.volumes.Volume`, dask or numpy array
        ``(z, y, x)`` / ``(c, z, y, x)``.
    box
        Spatial box: slices or ``(start, stop)`` pairs, inside the volume.
    step
        nnU-Net's tile step size.
    mirror, tta, half, batch_size, blend
        See :func:`~napari_scrollseg.engine.predict.run_tiles`.
    ignore_spacing
        Predict even if the volume's spacing differs from the model's.
    bbox
        The volume's nonzero box if known (see :meth:`LoadedModel.grid`); by default it
        is computed once per volume (one pass over it) and cached.
    blocks
        Boxes tiling ``box`` in priority order (live: nearest the view centre first). Their
        tiles run in that order and each block lands (an event with its answer) as soon as
        every tile touching it has run; each block's answer is cached too. By default the
        box is one block and lands only in the last event.
    max_tiles
        Stop before the first block that would take the tiles run past this (the first
        block with tiles to run runs whatever the cap); the last event says ``capped``.
    keep
        ``keep(pending_blocks) -> the ones still wanted``, asked before each batch: the
        others are dropped (live: the blocks the view has left).
    key
        Extra items for the tile cache's keys (e.g. the settings a caller keys by).

    Closing the generator stops before the next batch; the tiles already run stay in
    the tile cache. The last event's ``probs`` and ``labels`` are also the return value.
    """
    model = predictor.model
    if blend not in BLEND_MODES:
        raise ScrollsegError(f"unknown blend mode {blend!r}: use one of {', '.join(BLEND_MODES)}")
    model.check_volume(volume, ignore_spacing=ignore_spacing)
    arr, _ = as_czyx(volume)
    box = _as_box(box, tuple(arr.shape[1:]))
    grid = predictor.grid(volume, step, bbox=bbox)
    patch = grid.patch
    cache = predictor.cache
    prefix = cache_prefix(model, volume, grid, mirror=mirror, tta=tta, half=half, blend=blend)
    prefix += tuple(key)
    by_block = blocks is not None
    blocks = [_as_box(b, tuple(arr.shape[1:])) for b in blocks] if by_block else [box]
    tiles_of = [grid.tiles_intersecting(b) for b in blocks]
    keys = block_keys(prefix, blocks) if by_block else None
    logit_sum = np.zeros((model.n_classes, *(b.stop - b.start for b in box)), np.float32)
    plan = plan_tiles(
        cache.get if cache is not None else None,
        prefix,
        tiles_of,
        keys,
        max_tiles,
        lambda t, hit: _add_tile(logit_sum, t, patch, hit, box),
    )
    pending, summed = plan.pending, plan.summed  # summed: tiles whose logits are in the sums
    gmap = weight_map(patch, blend)
    shape = logit_sum.shape[1:]

    def empty() -> tuple[np.ndarray, np.ndarray]:
        return np.zeros_like(logit_sum), np.zeros(shape, label_dtype(model.n_classes))

    answer = empty() if by_block else None  # the answer over the box, filled as blocks land
    n_run = n_done = 0
    out = None  # the running batches' sum (on the device)

    def event(**fields: Any) -> RegionProgress:
        return RegionProgress(
            box, n_run, plan.tiles_total, plan.tiles_cached, blocks_done=n_done,
            blocks_total=len(blocks), capped=plan.capped, tiles_capped=plan.tiles_capped,
            **fields,
        )  # fmt: skip

    def land(i: int, probs: np.ndarray | None = None, labels: np.ndarray | None = None):
        nonlocal answer, n_done
        b = blocks[i]
        local = tuple(slice(s.start - r.start, s.stop - r.start) for s, r in zip(b, box))
        if probs is None:
            acc = np.array(logit_sum[(slice(None), *local)])
            if out is not None:
                acc += out[(slice(None), *local)].cpu().numpy()
            weights = weight_sum(grid, b, gmap)
            probs, labels = _finalize_into(acc, weights, data_mask(grid.data, b))
            if keys and cache is not None:
                cache.put(keys[i], np.concatenate([probs, labels[None].astype(np.float32)]))
        n_done += 1
        if not by_block:
            answer = (probs, labels)
            return None
        answer[0][(slice(None), *local)] = probs  # type: ignore[index]
        answer[1][local] = labels  # type: ignore[index]
        return event(probs=probs, labels=labels, block=b)

    def land_ready() -> Iterator[RegionProgress]:
        for i in list(pending):
            if all(t in summed for t in tiles_of[i]):
                pending.remove(i)
                ev = land(i)
                if ev is not None:
                    yield ev

    for i, whole in plan.whole:
        yield land(i, whole[:-1], whole[-1].astype(answer[1].dtype))  # type: ignore[index,misc]
    yield from land_ready()
    read = model.reader(volume, bbox=grid.data)
    if not by_block and plan.to_run:  # one read of the tiles' union box
        read = prefetch(read, list(plan.to_run), patch)

    def wanted() -> bool:
        """Drop the pending blocks ``keep`` refuses; whether any was dropped."""
        nonlocal pending
        if keep is None or not pending:
            return False
        kept = keep([blocks[i] for i in pending])
        before, pending = pending, [i for i in pending if blocks[i] in kept]
        return pending != before

    def cache_tile(tile: tuple[int, ...], weighted: Any) -> None:
        cache.put((*prefix, tile), weighted.cpu().numpy())  # type: ignore[union-attr]

    wanted()
    while pending:
        todo = list(dict.fromkeys(t for i in pending for t in tiles_of[i] if t not in summed))
        batches = iter_tiles(
            predictor,
            read,
            todo,
            out_box=box,
            mirror=mirror,
            batch_size=batch_size,
            half=half,
            tta=tta,
            blend=blend,
            on_tile=cache_tile if cache is not None else None,
        )
        dropped, base = False, n_run
        with contextlib.closing(batches):  # a close here stops the batches at once
            for done, out in batches:  # noqa: B007 - land() reads the running sum
                summed.update(todo[n_run - base : done])
                n_run = base + done
                yield from land_ready()
                yield event()
                if wanted():
                    dropped = True
                    break
        if out is not None:
            logit_sum += out.cpu().numpy()
            out = None
        if not dropped:
            break
    log.debug("predicted box %s: %d tiles run", box, n_run)
    if answer is None:  # no block landed (the box's one block was dropped)
        answer = empty()
    yield event(probs=answer[0], labels=answer[1])
    return answer


def cache_prefix(
    model: LoadedModel,
    volume: Any,
    grid: Any,
    *,
    mirror: bool = True,
    tta: str | None = None,
    half: bool | None = None,
    blend: str = "gaussian",
) -> tuple:
    """The tile cache's key of a region's tiles, less the tile: model (its weights' hash),
    device, volume, nonzero box, TTA, precision and blending (``key`` items follow)."""
    arr, _ = as_czyx(volume)
    mode = tta or ("mirror" if mirror else "none")
    return (
        model.sha256, model.configuration, str(model.device), arr.name, repr(grid.data),
        mode, model.autocast(half), blend,
    )  # fmt: skip


def predict_region(
    model: LoadedModel | Predictor,
    volume: Any,
    box: Any,
    *,
    on_batch: Callable[[int, int], None] | None = None,
    cache: TileCache | None = None,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of a box, equal to the full-volume prediction there.

    Runs :func:`iter_predict_region` to the end. ``model`` is a session or a loaded
    model (then a session without tile cache, or with ``cache``, is made for the call);
    ``on_batch(tiles_done, tiles_to_run)`` is called after each batch. Other options as
    :func:`iter_predict_region`.

    Returns
    -------
    tuple of numpy.ndarray
        float32 probabilities ``(n_classes, *box shape)`` and uint8 labels ``box shape``.
    """
    session = model if isinstance(model, Predictor) else Predictor(model, cache=cache)
    if cache is not None and session.cache is not cache:
        raise ScrollsegError("a Predictor has its own tile cache: give cache= to the Predictor")
    for ev in iter_predict_region(session, volume, box, **options):
        if ev.done:
            return ev.probs, ev.labels  # type: ignore[return-value]
        if on_batch is not None:
            on_batch(ev.tiles_done, ev.tiles_total - ev.tiles_cached)
    raise AssertionError("unreachable: iter_predict_region ends with the answer")
