"""Run a model's tiles and predict a region with exactly nnU-Net's answer there.

:func:`run_tiles` is the one place tiles go through the network: it returns the sum of
gaussian-weighted logits of some tiles of the global grid inside an output box, so
callers can add partial sums from different tiles (overlap-add) and divide by
:func:`~napari_scrollseg.engine.tiling.weight_sum` at the end. :func:`predict_region`
does that for every tile touching a box: the result inside the box equals what
``nnUNetPredictor`` gives for the whole volume there (live inference).

Differences from nnU-Net, by design: logits and weights are summed in float32 (nnU-Net
sums in float16), and the volume is not resampled (see :mod:`.model`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.model import as_czyx, forward_passes
from napari_scrollseg.engine.tiling import BLEND_MODES, Grid, weight_map, weight_sum

if TYPE_CHECKING:
    from napari_scrollseg.engine.model import LoadedModel

log = logging.getLogger(__name__)

__all__ = ["finalize", "forward_passes", "grid_patch", "predict_region", "run_tiles"]

Box = tuple[slice, ...]


def grid_patch(model: LoadedModel) -> tuple[int, ...]:
    """The model's tile shape on a 3D volume: ``patch_size``, or ``(1, py, px)`` for 2D."""
    return (1, *model.patch_size) if model.is_2d else tuple(model.patch_size)


def _overlap(tile: Sequence[int], patch: Sequence[int], box: Box) -> tuple[Box, Box] | None:
    src, dst = [], []
    for s, p, b in zip(tile, patch, box):
        lo, hi = max(s, b.start), min(s + p, b.stop)
        if lo >= hi:
            return None
        src.append(slice(lo - s, hi - s))
        dst.append(slice(lo - b.start, hi - b.start))
    return tuple(src), tuple(dst)


def run_tiles(
    model: LoadedModel,
    read: Callable[[Box], np.ndarray],
    tiles: Sequence[tuple[int, ...]],
    *,
    out_box: Box,
    mirror: bool = True,
    batch_size: int = 4,
    half: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    tta: str | None = None,
    blend: str = "gaussian",
) -> np.ndarray:
    """Sum of the weighted logits of ``tiles`` inside ``out_box``.

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
    gmap = weight_map(patch, blend)
    gmap_t = torch.from_numpy(gmap.copy()).to(model.device)
    out = np.zeros((model.n_classes, *(b.stop - b.start for b in out_box)), np.float32)
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
            weighted = (logits * gmap_t).cpu().numpy()
            for t, w in zip(batch, weighted):
                ov = _overlap(t, patch, out_box)
                if ov is not None:
                    out[(slice(None), *ov[1])] += w[(slice(None), *ov[0])]
            done += len(batch)
            if on_batch is not None:
                on_batch(done, len(tiles))
    return out


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
    half: bool = False,
    tta: str | None = None,
    blend: str = "gaussian",
    ignore_spacing: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
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

    Returns
    -------
    tuple of numpy.ndarray
        float32 probabilities ``(n_classes, *box shape)`` and uint8 labels ``box shape``.
    """
    model.check_volume(volume, ignore_spacing=ignore_spacing)
    arr, _ = as_czyx(volume)
    box = _as_box(box, tuple(arr.shape[1:]))
    grid: Grid = model.grid(volume, step)
    tiles = grid.tiles_intersecting(box)
    patch = grid.patch
    ctx_box: Box = box
    ctx = np.zeros((arr.shape[0], *(0 for _ in box)), np.float32)
    if tiles:
        lo = [min(t[a] for t in tiles) for a in range(3)]
        hi = [max(t[a] for t in tiles) + patch[a] for a in range(3)]
        ctx_box = tuple(slice(a, b) for a, b in zip(lo, hi))
        ctx = model.reader(volume)(ctx_box)

    def read(b: Box) -> np.ndarray:
        return ctx[(slice(None), *(slice(s.start - c.start, s.stop - c.start) for s, c in zip(b, ctx_box)))]

    logit_sum = run_tiles(
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
    log.debug("predicted box %s with %d tiles", box, len(tiles))
    return finalize(logit_sum, weights, data=inside)
