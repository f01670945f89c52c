"""Run tiles of the global grid through a model, and turn summed logits into an answer.

:func:`iter_tile_sums` (behind :func:`iter_tiles` and :func:`run_tiles`) is the one place
tiles go through the network: it sums gaussian-weighted logits of some tiles of the global grid
inside an output box, so callers can add partial sums from different tiles (overlap-add)
and divide by :func:`~napari_scrollseg.engine.tiling.weight_sum` at the end
(:func:`finalize`).

Differences from nnU-Net, by design: logits and weights are summed in float32 (nnU-Net
sums in float16), and the volume is not resampled (see :mod:`..model`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.tiling import BLEND_MODES, tile_overlap, weight_map

if TYPE_CHECKING:
    from napari_scrollseg.engine.model import LoadedModel
    from napari_scrollseg.engine.predict.session import Predictor

__all__ = [
    "data_mask",
    "finalize",
    "finalize_uint8",
    "grid_patch",
    "iter_tile_sums",
    "iter_tiles",
    "prefetch",
    "run_tiles",
]

Box = tuple[slice, ...]


def grid_patch(model: LoadedModel) -> tuple[int, ...]:
    """The model's tile shape on a 3D volume: ``patch_size``, or ``(1, py, px)`` for 2D."""
    return (1, *model.patch_size) if model.is_2d else tuple(model.patch_size)


def _model_of(runner: LoadedModel | Predictor) -> LoadedModel:
    from napari_scrollseg.engine.predict.session import Predictor

    return runner.model if isinstance(runner, Predictor) else runner


def iter_tiles(
    model: LoadedModel | Predictor,
    read: Callable[[Box], np.ndarray],
    tiles: Sequence[tuple[int, ...]],
    *,
    out_box: Box,
    **options: Any,
) -> Iterator[tuple[int, Any]]:
    """Run ``tiles`` batch by batch, yielding ``(tiles_done, sum)`` after each batch.

    ``sum`` is the float32 ``(n_classes, *out_box shape)`` tensor of weighted logits so
    far, kept on the model's device. Closing the generator stops before the next batch.
    Arguments as :func:`run_tiles` (which documents the options).
    """
    for done, sums in iter_tile_sums(model, read, tiles, out_boxes=[out_box], **options):
        yield done, sums[0]


def iter_tile_sums(
    model: LoadedModel | Predictor,
    read: Callable[[Box], np.ndarray],
    tiles: Sequence[tuple[int, ...]],
    *,
    out_boxes: Sequence[Box],
    mirror: bool = True,
    batch_size: int = 4,
    half: bool | None = None,
    tta: str | None = None,
    blend: str = "gaussian",
    on_tile: Callable[[tuple[int, ...], Any], None] | None = None,
) -> Iterator[tuple[int, list[Any]]]:
    """:func:`iter_tiles` into several output boxes at once: each tile's weighted logits
    are added straight into the part of every box it overlaps (no sum over a box holding
    them all). Yields ``(tiles_done, sums)``, one float32 tensor per box in ``out_boxes``
    order. Each box's sum adds the tiles in ``tiles`` order: the result does not depend
    on the other boxes.
    """
    import torch

    if blend not in BLEND_MODES:
        raise ScrollsegError(f"unknown blend mode {blend!r}: use one of {', '.join(BLEND_MODES)}")
    if batch_size < 1:
        raise ScrollsegError(f"batch size must be at least 1, got {batch_size}")
    lm = _model_of(model)
    forward = model.forward
    if hasattr(model, "batch_for"):  # a session: what fits the device's free memory
        batch_size = model.batch_for(batch_size)
    patch = grid_patch(lm)
    outs = [
        torch.zeros(
            (lm.n_classes, *(b.stop - b.start for b in box)), dtype=torch.float32, device=lm.device
        )
        for box in out_boxes
    ]
    gmap_t = torch.from_numpy(weight_map(patch, blend).copy()).to(lm.device)
    tiles = list(tiles)
    batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]

    def load(batch: list[tuple[int, ...]]) -> torch.Tensor:
        x = np.stack([read(tuple(slice(s, s + p) for s, p in zip(t, patch))) for t in batch])
        x = torch.from_numpy(x[:, :, 0] if lm.is_2d else x)
        if lm.device.type == "cuda":  # from pinned memory: the host never waits for the copy
            x = x.pin_memory().to(lm.device, non_blocking=True)
        return x

    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrollseg-read") as pool:
        pending = pool.submit(load, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            x = pending.result()
            pending = pool.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
            logits = forward(x, mirror=mirror, tta=tta, half=half)
            if lm.is_2d:
                logits = logits[:, :, None]
            for tile, tile_logits in zip(batch, logits):
                if on_tile is not None:
                    weighted = tile_logits * gmap_t
                    for out, box in zip(outs, out_boxes):
                        _add_tile(out, tile, patch, weighted, box)
                    on_tile(tile, weighted)
                    continue
                for out, box in zip(outs, out_boxes):
                    ov = tile_overlap(tile, patch, box)
                    if ov is not None:  # in place: no weighted temporary
                        src, dst = ov
                        out[(slice(None), *dst)].addcmul_(
                            tile_logits[(slice(None), *src)], gmap_t[src]
                        )
            done += len(batch)
            yield done, outs


def run_tiles(
    model: LoadedModel | Predictor,
    read: Callable[[Box], np.ndarray],
    tiles: Sequence[tuple[int, ...]],
    *,
    out_box: Box,
    on_batch: Callable[[int, int], None] | None = None,
    **options: Any,
) -> np.ndarray:
    """Sum of the weighted logits of ``tiles`` inside ``out_box``.

    The sum is kept on the model's device and copied back once, at the end.

    Parameters
    ----------
    model
        A :class:`~napari_scrollseg.engine.predict.Predictor` (its lock and forward-pass
        count apply) or a bare :class:`~napari_scrollseg.engine.model.LoadedModel`.
    read
        ``read(box) -> (c, *box)`` normalised float32 input, zero outside the data (as
        :meth:`LoadedModel.reader` gives). Called once per tile, for the next batch while
        the current batch runs on the device.
    tiles
        Tile starts in volume coordinates (from the :class:`Grid`).
    out_box
        The output box (volume coordinates); tiles may stick out of it.
    on_batch
        Called as ``on_batch(tiles_done, tiles_total)`` after each batch.
    options
        Of :func:`iter_tiles`: ``mirror``, ``tta``, ``half`` (passed to
        :meth:`LoadedModel.forward`), ``batch_size`` (tiles per network batch; the network
        sees ``batch_size`` x TTA passes), ``blend`` (``"gaussian"``, nnU-Net's, or
        ``"uniform"``), ``on_tile`` (called as ``on_tile(tile, weighted)`` with each tile's
        weighted logits, a ``(n_classes, *patch)`` tensor on the device, for the
        :class:`TileCache`).

    Returns
    -------
    numpy.ndarray
        float32 ``(n_classes, *out_box shape)``.
    """
    lm = _model_of(model)
    tiles = list(tiles)
    total = np.zeros((lm.n_classes, *(b.stop - b.start for b in out_box)), np.float32)
    out = None
    for done, partial in iter_tiles(model, read, tiles, out_box=out_box, **options):
        out = partial
        if on_batch is not None:
            on_batch(done, len(tiles))
    return total if out is None else out.cpu().numpy()


def prefetch(
    read: Callable[[Box], np.ndarray], tiles: Sequence[tuple[int, ...]], patch: Sequence[int]
) -> Callable[[Box], np.ndarray]:
    """Read the union box of ``tiles`` once (one ``read`` call); serve each tile's box from
    it (the ``read`` :func:`iter_tiles` takes)."""
    lo = [min(t[a] for t in tiles) for a in range(len(patch))]
    hi = [max(t[a] for t in tiles) + patch[a] for a in range(len(patch))]
    data = read(tuple(slice(a, b) for a, b in zip(lo, hi)))

    def cut(box: Box) -> np.ndarray:
        return data[(slice(None), *(slice(s.start - o, s.stop - o) for s, o in zip(box, lo)))]

    return cut


def data_mask(data: Box, box: Box) -> np.ndarray:
    """Boolean mask over ``box`` of the voxels inside ``data`` (the nonzero box)."""
    inside = np.zeros(tuple(b.stop - b.start for b in box), bool)
    inside[
        tuple(
            slice(
                min(max(d.start, b.start), b.stop) - b.start,
                max(min(d.stop, b.stop), b.start) - b.start,
            )
            for d, b in zip(data, box)
        )
    ] = True
    return inside


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
    label 0), as nnU-Net fills the region it cropped away. ``logit_sum`` is not changed.
    """
    return _finalize_into(np.array(logit_sum, dtype=np.float32), np.asarray(weights), data)


def _finalize_into(
    logit_sum: np.ndarray, weights: np.ndarray, data: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`finalize` computed in ``logit_sum`` (float32, overwritten by the
    probabilities, which are returned): no temporary of the class axis's size."""
    valid = weights > 0
    if data is not None:
        valid &= data
    everywhere = bool(valid.all())
    # where nothing is valid the values stay as they are: they are replaced below
    np.divide(logit_sum, weights, out=logit_sum, where=True if everywhere else valid)
    logit_sum -= logit_sum.max(axis=0, keepdims=True)
    np.exp(logit_sum, out=logit_sum)
    logit_sum /= logit_sum.sum(axis=0, keepdims=True)
    if not everywhere:
        invalid = ~valid
        logit_sum[:, invalid] = 0
        logit_sum[0, invalid] = 1
    return logit_sum, _argmax0(logit_sum)


def label_dtype(n_classes: int) -> type:
    """The labels' dtype: uint8, uint16 past 255 classes."""
    return np.uint8 if n_classes <= 255 else np.uint16


def _argmax0(probs: np.ndarray) -> np.ndarray:
    """``argmax(probs, axis=0)`` (the first maximum) as :func:`label_dtype`, by one
    comparison per class without branches (numpy's argmax over the outer axis is strided,
    a boolean-mask assignment mispredicts on noisy maps: both are far slower)."""
    n = probs.shape[0]
    dtype = label_dtype(n)
    if n > 16:
        return np.argmax(probs, axis=0).astype(dtype)
    shape = probs.shape[1:]
    labels = np.zeros(shape, dtype)
    top = probs[0].copy()
    better = np.empty(shape, bool)
    step = np.empty(shape, dtype)
    for c in range(1, n):
        np.greater(probs[c], top, out=better)
        np.maximum(top, probs[c], out=top)
        np.subtract(dtype(c), labels, out=step)  # labels += better * (c - labels)
        np.multiply(step, better.view(np.uint8), out=step)
        labels += step
    return labels


def finalize_uint8(
    logit_sum: Any, weights: Any, *, data: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`finalize` on torch tensors where they are (any device), then the probabilities
    as ``rint(255 p)`` uint8: only uint8 probabilities and the labels cross to the host.

    Returns numpy ``(n_classes, *shape)`` uint8 probabilities and the labels (uint8 for
    up to 255 classes). On the CPU this is :func:`finalize` (numpy, faster there) computed
    in ``logit_sum``'s memory, which it overwrites.
    """

    if logit_sum.device.type == "cpu":
        probs, labels = _finalize_into(
            logit_sum.numpy(), weights.numpy(), None if data is None else data.numpy()
        )
        np.multiply(probs, 255, out=probs)  # in place: the same float32 values
        np.rint(probs, out=probs)
        return probs.astype(np.uint8), labels
    return finalize_torch(logit_sum, weights, data=data)


def finalize_torch(
    logit_sum: Any, weights: Any, *, data: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`finalize_uint8` computed with torch on the tensors' device (any device)."""
    import torch

    valid = weights > 0
    if data is not None:
        valid &= data
    logits = torch.where(valid, logit_sum / torch.where(valid, weights, 1.0), 0.0)
    logits -= logits.amax(dim=0, keepdim=True)
    probs = torch.exp(logits)
    probs /= probs.sum(dim=0, keepdim=True)
    background = torch.zeros((probs.shape[0],) + (1,) * valid.ndim, device=probs.device)
    background[0] = 1
    probs = torch.where(valid, probs, background)
    labels = probs.argmax(dim=0)
    probs.mul_(255).round_()  # round half to even, as numpy's rint
    small = probs.shape[0] <= 255
    labels = labels.to(torch.uint8 if small else torch.int32).cpu().numpy()
    return probs.to(torch.uint8).cpu().numpy(), labels if small else labels.astype(np.uint16)
