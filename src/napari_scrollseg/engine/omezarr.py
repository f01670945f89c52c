"""Write OME-Zarr multiscale images and label images (NGFF v0.4, zarr format 2).

One home for the on-disk layout that the phantom, the annotation export and the
prediction writer share. Level 0 may be written chunk by chunk by the caller
(:func:`create_image` then writes into ``group["0"]``); :func:`write_pyramid`
then derives levels ``1..`` from level 0, one output chunk per dask task, so
memory stays bounded by the chunk size.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from napari_scrollseg.engine.dask_compute import store
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.safe_write import check_replaceable

if TYPE_CHECKING:
    import dask.array as da
    import zarr

log = logging.getLogger(__name__)

Reduction = Literal["mean", "max", "mode", "nearest"]
NGFF_VERSION = "0.4"
SPATIAL = "zyx"


def _compressor():
    """zstd level 1, whole chunks (numcodecs ``Zstd``, not inside Blosc): for uint8
    probabilities the same size as Blosc's zstd 1 and about 5x faster to write, since
    Blosc cuts a chunk into small blocks that zstd compresses one by one (stores written
    with another compressor read as before: each array records its own)."""
    from numcodecs import Zstd

    return Zstd(level=1)


def level_shapes(
    shape: Sequence[int], axes: str, n_levels: int, factor: int = 2
) -> list[tuple[int, ...]]:
    """Shapes of pyramid levels: spatial axes shrink by ``factor`` (ceil), others stay."""
    shapes = [tuple(int(s) for s in shape)]
    for _ in range(1, n_levels):
        prev = shapes[-1]
        shapes.append(
            tuple(max(1, math.ceil(s / factor)) if a in SPATIAL else s for s, a in zip(prev, axes))
        )
    return shapes


def default_levels(shape: Sequence[int], axes: str, min_size: int = 32, max_levels: int = 6) -> int:
    """As many 2x levels as keep the smallest spatial axis at or above ``min_size``."""
    smallest = min(s for s, a in zip(shape, axes) if a in SPATIAL)
    n = 1
    while n < max_levels and smallest / 2**n >= min_size:
        n += 1
    return n


def multiscales_metadata(
    *,
    axes: str,
    spacing: Sequence[float],
    origin: Sequence[float] | None,
    n_levels: int,
    name: str,
    factor: int = 2,
) -> dict:
    """The NGFF v0.4 ``multiscales`` entry (spacing and origin given for the spatial axes)."""
    spacing = [float(s) for s in spacing]
    origin = [0.0] * len(spacing) if origin is None else [float(o) for o in origin]
    axes_meta = []
    for a in axes:
        if a == "c":
            axes_meta.append({"name": "c", "type": "channel"})
        else:
            axes_meta.append({"name": a, "type": "space", "unit": "micrometer"})
    datasets = []
    n_extra = len(axes) - len(spacing)
    for level in range(n_levels):
        scale = [1.0] * n_extra + [s * factor**level for s in spacing]
        # a coarser voxel's centre sits half a (coarse - fine) voxel further in
        translation = [0.0] * n_extra + [
            o + s * (factor**level - 1) / 2 for o, s in zip(origin, spacing)
        ]
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    return {"version": NGFF_VERSION, "name": name, "axes": axes_meta, "datasets": datasets}


def create_image(
    path: str | Path,
    *,
    shape: Sequence[int],
    dtype: np.dtype | str,
    chunks: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float] | None = None,
    axes: str = "zyx",
    n_levels: int | None = None,
    name: str = "image",
    attrs: dict | None = None,
    overwrite: bool = False,
    image_label: dict | None = None,
) -> zarr.Group:
    """Create an empty OME-Zarr multiscale image group with all its level arrays.

    Chunks of a level never exceed that level's shape. Unwritten chunks read as 0.
    """
    import zarr

    path = Path(path)
    if len(shape) != len(axes) or len(chunks) != len(axes):
        raise ScrollsegError(
            f"shape {tuple(shape)} and chunks {tuple(chunks)} must match axes {axes!r}"
        )
    if path.exists():
        if not overwrite:
            raise ScrollsegError(f"{path} already exists; choose another path or pass overwrite")
        check_replaceable(path, "zarr image")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    n_levels = n_levels or default_levels(shape, axes)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    for level, lshape in enumerate(level_shapes(shape, axes, n_levels)):
        group.create_array(
            str(level),
            shape=lshape,
            chunks=tuple(min(c, s) for c, s in zip(chunks, lshape)),
            dtype=dtype,
            compressors=_compressor(),
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
    meta = {
        "multiscales": [
            multiscales_metadata(
                axes=axes, spacing=spacing, origin=origin, n_levels=n_levels, name=name
            )
        ]
    }
    if image_label is not None:
        meta["image-label"] = {"version": NGFF_VERSION, **image_label}
    meta.update(attrs or {})
    group.attrs.update(meta)
    return group


def create_labels(
    image_path: str | Path,
    name: str,
    *,
    colors: dict[int, Sequence[int]] | None = None,
    names: dict[int, str] | None = None,
    **kwargs,
) -> zarr.Group:
    """Create the labels image ``image_path/labels/<name>`` (axes without ``c``).

    ``colors`` maps label values to RGBA (0..255) and ``names`` to class names; both
    go into the NGFF ``image-label`` metadata. Other arguments as :func:`create_image`.
    """
    import zarr

    labels_root = zarr.open_group(str(Path(image_path) / "labels"), mode="a", zarr_format=2)
    existing = list(labels_root.attrs.get("labels", []))
    if name not in existing:
        labels_root.attrs["labels"] = [*existing, name]
    image_label: dict = {"source": {"image": "../../"}}
    if colors:
        image_label["colors"] = [
            {"label-value": int(v), "rgba": [int(c) for c in rgba]} for v, rgba in colors.items()
        ]
    if names:
        image_label["properties"] = [{"label-value": int(v), "class": n} for v, n in names.items()]
    return create_image(
        Path(image_path) / "labels" / name, name=name, image_label=image_label, **kwargs
    )


def _pair_sum(block: np.ndarray, factors: tuple[int, ...], dtype: type) -> np.ndarray:
    """Sums over each window of ``factors`` (a power of 2 per axis; shape divisible by
    them) by repeated pairwise adds of strided views: no float pass, no reshaped reduce."""
    out = block  # the first add widens: no separate copy to ``dtype``
    for axis, f in enumerate(factors):
        while f > 1:
            lo = (slice(None),) * axis + (slice(0, None, 2),)
            hi = (slice(None),) * axis + (slice(1, None, 2),)
            out = np.add(out[lo], out[hi], dtype=dtype)
            f //= 2
    return out.astype(dtype, copy=False)


def _powers_of_two(factors: tuple[int, ...]) -> bool:
    return all(f > 0 and f & (f - 1) == 0 for f in factors)


def _reduce_block(block: np.ndarray, factors: tuple[int, ...], reduction: Reduction) -> np.ndarray:
    """Downsample one block by integer ``factors`` (edges padded by replication)."""
    pad = [(0, (-s) % f) for s, f in zip(block.shape, factors)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    if reduction == "nearest":
        return block[tuple(slice(None, None, f) for f in factors)]
    n = math.prod(factors)
    fast = _powers_of_two(factors) and block.dtype.kind in "ub" and block.dtype.itemsize <= 2
    if reduction == "mean" and fast and block.dtype.kind == "u":
        # the exact integer form of rint(mean): round half to even, as np.rint
        wide = n * np.iinfo(block.dtype).max if block.dtype.kind == "u" else n
        s = _pair_sum(block, factors, np.uint16 if wide < 2**16 else np.uint32)
        q, r = np.divmod(s, n)
        q += (2 * r > n) | ((2 * r == n) & (q % 2 == 1))
        return q.astype(block.dtype)
    if reduction == "mode" and fast and n < 256:
        # counts of each value per window; ties go to the larger label
        values = (
            np.flatnonzero(np.bincount(block.ravel(), minlength=1))
            if block.dtype.kind == "u"
            else np.unique(block)
        )
        best = np.zeros(tuple(s // f for s, f in zip(block.shape, factors)), block.dtype)
        most = np.zeros(best.shape, np.uint8)
        for v in values:  # ascending: >= lets the larger label win ties
            count = _pair_sum(block == v, factors, np.uint8)
            wins = count >= most
            best[wins] = v
            np.maximum(most, count, out=most)
        return best
    shape = []
    for s, f in zip(block.shape, factors):
        shape += [s // f, f]
    view = block.reshape(shape)
    red_axes = tuple(range(1, 2 * len(factors), 2))
    if reduction == "mean":
        out = view.mean(axis=red_axes)
        if np.issubdtype(block.dtype, np.integer):
            out = np.rint(out)
        return out.astype(block.dtype)
    if reduction == "max":
        return view.max(axis=red_axes)
    if reduction == "mode":
        # label maps have few distinct values: count each one per window;
        # ties go to the larger label (ink beats papyrus beats air)
        values = np.unique(block)
        counts = np.stack([(view == v).sum(axis=red_axes) for v in values])
        best = counts.shape[0] - 1 - np.argmax(counts[::-1], axis=0)
        return values[best].astype(block.dtype)
    raise ScrollsegError(f"unknown reduction {reduction!r}; use mean, max, mode or nearest")


def downsample(arr: da.Array, axes: str, reduction: Reduction, factor: int = 2) -> da.Array:
    """Downsample a dask array by ``factor`` along spatial axes, block by block."""
    import dask.array as da

    factors = pyramid_factors(axes, factor)
    # blocks must hold whole windows: rechunk to multiples of the factor
    chunks = tuple(max(f, (c // f) * f) for c, f in zip((c[0] for c in arr.chunks), factors))
    arr = arr.rechunk(chunks)
    out_chunks = tuple(tuple(math.ceil(c / f) for c in dim) for dim, f in zip(arr.chunks, factors))
    return da.map_blocks(_reduce_block, arr, factors, reduction, dtype=arr.dtype, chunks=out_chunks)


def downsample_chunk(
    source: zarr.Array,
    target: zarr.Array,
    start: Sequence[int],
    factors: tuple[int, ...],
    reduction: Reduction,
) -> None:
    """Fill the chunk of ``target`` that starts at ``start`` from the ``source`` box under
    it (whole zarr chunks when the chunk shapes match): read, reduce, write."""
    from napari_scrollseg.engine.zarr_chunks import read_box, write_box

    dst = tuple(slice(a, min(a + c, s)) for a, c, s in zip(start, target.chunks, target.shape))
    src = tuple(
        slice(d.start * f, min(d.stop * f, s)) for d, f, s in zip(dst, factors, source.shape)
    )
    small = _reduce_block(read_box(source, src), factors, reduction)
    write_box(target, dst, small[tuple(slice(0, d.stop - d.start) for d in dst)])


def _downsample_level(
    source: zarr.Array,
    target: zarr.Array,
    factors: tuple[int, ...],
    reduction: Reduction,
    threads: int,
) -> None:
    """Fill ``target`` from ``source``, one whole target chunk per step
    (:func:`downsample_chunk`, ``threads`` at once)."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    check_reduction(reduction)
    grid = [range(0, s, c) for s, c in zip(target.shape, target.chunks)]

    def one(start: tuple[int, ...]) -> None:
        downsample_chunk(source, target, start, factors, reduction)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="scrollseg-pyramid") as pool:
        for _ in pool.map(one, itertools.product(*grid)):
            pass


def check_reduction(reduction: str) -> None:
    """A clear error for a reduction :func:`_reduce_block` does not know."""
    if reduction not in ("mean", "max", "mode", "nearest"):
        raise ScrollsegError(f"unknown reduction {reduction!r}; use mean, max, mode or nearest")


def pyramid_factors(axes: str, factor: int = 2) -> tuple[int, ...]:
    """The downsampling factor of each axis from one level to the next: ``factor`` on
    spatial axes, 1 on the others."""
    return tuple(factor if a in SPATIAL else 1 for a in axes)


def write_pyramid(
    group: zarr.Group | str | Path,
    *,
    reduction: Reduction = "mean",
    scheduler: str | None = None,
    threads: int = 2,
) -> None:
    """Fill levels ``1..`` of an OME-Zarr image from its level 0 (in place), each level
    from the one before, one target chunk at a time (``threads`` at once; ``scheduler``
    ``"synchronous"`` means one): memory is a few chunks whatever the image size."""
    import zarr

    if not hasattr(group, "attrs"):
        group = zarr.open_group(str(group), mode="r+")
    ms = group.attrs["multiscales"][0]
    axes = "".join(a["name"] for a in ms["axes"])
    paths = [d["path"] for d in ms["datasets"]]
    factors = pyramid_factors(axes)
    threads = 1 if scheduler in ("synchronous", "sync", "single-threaded") else threads
    for src, dst in zip(paths[:-1], paths[1:]):
        _downsample_level(group[src], group[dst], factors, reduction, threads)
        log.debug("pyramid level %s: %s", dst, group[dst].shape)


def write_image(
    path: str | Path,
    data: np.ndarray | da.Array,
    *,
    spacing: Sequence[float],
    chunks: Sequence[int] | None = None,
    reduction: Reduction = "mean",
    labels_of: str | Path | None = None,
    label_colors: dict[int, Sequence[int]] | None = None,
    label_names: dict[int, str] | None = None,
    **kwargs,
) -> zarr.Group:
    """Write an array as a complete OME-Zarr image (or, with ``labels_of``, a labels image).

    ``data`` may be numpy or dask; it is stored chunk by chunk.
    """
    import dask.array as da

    axes = kwargs.pop("axes", "zyx" if data.ndim == 3 else "czyx")
    chunks = tuple(chunks or (64,) * data.ndim)
    darr = data if isinstance(data, da.Array) else da.from_array(data, chunks=chunks)
    common = dict(
        shape=data.shape, dtype=data.dtype, chunks=chunks, spacing=spacing, axes=axes, **kwargs
    )
    if labels_of is not None:
        name = common.pop("name", None) or Path(path).name
        group = create_labels(labels_of, name, colors=label_colors, names=label_names, **common)
    else:
        group = create_image(path, **common)
    store(darr.rechunk(group["0"].chunks), group["0"], lock=False)
    write_pyramid(group, reduction=reduction)
    return group


def read_label_metadata(
    path: str | Path,
) -> tuple[dict[int, str], dict[int, tuple[int, ...]]]:
    """Class names and RGBA colours (0..255) from a label image's NGFF ``image-label``.

    ``({value: name}, {value: rgba})``; both empty where the group records none.
    """
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except (OSError, ValueError, zarr.errors.NodeNotFoundError):
        return {}, {}
    meta = attrs.get("image-label") or (attrs.get("ome") or {}).get("image-label") or {}
    names = {
        int(p["label-value"]): str(p["class"])
        for p in meta.get("properties", [])
        if "label-value" in p and "class" in p
    }
    colors = {
        int(c["label-value"]): tuple(int(v) for v in c["rgba"])
        for c in meta.get("colors", [])
        if "label-value" in c and "rgba" in c
    }
    return names, colors
