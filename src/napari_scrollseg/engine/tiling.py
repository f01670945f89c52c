"""nnU-Net's sliding-window tile grid, its importance map, and test-time augmentation.

The grid is *global*: tile positions are computed once over the whole (cropped) volume
exactly as nnU-Net's ``compute_steps_for_sliding_window`` does, so a region or a chunk
predicted on its own gets the same tiles, and therefore the same answer, as the full
volume. Everything here is numpy only (no torch), so it can be used to plan work.

TTA and blending modes
----------------------
``tta="mirror"`` (nnU-Net's default: flips along the model's allowed mirroring axes,
8 passes in 3D, 4 in 2D) and ``blend="gaussian"`` (nnU-Net's importance map) reproduce
``nnUNetPredictor``. The other modes come from the seed workflows and are *not*
nnU-Net-equivalent: ``tta="none"`` (one pass, same as ``use_mirroring=False``),
``tta="rot-flip-12"`` (2D models only: rotations by 0/90/180/270 degrees times flips
none/horizontal/vertical, each inverted before averaging) and ``blend="uniform"``
(every tile weighted 1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError

__all__ = [
    "BLEND_MODES",
    "TTA_MODES",
    "Grid",
    "gaussian_map",
    "make_grid",
    "steps_for_sliding_window",
    "tile_overlap",
    "tta_transforms",
    "weight_map",
    "weight_sum",
]

TTA_MODES = ("mirror", "none", "rot-flip-12")
BLEND_MODES = ("gaussian", "uniform")

Box = tuple[slice, ...]


def steps_for_sliding_window(size: int, patch: int, step: float) -> tuple[int, ...]:
    """Tile start positions along one axis, as nnU-Net's ``compute_steps_for_sliding_window``.

    Parameters
    ----------
    size
        Length of the axis; must be ``>= patch`` (pad first).
    patch
        Tile length along the axis.
    step
        Tile step as a fraction of the patch, in ``(0, 1]``.
    """
    if not 0 < step <= 1:  # also NaN
        raise ScrollsegError(
            f"step must be in (0, 1] (a fraction of the patch; nnU-Net uses 0.5), got {step}"
        )
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch {patch}; pad it first")
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    if n == 1:
        return (0,)
    actual = (size - patch) / (n - 1)
    return tuple(int(np.round(actual * i)) for i in range(n))


@dataclass(frozen=True)
class Grid:
    """nnU-Net's sliding-window grid over a whole volume, in volume coordinates.

    Attributes
    ----------
    shape
        Spatial shape the grid covers: the nonzero bounding box, padded to at least the
        patch size as nnU-Net pads (content centred, odd remainder after).
    patch
        Tile shape; a 2D model on a 3D volume has patch ``(1, py, px)``.
    starts
        Per axis, tile starts relative to ``offset`` (nnU-Net's steps; every slice for
        the slice axis of a 2D model).
    offset
        Volume coordinate where the covered region starts (bounding-box start minus the
        padding before it; may be negative).
    data
        The region of the volume holding real data (nnU-Net's ``crop_to_nonzero``
        bounding box). Input outside it is zero after normalisation; output outside it is
        background.
    """

    shape: tuple[int, ...]
    patch: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]
    offset: tuple[int, ...]
    data: Box = field(default=())

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the grid (nnU-Net's number of sliding-window steps)."""
        return math.prod(len(s) for s in self.starts)

    def tiles(self) -> list[tuple[int, ...]]:
        """All tile starts, in volume coordinates."""
        return self._product([tuple(o + s for s in st) for o, st in zip(self.offset, self.starts)])

    def tile_box(self, start: tuple[int, ...]) -> Box:
        """The box a tile covers, in volume coordinates."""
        return tuple(slice(s, s + p) for s, p in zip(start, self.patch))

    def tiles_intersecting(self, box: Box) -> list[tuple[int, ...]]:
        """Starts (volume coordinates) of the tiles that overlap ``box``."""
        per_axis = []
        for o, st, p, sl in zip(self.offset, self.starts, self.patch, box):
            per_axis.append(tuple(o + s for s in st if o + s < sl.stop and o + s + p > sl.start))
        return self._product(per_axis)

    def tiles_starting_in(self, box: Box) -> list[tuple[int, ...]]:
        """Starts (volume coordinates) of the tiles whose start lies in ``box``.

        Every tile starts in exactly one box of a partition of the volume, so this assigns
        each tile to one owner (overlap-add). Tiles may start before 0 (padding): they
        belong to boxes whose start is <= their start along that axis, so pass boxes that
        begin at ``min(0, offset)`` for the first block.
        """
        per_axis = []
        for o, st, sl in zip(self.offset, self.starts, box):
            per_axis.append(tuple(o + s for s in st if sl.start <= o + s < sl.stop))
        return self._product(per_axis)

    @staticmethod
    def _product(per_axis: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        if any(len(a) == 0 for a in per_axis):
            return []
        return [tuple(int(v) for v in t) for t in itertools.product(*per_axis)]


def make_grid(
    shape: tuple[int, ...],
    patch: tuple[int, ...],
    step: float = 0.5,
    *,
    offset: tuple[int, ...] | None = None,
) -> Grid:
    """The global tile grid over a region of ``shape`` starting at ``offset``.

    Parameters
    ----------
    shape
        Spatial shape of the region with data (the nonzero bounding box, or the volume).
    patch
        Tile shape. For a 2D model on a 3D volume give the 2D patch ``(py, px)``: every
        slice along the first axis is then a row of tiles, as in nnU-Net.
    step
        Tile step as a fraction of the patch (nnU-Net's ``tile_step_size``).
    offset
        Where the region starts in the volume (default: at 0).
    """
    shape = tuple(int(s) for s in shape)
    offset = tuple(int(o) for o in offset) if offset is not None else (0,) * len(shape)
    if len(offset) != len(shape):
        raise ValueError(f"offset {offset} does not match shape {shape}")
    patch = tuple(int(p) for p in patch)
    slice_axes = len(shape) - len(patch)
    if slice_axes not in (0, 1):
        raise ValueError(f"patch {patch} does not fit shape {shape}")
    full_patch = (1,) * slice_axes + patch
    padded = tuple(max(s, p) for s, p in zip(shape, full_patch))
    pad_before = tuple((n - s) // 2 for n, s in zip(padded, shape))
    starts = []
    for axis, (n, p) in enumerate(zip(padded, full_patch)):
        if axis < slice_axes:
            starts.append(tuple(range(n)))
        else:
            starts.append(steps_for_sliding_window(n, p, step))
    data = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return Grid(
        shape=padded,
        patch=full_patch,
        starts=tuple(starts),
        offset=tuple(o - b for o, b in zip(offset, pad_before)),
        data=data,
    )


@lru_cache(maxsize=8)
def _gaussian(
    patch: tuple[int, ...], sigma_scale: float, value_scaling_factor: float
) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    g /= np.max(g) / value_scaling_factor
    # nnU-Net keeps the map in float16 and replaces zeros by the smallest nonzero value
    g = g.astype(np.float16)
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    out = g.astype(np.float32)
    out.setflags(write=False)
    return out


def gaussian_map(
    patch: tuple[int, ...], *, sigma_scale: float = 1 / 8, value_scaling_factor: float = 10
) -> np.ndarray:
    """nnU-Net's gaussian importance map for one tile (``compute_gaussian``), as float32.

    The values are nnU-Net's float16 values (it keeps the map in half precision), peak
    ``value_scaling_factor``, zeros replaced by the smallest nonzero weight. Read-only.
    """
    return _gaussian(tuple(int(p) for p in patch), float(sigma_scale), float(value_scaling_factor))


def weight_map(patch: tuple[int, ...], blend: str = "gaussian") -> np.ndarray:
    """Per-voxel tile weight for a blending mode (``"gaussian"`` or ``"uniform"``).

    ``patch`` is the grid's patch (``(1, py, px)`` for 2D models); the map has that shape.
    """
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
    patch = tuple(int(p) for p in patch)
    if blend == "uniform":
        return np.ones(patch, np.float32)
    core = tuple(p for i, p in enumerate(patch) if not (i == 0 and p == 1 and len(patch) == 3))
    # a 2D model's map is the 2D gaussian, repeated along the slice axis
    return gaussian_map(core).reshape(patch)


def tile_overlap(tile: Sequence[int], patch: Sequence[int], box: Box) -> tuple[Box, Box] | None:
    """(slice into the tile, slice into the box) of their intersection, or None."""
    src, dst = [], []
    for s, p, b in zip(tile, patch, box):
        lo, hi = max(s, b.start), min(s + p, b.stop)
        if lo >= hi:
            return None
        src.append(slice(lo - s, hi - s))
        dst.append(slice(lo - b.start, hi - b.start))
    return tuple(src), tuple(dst)


def weight_sum(grid: Grid, box: Box, gmap: np.ndarray) -> np.ndarray:
    """Sum of the weights of every grid tile inside ``box`` (nnU-Net's ``n_predictions``).

    Computed from the grid alone (no network). Zero where no tile covers a voxel.
    """
    out = np.zeros(tuple(b.stop - b.start for b in box), np.float32)
    for tile in grid.tiles_intersecting(box):
        ov = tile_overlap(tile, grid.patch, box)
        if ov is not None:
            out[ov[1]] += gmap[ov[0]]
    return out


def tta_transforms(mode: str, *, mirror_axes: tuple[int, ...], n_spatial: int) -> list[tuple]:
    """The test-time augmentations of a mode, as ``(k_rot90, flip_axes)`` pairs.

    Axes are spatial axes of a network batch (0 = first spatial axis). Rotations turn the
    last two axes. The identity comes first. ``"mirror"`` gives the identity plus every
    non-empty combination of ``mirror_axes`` (nnU-Net's order); ``"rot-flip-12"``
    requires 2 spatial dimensions.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    if mode == "none":
        return [(0, ())]
    if mode == "mirror":
        combos = [
            c for i in range(len(mirror_axes)) for c in itertools.combinations(mirror_axes, i + 1)
        ]
        return [(0, ()), *((0, tuple(c)) for c in combos)]
    if n_spatial != 2:
        raise ValueError("tta='rot-flip-12' is for 2D models only")
    return [(k, f) for k in range(4) for f in ((), (1,), (0,))]
