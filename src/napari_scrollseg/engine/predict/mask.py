"""A mask for whole-volume prediction: skip tiles where it is empty, blank voxels where it
is zero. The mask may be a coarser level of the volume (nearest-neighbour scaled)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from napari_scrollseg.engine.dask_compute import to_numpy
from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    from napari_scrollseg.engine.volumes import Volume

MAX_MASK_VOXELS = 256 * 1024**2
Span = tuple[int, int]


def mask_filter(
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
    nz = to_numpy(data != 0)
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


def mask_region(mask: Volume, box: tuple[Span, ...], shape: Sequence[int]) -> np.ndarray:
    """The mask over ``box`` of the volume, nearest-neighbour scaled from a coarser mask."""
    mdata = mask.data
    mshape = mdata.shape[-len(shape) :]
    idx = [
        np.minimum((np.arange(a, b) * m) // s, m - 1) for (a, b), m, s in zip(box, mshape, shape)
    ]
    lo = [int(i[0]) for i in idx]
    hi = [int(i[-1]) + 1 for i in idx]
    region = mdata[(..., *(slice(a, b) for a, b in zip(lo, hi)))]
    region = to_numpy(region, scheduler="synchronous")
    if region.ndim > len(shape):
        region = region.reshape(-1, *region.shape[-len(shape) :]).any(axis=0)
    return region[np.ix_(*(i - o for i, o in zip(idx, lo)))] != 0
