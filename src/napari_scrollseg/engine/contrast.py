"""Pure array transforms for looking at scans and predictions (numpy and dask, no Qt).

What the overlay viewer of the First Title Prize does (``SEEDS.md``, "Overlay
viewing"), lazily, so a napari layer or a script can use the same functions:

- scans: the monotone cubic lookup table through (0, 0), (128, 64), (255, 255)
  (16-bit: the points times 257) applied as ``lut[img]`` (:func:`apply_curve`), a
  percentile window from a bounded sample (:func:`percentile_window`), and gamma
  (:func:`scan_values`: ``clip((x - lo) / (hi - lo), 0, 1) ** gamma``);
- probability maps (:func:`overlay`): maps with a maximum above 1 are divided by
  it, maps of another shape are resized to the first (nearest neighbour, with a
  :class:`ResizedWarning`), then the composite (``mean`` or ``max``), then in this
  order horizontal/vertical flip, boost ``min(v * b, 1)`` with ``b`` in [1, 10], and
  invert ``1 - v``;
- :func:`save_png`: a 2D region of any of these, clipped to [0, 1], as uint8
  ``round(v * 255)``.

On dask arrays every transform is a ``map_blocks`` (or a lazy index for flips and
resizing): computing a region computes only the chunks under it. The ``*_levels``
functions apply a transform to each level of a pyramid, so multiscale layers stay
multiscale.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_scrollseg.engine.dask_compute import compute, to_numpy
from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    import dask.array as da

    Array = np.ndarray | da.Array

CURVE_POINTS = ((0, 0), (128, 64), (255, 255))
BOOST_RANGE = (1.0, 10.0)
Composite = Literal["mean", "max"]
# at most this many voxels are read to estimate percentiles or a map's maximum
SAMPLE_VOXELS = 2**22
_SAMPLE_BLOCKS = 5


class ResizedWarning(UserWarning):
    """A probability map had another shape than the first and was resized to it."""


def _is_dask(arr: Any) -> bool:
    return type(arr).__module__.startswith("dask.")


# -- the contrast curve ----------------------------------------------------------------------
@lru_cache(maxsize=2)
def _lut(dtype_name: str) -> np.ndarray:
    from scipy.interpolate import PchipInterpolator

    dtype = np.dtype(dtype_name)
    top = np.iinfo(dtype).max
    factor = 1 if dtype == np.uint8 else 257
    x, y = (np.array(v, float) * factor for v in zip(*CURVE_POINTS))
    values = PchipInterpolator(x, y)(np.arange(top + 1, dtype=float))
    lut = np.clip(np.rint(values), 0, top).astype(dtype)
    lut.flags.writeable = False
    return lut


def curve_lut(dtype: Any) -> np.ndarray:
    """The seed's contrast curve as a lookup table for ``uint8`` (256) or ``uint16`` (65536).

    A monotone cubic (PCHIP) interpolation through :data:`CURVE_POINTS` (times 257
    for 16-bit), rounded to the dtype: midtones darker, both ends fixed.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.uint16):
        raise ScrollsegError(
            f"the contrast curve needs uint8 or uint16 data, not {dtype}: use the percentile "
            "window and gamma for this scan"
        )
    return _lut(dtype.name)


def _curve_block(block: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return lut[block]


def apply_curve(arr: Array) -> Array:
    """``lut[arr]`` with :func:`curve_lut` (same dtype; lazy on dask arrays)."""
    lut = curve_lut(arr.dtype)
    if _is_dask(arr):
        import dask.array as da

        return da.map_blocks(_curve_block, arr, lut, dtype=lut.dtype)
    return lut[np.asarray(arr)]


# -- percentile window and gamma -------------------------------------------------------------
def sample(levels: Array | Sequence[Array], max_voxels: int = SAMPLE_VOXELS) -> np.ndarray:
    """A bounded sample of a volume's values (flat), never a full read of a large level.

    ``levels``: one array or a pyramid (finest first); the coarsest level is used. It
    is read whole when it has at most ``max_voxels`` voxels, else a few of its blocks
    along the diagonal through the centre are read; the result is strided down to at
    most ``max_voxels`` values. Non-finite values are dropped.
    """
    arr = levels[-1] if isinstance(levels, list | tuple) else levels
    if not _is_dask(arr):
        values = np.asarray(arr)
    elif arr.size <= max_voxels:
        values = to_numpy(arr)
    else:
        picks = sorted(
            {
                tuple(round(float(t) * (n - 1)) for n in arr.numblocks)
                for t in np.linspace(0.2, 0.8, _SAMPLE_BLOCKS)
            }
        )
        blocks = compute(*(arr.blocks[idx] for idx in picks))
        values = np.concatenate([np.asarray(b).ravel() for b in blocks])
    values = values.ravel()
    if values.size > max_voxels:
        values = values[:: values.size // max_voxels + 1]
    return values[np.isfinite(values)] if values.dtype.kind == "f" else values


def percentile_window(
    levels: Array | Sequence[Array],
    percentiles: tuple[float, float] = (0.5, 99.5),
    *,
    curve: bool = False,
    max_voxels: int = SAMPLE_VOXELS,
) -> tuple[float, float]:
    """Window ``(lo, hi)`` at the given percentiles of a bounded :func:`sample`.

    With ``curve=True`` the percentiles are those of the curved values
    (:func:`apply_curve`), i.e. the window of the curved scan. ``hi > lo`` always.
    """
    p_lo, p_hi = percentiles
    if not 0 <= p_lo < p_hi <= 100:
        raise ScrollsegError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    values = sample(levels, max_voxels)
    if values.size == 0:
        return 0.0, 1.0
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    if curve:
        values = apply_curve(values)
    lo, hi = (float(v) for v in np.percentile(values, [p_lo, p_hi]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _scan_block(
    block: np.ndarray, lut: np.ndarray | None, lo: float, hi: float, gamma: float
) -> np.ndarray:
    x = lut[block] if lut is not None else block
    v = np.clip((x.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)
    return v if gamma == 1 else v ** np.float32(gamma)


def scan_values(
    arr: Array,
    *,
    curve: bool = False,
    window: tuple[float, float] | None = None,
    gamma: float = 1.0,
) -> Array:
    """A scan as float32 display values in [0, 1]: curve, then window, then gamma.

    ``v = clip((x - lo) / (hi - lo), 0, 1) ** gamma`` with ``x = lut[img]`` when
    ``curve`` else ``img``; ``window`` (in the units of ``x``) defaults to the dtype's
    range for integers and ``(0, 1)`` otherwise. Lazy on dask arrays.
    """
    if gamma <= 0:
        raise ScrollsegError(f"gamma must be positive, got {gamma}")
    lut = curve_lut(arr.dtype) if curve else None
    if window is None:
        kind = np.dtype(arr.dtype).kind
        window = (0.0, float(np.iinfo(arr.dtype).max)) if kind in "ui" else (0.0, 1.0)
    lo, hi = (float(w) for w in window)
    if hi <= lo:
        raise ScrollsegError(f"window must have high > low, got {window}")
    if _is_dask(arr):
        import dask.array as da

        return da.map_blocks(_scan_block, arr, lut, lo, hi, float(gamma), dtype=np.float32)
    return _scan_block(np.asarray(arr), lut, lo, hi, float(gamma))


# -- probability maps ----------------------------------------------------------------------
def map_max(levels: Array | Sequence[Array], max_voxels: int = SAMPLE_VOXELS) -> float:
    """A probability map's maximum: exact when its finest level is small (or numpy),
    else the maximum of a bounded :func:`sample` (coarsest level or a few blocks)."""
    finest = levels[0] if isinstance(levels, list | tuple) else levels
    if not _is_dask(finest) or finest.size <= max_voxels:
        return float(to_numpy(finest).max()) if finest.size else 0.0
    values = sample(levels, max_voxels)
    return float(values.max()) if values.size else 0.0


def resize_nearest(arr: Array, shape: Sequence[int]) -> Array:
    """``arr`` resized to ``shape`` by nearest neighbour (lazy index on dask arrays)."""
    if tuple(arr.shape) == tuple(shape):
        return arr
    if len(shape) != arr.ndim:
        raise ScrollsegError(
            f"cannot resize a {arr.ndim}D map to {len(shape)}D shape {tuple(shape)}"
        )
    out = arr
    for axis, (n_in, n_out) in enumerate(zip(arr.shape, shape)):
        if n_in == n_out:
            continue
        index = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
        out = out[(slice(None),) * axis + (index,)]
    return out


def _overlay_block(
    *blocks: np.ndarray,
    divisors: tuple[float, ...],
    mode: str,
    boost: float,
    invert: bool,
) -> np.ndarray:
    maps = []
    for block, d in zip(blocks, divisors):
        v = block.astype(np.float32)
        if d > 1:
            v = np.minimum(v / np.float32(d), 1)
        maps.append(v)
    if len(maps) == 1:
        v = maps[0]
    elif mode == "mean":
        v = np.mean(maps, axis=0, dtype=np.float32)
    else:
        v = np.maximum.reduce(maps)
    if boost != 1:
        v = np.minimum(v * np.float32(boost), 1)
    if invert:
        v = 1 - v
    return v.astype(np.float32, copy=False)


def overlay(
    maps: Sequence[Array],
    *,
    mode: Composite = "mean",
    flip_h: bool = False,
    flip_v: bool = False,
    boost: float = 1.0,
    invert: bool = False,
    divisors: Sequence[float] | None = None,
) -> Array:
    """Composite of probability maps, then flip, boost and invert (the seed's order).

    Parameters
    ----------
    maps
        Arrays of the same number of dimensions; the last two axes are (y, x). Maps of
        another shape than the first are resized to it (:func:`resize_nearest`) and a
        :class:`ResizedWarning` says so.
    mode
        ``"mean"`` (the seed's *average*) or ``"max"`` (*maximum*).
    flip_h, flip_v
        Mirror along x (horizontal flip) and y (vertical flip).
    boost
        ``v = min(v * boost, 1)``, ``boost`` in [1, 10].
    invert
        ``v = 1 - v``.
    divisors
        Each map's maximum (default :func:`map_max`); a map whose maximum is above 1
        is divided by it (values clipped to 1 if an estimated maximum was low).

    Returns
    -------
    float32 values in [0, 1], lazy when any input is a dask array.
    """
    if not maps:
        raise ScrollsegError("composite needs at least one probability map")
    if mode not in ("mean", "max"):
        raise ScrollsegError(f"composite mode must be 'mean' or 'max', got {mode!r}")
    if not BOOST_RANGE[0] <= boost <= BOOST_RANGE[1]:
        raise ScrollsegError(f"boost must be in [1, 10], got {boost}")
    first = tuple(maps[0].shape)
    if len(first) < 2:
        raise ScrollsegError(f"probability maps need at least 2 dimensions, got shape {first}")
    divisors = [map_max(m) for m in maps] if divisors is None else [float(d) for d in divisors]
    if len(divisors) != len(maps):
        raise ScrollsegError(f"{len(maps)} maps but {len(divisors)} divisors")
    resized = []
    for i, m in enumerate(maps):
        if m.ndim != len(first):
            raise ScrollsegError(
                f"map {i} is {m.ndim}D but the first map is {len(first)}D: composite maps of "
                "the same kind (all 2D or all 3D)"
            )
        if tuple(m.shape) != first:
            warnings.warn(
                f"map {i} has shape {tuple(m.shape)}, not {first} as the first map: resized to "
                "it (nearest neighbour)",
                ResizedWarning,
                stacklevel=2,
            )
            m = resize_nearest(m, first)
        if flip_h:
            m = m[..., ::-1]
        if flip_v:
            m = m[..., ::-1, :]
        resized.append(m)
    kwargs = dict(divisors=tuple(divisors), mode=mode, boost=float(boost), invert=bool(invert))
    if any(_is_dask(m) for m in resized):
        import dask.array as da

        chunks = next(m.chunks for m in resized if _is_dask(m))
        arrays = [m if _is_dask(m) else da.from_array(m, chunks=chunks) for m in resized]
        return da.map_blocks(_overlay_block, *arrays, dtype=np.float32, **kwargs)
    return _overlay_block(*(np.asarray(m) for m in resized), **kwargs)


def overlay_levels(pyramids: Sequence[Sequence[Array]], **options: Any) -> list[Array]:
    """:func:`overlay` level by level over pyramids (one list of levels per map).

    Each map's divisor is taken once (:func:`map_max` of its pyramid) and used at
    every level; pyramids are cut to the shortest.
    """
    if not pyramids:
        raise ScrollsegError("composite needs at least one probability map")
    if options.get("divisors") is None:
        options["divisors"] = [map_max(list(p)) for p in pyramids]
    n = min(len(p) for p in pyramids)
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResizedWarning)
        for level in range(n):
            out.append(overlay([p[level] for p in pyramids], **options))
    seen = set()
    for w in caught:  # say it once per map, not once per level
        text = str(w.message)
        key = text.split(" has shape")[0]
        if key not in seen:
            seen.add(key)
            warnings.warn(text, w.category, stacklevel=2)
    return out


def scan_levels(levels: Sequence[Array], **options: Any) -> list[Array]:
    """:func:`scan_values` applied to each level of a pyramid."""
    return [scan_values(level, **options) for level in levels]


# -- saving ----------------------------------------------------------------------------------
def to_uint8(values: np.ndarray) -> np.ndarray:
    """``round(clip(v, 0, 1) * 255)`` as uint8."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)
    return np.rint(v * 255).astype(np.uint8)


def save_png(arr: Array, path: str | Path, region: tuple[slice | int, ...] | None = None) -> Path:
    """Write ``arr[region]`` (2D once indexed; values in [0, 1]) as an 8-bit grey PNG.

    Only the chunks under ``region`` are computed. Returns the path written.
    """
    from PIL import Image

    part = arr[region] if region is not None else arr
    part = to_numpy(part)
    if part.ndim != 2:
        raise ScrollsegError(
            f"the region to save must be 2D, got shape {part.shape}: give a slice index for "
            "each axis but the last two"
        )
    if part.size == 0:
        raise ScrollsegError("the region to save is empty: the view shows none of the layer")
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(part)).save(path)
    return path
