"""Run a model's tiles and predict a region with exactly nnU-Net's answer there.

:func:`run_tiles` is the one place tiles go through the network: it returns the sum of
gaussian-weighted logits of some tiles of the global grid inside an output box, so
callers can add partial sums from different tiles (overlap-add) and divide by
:func:`~napari_scrollseg.engine.tiling.weight_sum` at the end. :func:`predict_region`
does that for every tile touching a box: the result inside the box equals what
``nnUNetPredictor`` gives for the whole volume there (live inference); a
:class:`TileCache` lets it reuse tiles already run while the view pans.

Differences from nnU-Net, by design: logits and weights are summed in float32 (nnU-Net
sums in float16), and the volume is not resampled (see :mod:`.model`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.model import as_czyx, forward_passes
from napari_scrollseg.engine.tiling import BLEND_MODES, Grid, tile_overlap, weight_map, weight_sum

if TYPE_CHECKING:
    from napari_scrollseg.engine.model import LoadedModel

log = logging.getLogger(__name__)

__all__ = ["TileCache", "finalize", "forward_passes", "grid_patch", "predict_region", "run_tiles"]

Box = tuple[slice, ...]


def grid_patch(model: LoadedModel) -> tuple[int, ...]:
    """The model's tile shape on a 3D volume: ``patch_size``, or ``(1, py, px)`` for 2D."""
    return (1, *model.patch_size) if model.is_2d else tuple(model.patch_size)


def run_tiles(
    model: LoadedModel,
    read: Callable[[Box], np.ndarray],
    tiles: Sequence[tuple[int, ...]],
    *,
    out_box: Box,
    mirror: bool = True,
    batch_size: int = 4,
    half: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    tta: str | None = None,
    blend: str = "gaussian",
    on_tile: Callable[[tuple[int, ...], Any], None] | None = None,
) -> np.ndarray:
    """Sum of the weighted logits of ``tiles`` inside ``out_box``.

    The sum is kept on the model's device and copied back once, at the end.

    Parameters
    ----------
    model
        A :class:`~napari_scrollseg.engine.model.LoadedModel`.
    read
        ``read(box) -> (c, *box)`` normalised float32 input, zero outside the data (as
        :meth:`LoadedModel.reader` gives). Called once per tile, for the next batch while
        the current batch runs on the device.
    tiles
        Tile starts in volume coordinates (from the :class:`Grid`).
    out_box
        The output box (volume coordinates); tiles may stick out of it.
    mirror, tta, half
        Passed to :meth:`LoadedModel.forward`.
    batch_size
        Tiles per network batch (the network sees ``batch_size`` x TTA passes).
    on_batch
        Called as ``on_batch(tiles_done, tiles_total)`` after each batch.
    blend
        ``"gaussian"`` (nnU-Net) or ``"uniform"``.
    on_tile
        Called as ``on_tile(tile, weighted)`` with each tile's weighted logits, a
        ``(n_classes, *patch)`` tensor on the device (for :class:`TileCache`).

    Returns
    -------
    numpy.ndarray
        float32 ``(n_classes, *out_box shape)``.
    """
    import torch

    if blend not in BLEND_MODES:
        raise ScrollsegError(f"unknown blend mode {blend!r}: use one of {', '.join(BLEND_MODES)}")
    if batch_size < 1:
        raise ScrollsegError(f"batch size must be at least 1, got {batch_size}")
    patch = grid_patch(model)
    out = torch.zeros(
        (model.n_classes, *(b.stop - b.start for b in out_box)),
        dtype=torch.float32,
        device=model.device,
    )
    gmap_t = torch.from_numpy(weight_map(patch, blend).copy()).to(model.device)
    tiles = list(tiles)
    batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]

    def load(batch: list[tuple[int, ...]]) -> np.ndarray:
        x = np.stack([read(tuple(slice(s, s + p) for s, p in zip(t, patch))) for t in batch])
        return x[:, :, 0] if model.is_2d else x

    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrollseg-read") as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            x = pending.result()
            pending = pool.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
            logits = model.forward(torch.from_numpy(x), mirror=mirror, tta=tta, half=half)
            if model.is_2d:
                logits = logits[:, :, None]
            for tile, weighted in zip(batch, logits * gmap_t):
                _add_tile(out, tile, patch, weighted, out_box)
                if on_tile is not None:
                    on_tile(tile, weighted)
            done += len(batch)
            if on_batch is not None:
                on_batch(done, len(tiles))
    return out.cpu().numpy()


def _add_tile(out: Any, tile: Sequence[int], patch: Sequence[int], weighted: Any, box: Box) -> None:
    """``out[box ∩ tile] += weighted[...]`` for numpy arrays or torch tensors."""
    ov = tile_overlap(tile, patch, box)
    if ov is not None:
        out[(slice(None), *ov[1])] += weighted[(slice(None), *ov[0])]


def finalize(
    logit_sum: np.ndarray, weights: np.ndarray, *, data: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels from summed weighted logits and the summed weights.

    ``softmax(logit_sum / weights)`` and its argmax; voxels with no weight or outside
    ``data`` (a boolean mask: the nonzero box) are background (probability 1 for class 0,
    label 0), as nnU-Net fills the region it cropped away.
    """
    valid = weights > 0
    if data is not None:
        valid &= data
    logits = np.divide(logit_sum, weights, out=np.zeros_like(logit_sum), where=valid)
    logits -= logits.max(axis=0, keepdims=True)
    probs = np.exp(logits, dtype=np.float32)
    probs /= probs.sum(axis=0, keepdims=True)
    probs[:, ~valid] = 0
    probs[0, ~valid] = 1
    labels = np.argmax(probs, axis=0).astype(np.uint8 if probs.shape[0] <= 255 else np.uint16)
    return probs, labels


class TileCache:
    """Least-recently-used store of per-tile weighted logits, for live inference.

    :func:`predict_region` with a cache reuses the tiles it has already run for the same
    model, volume, TTA, precision and blending (the grid's tiles do not move when the
    view pans), so only new tiles reach the network; the answer is unchanged. Drop it
    (or call :meth:`clear`) when the model changes. Thread-safe.

    Parameters
    ----------
    max_bytes
        Memory bound; the least recently used tiles are evicted beyond it.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        import threading

        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> np.ndarray | None:
        """The stored array for ``key`` (marked as recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        """Store ``value``; evict least recently used entries beyond ``max_bytes``."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        """Forget every tile."""
        with self._lock:
            self._items.clear()
            self.nbytes = 0


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


def predict_region(
    model: LoadedModel,
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
    on_batch: Callable[[int, int], None] | None = None,
    bbox: Box | None = None,
    cache: TileCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of a box, equal to the full-volume prediction there.

    Runs every tile of the model's global grid (:meth:`LoadedModel.grid`) that touches the
    box, reading the input around the box once.

    Parameters
    ----------
    model
        A loaded model.
    volume
        A :class:`~napari_scrollseg.engine.volumes.Volume`, dask or numpy array
        ``(z, y, x)`` / ``(c, z, y, x)``.
    box
        Spatial box: slices or ``(start, stop)`` pairs, inside the volume.
    step
        nnU-Net's tile step size.
    mirror, tta, half, batch_size, blend, on_batch
        See :func:`run_tiles`.
    ignore_spacing
        Predict even if the volume's spacing differs from the model's.
    bbox
        The volume's nonzero box if known (see :meth:`LoadedModel.grid`); by default it
        is computed once per volume (one pass over it) and cached.
    cache
        A :class:`TileCache`: tiles already run for this model and volume are reused.

    Returns
    -------
    tuple of numpy.ndarray
        float32 probabilities ``(n_classes, *box shape)`` and uint8 labels ``box shape``.
    """
    if blend not in BLEND_MODES:
        raise ScrollsegError(f"unknown blend mode {blend!r}: use one of {', '.join(BLEND_MODES)}")
    model.check_volume(volume, ignore_spacing=ignore_spacing)
    arr, _ = as_czyx(volume)
    box = _as_box(box, tuple(arr.shape[1:]))
    grid: Grid = model.grid(volume, step, bbox=bbox)
    patch = grid.patch
    mode = tta or ("mirror" if mirror else "none")
    prefix = (model.sha256, model.configuration, str(model.device), arr.name, repr(grid.data))
    prefix += (mode, model.autocast(half), blend)
    logit_sum = np.zeros((model.n_classes, *(b.stop - b.start for b in box)), np.float32)
    tiles = []
    for tile in grid.tiles_intersecting(box):
        hit = cache.get((*prefix, tile)) if cache is not None else None
        if hit is None:
            tiles.append(tile)
        else:
            _add_tile(logit_sum, tile, patch, hit, box)
    ctx_box: Box = box
    ctx = np.zeros((arr.shape[0], *(0 for _ in box)), np.float32)
    if tiles:
        lo = [min(t[a] for t in tiles) for a in range(3)]
        hi = [max(t[a] for t in tiles) + patch[a] for a in range(3)]
        ctx_box = tuple(slice(a, b) for a, b in zip(lo, hi))
        ctx = model.reader(volume, bbox=grid.data)(ctx_box)

    def read(b: Box) -> np.ndarray:
        return ctx[
            (slice(None), *(slice(s.start - c.start, s.stop - c.start) for s, c in zip(b, ctx_box)))
        ]

    def keep(tile: tuple[int, ...], weighted: Any) -> None:
        cache.put((*prefix, tile), weighted.cpu().numpy())  # type: ignore[union-attr]

    if tiles:
        logit_sum += run_tiles(
            model,
            read,
            tiles,
            out_box=box,
            mirror=mirror,
            batch_size=batch_size,
            half=half,
            on_batch=on_batch,
            tta=tta,
            blend=blend,
            on_tile=keep if cache is not None else None,
        )
    weights = weight_sum(grid, box, weight_map(patch, blend))
    inside = np.zeros(weights.shape, bool)
    d = grid.data
    inside[
        tuple(
            slice(max(dd.start, b.start) - b.start, max(min(dd.stop, b.stop) - b.start, 0))
            for dd, b in zip(d, box)
        )
    ] = True
    log.debug("predicted box %s: %d tiles run", box, len(tiles))
    return finalize(logit_sum, weights, data=inside)
