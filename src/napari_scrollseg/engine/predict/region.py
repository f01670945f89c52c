"""Predict a region with exactly nnU-Net's whole-volume answer there (live inference).

:func:`iter_predict_region` runs every tile of the model's global grid that touches a
box, batch by batch through a :class:`~napari_scrollseg.engine.predict.Predictor`, and
yields after each batch, so a request the view has left is cancelled by closing the
generator. The result inside the box equals what ``nnUNetPredictor`` gives for the whole
volume there; the session's :class:`TileCache` reuses tiles already run while the view
pans. :func:`predict_region` runs it to the end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.predict.session import Predictor
from napari_scrollseg.engine.predict.tiles import (
    _add_tile,
    data_mask,
    finalize,
    iter_tiles,
    prefetch,
)
from napari_scrollseg.engine.tiling import BLEND_MODES, weight_map, weight_sum
from napari_scrollseg.engine.volumes import as_czyx

if TYPE_CHECKING:
    from napari_scrollseg.engine.model import LoadedModel
    from napari_scrollseg.engine.predict.cache import TileCache

log = logging.getLogger(__name__)

__all__ = ["RegionProgress", "iter_predict_region", "predict_region"]

Box = tuple[slice, ...]


@dataclass(frozen=True)
class RegionProgress:
    """One event of :func:`iter_predict_region`: after each batch, and once at the end.

    ``tiles_total`` tiles touch the box, ``tiles_cached`` of them came from the tile cache
    and ``tiles_done`` of the others have run. The last event carries the answer:
    float32 ``probs`` ``(n_classes, *box shape)`` and ``labels`` (None before).
    """

    box: Box
    tiles_done: int
    tiles_total: int
    tiles_cached: int
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.probs is not None


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


def _from_cache(
    cache: TileCache | None, prefix: tuple, tiles: list, logit_sum: np.ndarray, patch: Any, box: Box
) -> list[tuple[int, ...]]:
    """Add the cached tiles' logits into ``logit_sum``; return the tiles still to run."""
    todo = []
    for tile in tiles:
        hit = cache.get((*prefix, tile)) if cache is not None else None
        if hit is None:
            todo.append(tile)
        else:
            _add_tile(logit_sum, tile, patch, hit, box)
    return todo


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
    mode = tta or ("mirror" if mirror else "none")
    prefix = (model.sha256, model.configuration, str(model.device), arr.name, repr(grid.data))
    prefix += (mode, model.autocast(half), blend)
    logit_sum = np.zeros((model.n_classes, *(b.stop - b.start for b in box)), np.float32)
    touching = grid.tiles_intersecting(box)
    tiles = _from_cache(cache, prefix, touching, logit_sum, patch, box)
    n_cached = len(touching) - len(tiles)
    if tiles:
        read = prefetch(model.reader(volume, bbox=grid.data), tiles, patch)

        def keep(tile: tuple[int, ...], weighted: Any) -> None:
            cache.put((*prefix, tile), weighted.cpu().numpy())  # type: ignore[union-attr]

        batches = iter_tiles(
            predictor,
            read,
            tiles,
            out_box=box,
            mirror=mirror,
            batch_size=batch_size,
            half=half,
            tta=tta,
            blend=blend,
            on_tile=keep if cache is not None else None,
        )
        out = None
        with contextlib.closing(batches):  # a close here stops the batches at once
            for done, out in batches:  # noqa: B007 - the last sum is used below
                yield RegionProgress(box, done, len(touching), n_cached)
        logit_sum += out.cpu().numpy()
    weights = weight_sum(grid, box, weight_map(patch, blend))
    log.debug("predicted box %s: %d tiles run", box, len(tiles))
    probs, labels = finalize(logit_sum, weights, data=data_mask(grid.data, box))
    yield RegionProgress(box, len(tiles), len(touching), n_cached, probs, labels)
    return probs, labels


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
