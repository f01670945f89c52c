"""Open a 3D volume lazily as dask arrays, whatever form it is stored in.

Supported forms (see :data:`SUPPORTED`):

- OME-Zarr multiscale images, NGFF v0.4 (zarr format 2) and v0.5 (zarr format 3),
  with every pyramid level and the label images under ``labels/``;
- a plain zarr array, or a zarr group without multiscales metadata;
- any of the zarr forms at a URL (``http(s)://``, ``s3://``, ... through fsspec) or
  in a ``.zip`` file;
- a folder of 2D slice TIFFs (``00000.tif``, ``00001.tif``, ...: the Vesuvius layout);
- one multi-page or 3D TIFF file (through tifffile's zarr interface);
- an HDF5 dataset, written ``file.h5:/path/to/dataset`` (needs h5py).

Opening reads metadata only. Pixels are read when a chunk of a dask array is
computed: one zarr chunk, one TIFF slice or one HDF5 block at a time.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    import dask.array as da
    import zarr
    from zarr.abc.store import Store

log = logging.getLogger(__name__)

SUPPORTED = (
    "an OME-Zarr or zarr folder, .zarr.zip or URL (http(s)://, s3://, ...), a folder of "
    "2D slice TIFFs, a 3D or multi-page TIFF, or an HDF5 dataset written file.h5:/dataset"
)
TIFF_SUFFIXES = (".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
ZARR_METADATA = (".zgroup", ".zarray", "zarr.json")
_METADATA_KEYS = (".zgroup", ".zarray", ".zattrs", ".zmetadata", "zarr.json")
URL_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
H5_PATH_PATTERN = re.compile(
    r"^(?P<file>.+?\.(?:h5|hdf5|hdf|he5))(?::(?P<dataset>.*))?$", re.IGNORECASE
)
_SPATIAL = "zyx"


@dataclass(frozen=True, eq=False)
class Volume:
    """A lazily opened volume: dask arrays for each resolution level plus geometry.

    Attributes
    ----------
    levels
        Dask arrays, ``levels[0]`` at full resolution, then coarser levels.
    spacing, origin
        Spatial ``(z, y, x)`` voxel size and position of voxel 0 of level 0.
    axes
        ``"zyx"`` or ``"czyx"``.
    source
        The path or URL as given.
    kind
        ``"ome-zarr"``, ``"zarr"``, ``"tiff-folder"``, ``"tiff"`` or ``"hdf5"``.
    labels
        OME-Zarr label images: name -> levels, axes ``(z, y, x)``.
    attrs
        The root attributes of the source (e.g. provenance), where it has any.
    level_spacings, level_origins
        Spatial spacing and origin of each level, where the source records them.

    Two volumes are equal only if they are the same object (dask arrays do not
    compare as values), so a volume can key a cache.
    """

    levels: tuple[da.Array, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    axes: str
    source: str
    kind: str
    labels: Mapping[str, tuple[da.Array, ...]] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)
    level_spacings: tuple[tuple[float, ...], ...] = ()
    level_origins: tuple[tuple[float, ...], ...] = ()

    @property
    def data(self) -> da.Array:
        """The full-resolution level."""
        return self.levels[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the full-resolution level."""
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """Data type of the voxels."""
        return self.data.dtype

    @property
    def ndim(self) -> int:
        """Number of axes (3 or 4)."""
        return self.data.ndim

    def level_spacing(self, i: int) -> tuple[float, ...]:
        """Spatial ``(z, y, x)`` spacing of level ``i``.

        Taken from the source's metadata where it has one per level, else derived
        from the ratio of the level shapes.
        """
        if i < len(self.level_spacings):
            return self.level_spacings[i]
        full = self.shape[-3:]
        level = self.levels[i].shape[-3:]
        return tuple(s * f / n for s, f, n in zip(self.spacing, full, level, strict=True))


# -- entry points -------------------------------------------------------------------------
def open_volume(path: str | os.PathLike | Store, *, level: int | None = None) -> Volume:
    """Open a volume lazily, reading metadata only.

    Parameters
    ----------
    path
        A path or URL in one of the forms of :data:`SUPPORTED`, or an open zarr store.
    level
        Open the pyramid from this level down: ``levels[0]`` of the result is the
        source's level ``level``, with its spacing and origin. Default: level 0.

    Returns
    -------
    Volume

    Raises
    ------
    ScrollsegError
        When the path is missing, empty, not 3D, or of an unsupported form.
    """
    from zarr.abc.store import Store

    source = str(path) if isinstance(path, Store) else os.fspath(path)
    try:
        if isinstance(path, Store):
            volume = _open_zarr(path, source=source)
        else:
            if source.startswith("file://"):
                source = source[len("file://") :]
            if URL_PATTERN.match(source):
                volume = _open_zarr(_url_store(source), source=source)
            elif (match := H5_PATH_PATTERN.match(source)) and not Path(source).is_dir():
                volume = _open_hdf5(match["file"], match["dataset"], source=source)
            else:
                volume = _open_local(Path(source).expanduser(), source=source)
    except ScrollsegError:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OSError,
        zipfile.BadZipFile,
    ) as exc:
        # garbage or inconsistent metadata: zarr, tifffile and h5py raise their own
        raise ScrollsegError(
            f"cannot read the metadata of {source} ({type(exc).__name__}: "
            f"{_first_line(exc)}); it is damaged or not a volume scrollseg reads: {SUPPORTED}"
        ) from None
    check_geometry(volume)
    if level is not None:
        volume = _from_level(volume, level)
    log.info("opened %s (%s): shape %s %s", volume.source, volume.kind, volume.shape, volume.dtype)
    return volume


def volume_parts(image: Any) -> tuple[Any, tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(array, spacing, origin)`` of a Volume (anything with ``.data`` and ``.spacing``)
    or an array (spacing and origin None): the one place volumes are taken apart."""
    if hasattr(image, "data") and hasattr(image, "spacing") and not isinstance(image, np.ndarray):
        spacing, origin = image.spacing, getattr(image, "origin", None)
        return (
            image.data,
            None if spacing is None else tuple(float(s) for s in spacing),
            None if origin is None else tuple(float(o) for o in origin),
        )
    return image, None, None


def as_czyx(volume: Any) -> tuple[da.Array, tuple[float, ...] | None]:
    """A volume as a dask array ``(c, z, y, x)`` and its spacing (None if unknown).

    Accepts a :class:`~napari_scrollseg.engine.volumes.Volume` (anything with ``.data``,
    ``.spacing`` and optionally ``.axes``), a dask array or a numpy array, ``(z, y, x)`` or
    ``(c, z, y, x)``.
    """
    import dask.array as da

    data, spacing, _ = volume_parts(volume)
    axes = getattr(volume, "axes", None)
    arr = data if isinstance(data, da.Array) else da.asarray(np.asarray(data))
    if axes is not None and axes not in ("zyx", "czyx"):
        raise ScrollsegError(f"volume axes {axes!r} not supported: expected 'zyx' or 'czyx'")
    if arr.ndim == 3 and axes != "czyx":
        arr = arr[None]
    if arr.ndim != 4:
        raise ScrollsegError(
            f"expected a 3D volume (z, y, x) or (c, z, y, x), got shape {tuple(arr.shape)}: "
            "nnU-Net models here run on 3D volumes; give a single 2D image as (1, y, x)"
        )
    return arr, spacing


MAX_VOXELS = 2**50  # ~10^15: far beyond any scan (a whole scroll is ~10^12)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_geometry(volume: Volume) -> None:
    """Refuse what no scan has: an empty axis, an absurd size, a zero chunk, a bad spacing."""
    src = volume.source
    for i, lv in enumerate(volume.levels):
        shape = tuple(int(s) for s in lv.shape)
        if min(shape, default=0) < 1:
            raise ScrollsegError(
                f"{src}: level {i} has shape {shape}, with an empty axis; a volume needs at "
                "least one voxel along every axis"
            )
        if any(len(c) == 0 or min(c) < 1 for c in lv.chunks):
            raise ScrollsegError(f"{src}: level {i} has chunks of size 0; rewrite the volume")
    voxels = math.prod(volume.shape)
    if voxels > MAX_VOXELS:
        raise ScrollsegError(
            f"{src} claims shape {volume.shape} ({voxels:.3g} voxels), far beyond any scan; "
            "its metadata is wrong"
        )
    for name, values in (("spacing", volume.spacing), ("origin", volume.origin)):
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ScrollsegError(f"{src}: {name} {tuple(values)} is not three finite numbers")
    if min(volume.spacing) <= 0:
        raise ScrollsegError(
            f"{src}: spacing {tuple(volume.spacing)} has zero or negative values; fix the "
            "scale in its metadata"
        )


def read_block(arr: Any, index: tuple, source: str) -> np.ndarray:
    """``np.asarray(arr[index])``, a damaged chunk or lost connection as one clear error
    (local zarr v2 chunks are read in this thread: :mod:`.zarr_chunks`)."""
    from napari_scrollseg.engine.zarr_chunks import read_box

    try:
        return read_box(arr, index)
    except ScrollsegError:
        raise
    except Exception as exc:  # codecs, zarr, tifffile, h5py, fsspec raise their own types
        box = ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(s) for s in index)
        raise ScrollsegError(
            f"cannot read {source} at [{box}] ({type(exc).__name__}: {_first_line(exc)}); "
            "a chunk there is damaged or unreachable: repair or re-copy the volume"
        ) from None


def check_chunks(volume: Volume) -> None:
    """Read the first and the last chunk of level 0: a damaged or missing one is an error."""
    data = volume.data
    for block in {(0,) * data.ndim, tuple(n - 1 for n in data.numblocks)}:
        index = tuple(
            slice(int(sum(c[:b])), int(sum(c[: b + 1]))) for c, b in zip(data.chunks, block)
        )
        read_block(data, index, volume.source)


def describe(volume: Volume) -> str:
    """A multi-line human summary: kind, shape, dtype, chunks, spacing, levels, size, labels."""
    data = volume.data
    voxels = math.prod(volume.shape) * volume.dtype.itemsize
    size = disk_size(volume.source)
    on_disk = "unknown" if size is None else _human(size)
    levels = ", ".join(str(tuple(int(s) for s in lv.shape)) for lv in volume.levels)
    ngff = _multiscales(volume.attrs)[1] if volume.kind == "ome-zarr" else None
    version = f" (NGFF {ngff})" if ngff else ""
    lines = [
        f"path:     {volume.source}",
        f"kind:     {volume.kind}{version}",
        f"shape:    {volume.shape}  (axes {volume.axes})",
        f"dtype:    {volume.dtype}",
        f"chunks:   {tuple(int(c) for c in data.chunksize)}  ({data.npartitions} chunks)",
        f"spacing:  {_fmt(volume.spacing)}",
        f"origin:   {_fmt(volume.origin)}",
        f"levels:   {len(volume.levels)}: {levels}",
        f"size:     {_human(voxels)} of voxels, {on_disk} on disk",
    ]
    if volume.labels:
        names = ", ".join(
            f"{name} ({len(lv)} levels, {lv[0].dtype})" for name, lv in volume.labels.items()
        )
        lines.append(f"labels:   {names}")
    else:
        lines.append("labels:   none")
    return "\n".join(lines)


def disk_size(path: str | os.PathLike, *, limit_s: float = 20.0) -> int | None:
    """Bytes the source takes on disk, or None when unknown.

    Local files and folders are summed (an HDF5 ``file.h5:/dataset`` counts its
    file). URLs and stores give None, and so does a folder too large to count
    within ``limit_s`` seconds.
    """
    text = os.fspath(path) if isinstance(path, str | os.PathLike) else ""
    if not text or URL_PATTERN.match(text):
        return None
    p = Path(text).expanduser()
    if not p.exists() and (match := H5_PATH_PATTERN.match(text)):
        p = Path(match["file"]).expanduser()
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    total, stack, deadline = 0, [p], time.monotonic() + limit_s
    while stack:
        if time.monotonic() > deadline:
            log.info("stopped counting the size of %s after %.0f s", p, limit_s)
            return None
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def check_all_finite(count: int, spans: Sequence[np.ndarray], source: str) -> None:
    """Refuse a volume with ``count`` non-finite voxels; ``spans``: per-axis projections."""
    if count == 0:
        return
    where = ", ".join(
        f"{a} {int(np.flatnonzero(p)[0])}..{int(np.flatnonzero(p)[-1])}"
        for a, p in zip("zyx", spans)
    )
    raise ScrollsegError(
        f"{source} has {count} non-finite voxel(s) (NaN or inf) within {where}; nnU-Net "
        "does not accept them: replace them (e.g. with 0 or the background value) and run again"
    )


def check_finite(block: np.ndarray, offset: Sequence[int], source: str) -> None:
    """Refuse NaN / infinite voxels, as nnU-Net does, naming the first one found.

    ``block`` is ``(c, z, y, x)`` read at ``offset`` (z, y, x) of the volume. Integer
    blocks are skipped at no cost.
    """
    if block.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(block)
    if not bad.any():
        return
    c, *zyx = (int(i) for i in np.argwhere(bad)[0])
    where = tuple(int(o) + i for o, i in zip(offset, zyx))
    raise ScrollsegError(
        f"{source} has {int(bad.sum())} non-finite voxel(s) (NaN or inf) in the block read "
        f"at {tuple(int(o) for o in offset)}, the first at (z, y, x) = {where}"
        f"{f' channel {c}' if block.shape[0] > 1 else ''}; nnU-Net does not accept them: "
        "replace them (e.g. with 0 or the background value) and run again"
    )


# -- local paths --------------------------------------------------------------------------
def _open_local(path: Path, *, source: str) -> Volume:
    if not path.exists():
        raise ScrollsegError(f"{source} does not exist; check the path")
    if path.is_dir():
        if any((path / name).exists() for name in ZARR_METADATA):
            from zarr.storage import LocalStore

            return _open_zarr(LocalStore(path, read_only=True), source=source)
        return _open_tiff_folder(path, source=source)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(path, source=source)
    if suffix in HDF5_SUFFIXES:
        return _open_hdf5(str(path), None, source=source)
    if suffix == ".zip":
        from zarr.storage import ZipStore

        return _open_zarr(ZipStore(path, mode="r", read_only=True), source=source)
    raise ScrollsegError(f"{source}: unsupported file type {suffix or '(none)'}; open {SUPPORTED}")


# -- zarr and OME-Zarr --------------------------------------------------------------------
def _url_store(url: str) -> Store:
    from zarr.storage import FsspecStore

    try:
        if url.startswith(("http://", "https://")):
            from napari_scrollseg.engine.http_store import open_http_store

            return open_http_store(url)  # read timeouts, bounded retries, one clear error
        return FsspecStore.from_url(url, read_only=True)
    except ImportError as exc:
        protocol = url.split("://", 1)[0]
        raise ScrollsegError(
            f"reading {protocol}:// URLs needs an fsspec driver that is not installed: {exc}"
        ) from exc
    except ValueError as exc:
        raise ScrollsegError(f"cannot open {url}: {exc}; use a URL fsspec knows") from exc


def _open_zarr(store: Store, *, source: str) -> Volume:
    import zarr

    try:
        node = zarr.open(store=store, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError) as exc:
        raise ScrollsegError(
            f"no zarr array or group at {source}; point at the .zarr folder or an array in it"
        ) from exc
    except OSError as exc:
        raise ScrollsegError(
            f"cannot read {source} ({exc}); check the address and the network"
        ) from exc
    except Exception as exc:  # aiohttp and cloud clients raise their own types
        if type(exc).__module__.split(".")[0] in ("aiohttp", "botocore", "gcsfs", "requests"):
            raise ScrollsegError(
                f"cannot read {source} ({type(exc).__name__}: {exc}); check the address, the "
                f"network and your credentials"
            ) from exc
        raise
    attrs = dict(node.attrs)
    if isinstance(node, zarr.Array):
        return _plain_zarr(node, attrs, source=source)
    multiscales, version = _multiscales(attrs)
    if not multiscales:
        first = _member(node, "0")
        if isinstance(first, zarr.Group) and _multiscales(dict(first.attrs))[0]:
            # bioformats2raw layout: the images are groups 0, 1, ... of the root
            log.info("%s: opening its first image, '0'", source)
            node = first
            multiscales, version = _multiscales(dict(first.attrs))
        else:
            return _plain_zarr(_pick_array(node, source), attrs, source=source)
    levels, axes, spacings, origins = _parse_multiscale(node, multiscales[0], source=source)
    labels = _labels(node, source=source)
    log.debug("OME-Zarr %s: NGFF %s, %d levels", source, version, len(levels))
    return Volume(
        levels=levels,
        spacing=spacings[0],
        origin=origins[0],
        axes=axes,
        source=source,
        kind="ome-zarr",
        labels=labels,
        attrs=attrs,
        level_spacings=spacings,
        level_origins=origins,
    )


def _multiscales(attrs: Mapping[str, Any]) -> tuple[list[dict], str | None]:
    """The ``multiscales`` list and NGFF version (v0.5 nests them under ``ome``)."""
    if isinstance(attrs.get("ome"), Mapping):
        ome = attrs["ome"]
        return list(ome.get("multiscales") or []), ome.get("version")
    multiscales = list(attrs.get("multiscales") or [])
    version = multiscales[0].get("version") if multiscales else None
    return multiscales, version


def _transforms(items: Sequence[Mapping], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for t in items or ():
        if t.get("type") == "scale" and "scale" in t:
            scale = scale * np.asarray(t["scale"], dtype=float)
            translation = translation * np.asarray(t["scale"], dtype=float)
        elif t.get("type") == "translation" and "translation" in t:
            translation = translation + np.asarray(t["translation"], dtype=float)
    return scale, translation


def _parse_multiscale(
    group: zarr.Group, ms: Mapping[str, Any], *, source: str
) -> tuple[tuple[da.Array, ...], str, tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
    """Levels, axes and per-level spatial spacing/origin of one NGFF multiscale."""
    import zarr

    datasets = ms.get("datasets") or []
    if not datasets:
        raise ScrollsegError(f"{source}: the OME-Zarr multiscales lists no datasets; rewrite it")
    arrays = []
    for d in datasets:
        try:
            arrays.append(group[d["path"]])
        except KeyError as exc:
            raise ScrollsegError(
                f"{source}: level {d['path']!r} named in the OME-Zarr metadata is missing"
            ) from exc
    ndim = arrays[0].ndim
    names, types = [], []
    for i, axis in enumerate(ms.get("axes") or list("tczyx"[-ndim:])):
        name = axis.get("name", str(i)) if isinstance(axis, Mapping) else str(axis)
        names.append(name.lower())
        types.append(axis.get("type") if isinstance(axis, Mapping) else None)
    if len(names) != ndim:
        raise ScrollsegError(f"{source}: {len(names)} axes in the metadata for a {ndim}D array")
    spatial = [
        i
        for i, (n, t) in enumerate(zip(names, types, strict=True))
        if t == "space" or (t is None and n in "zyx")
    ]
    levels, spacings, origins = [], [], []
    for d, arr in zip(datasets, arrays, strict=True):
        scale, translation = _transforms(d.get("coordinateTransformations"), ndim)
        top_scale, top_translation = _transforms(ms.get("coordinateTransformations"), ndim)
        scale, translation = scale * top_scale, translation * top_scale + top_translation
        spacings.append(tuple(float(scale[i]) for i in spatial))
        origins.append(tuple(float(translation[i]) for i in spatial))
        levels.append(_from_zarr(arr, source) if isinstance(arr, zarr.Array) else arr)
    arranged, axes = zip(
        *(_arrange(lv, names, spatial, source=source) for lv in levels), strict=True
    )
    return tuple(arranged), axes[0], tuple(spacings), tuple(origins)


def _arrange(
    arr: da.Array, names: Sequence[str], spatial: Sequence[int], *, source: str
) -> tuple[da.Array, str]:
    """Drop size-1 time/channel axes and move a channel axis first: ``zyx`` or ``czyx``."""
    if len(spatial) != 3:
        got = "".join(names[i] for i in spatial) or "none"
        raise ScrollsegError(
            f"{source} is not a 3D volume (spatial axes: {got}); a volume must be 3D (z, y, x)"
        )
    other = [i for i in range(arr.ndim) if i not in spatial]
    keep = [i for i in other if arr.shape[i] > 1]
    if len(keep) > 1:
        extra = ", ".join(f"{names[i]}={arr.shape[i]}" for i in keep)
        raise ScrollsegError(
            f"{source} has more than one non-spatial axis ({extra}); "
            f"save one time point as (c, z, y, x) or (z, y, x)"
        )
    if keep and names[keep[0]] in ("t", "time"):
        raise ScrollsegError(
            f"{source} is a time series ({arr.shape[keep[0]]} time points); "
            f"save one time point as a (z, y, x) volume"
        )
    drop = tuple(i for i in other if i not in keep)
    if drop:
        arr = arr[tuple(0 if i in drop else slice(None) for i in range(arr.ndim))]
    order = [i for i in range(len(names)) if i not in drop]
    new = [order.index(i) for i in keep + list(spatial)]
    if new != list(range(arr.ndim)):
        arr = arr.transpose(new)
    return arr, ("c" if keep else "") + _SPATIAL


def _labels(group: zarr.Group, *, source: str) -> dict[str, tuple[da.Array, ...]]:
    """OME-Zarr label images listed in ``labels/``'s metadata."""
    import zarr

    root = _member(group, "labels")
    if not isinstance(root, zarr.Group):
        return {}
    attrs = dict(root.attrs)
    names = attrs.get("labels") or (attrs.get("ome") or {}).get("labels") or []
    labels = {}
    for name in names:
        try:
            label = root[name]
            multiscales, _ = _multiscales(dict(label.attrs))
            levels, _, _, _ = _parse_multiscale(label, multiscales[0], source=source)
        except (KeyError, IndexError, ScrollsegError) as exc:
            log.warning("%s: skipped label image %r (%s)", source, name, exc)
            continue
        labels[name] = levels
    return labels


def _member(group: zarr.Group, name: str) -> zarr.Array | zarr.Group | None:
    try:
        return group[name]
    except KeyError:
        return None


def _pick_array(group: zarr.Group, source: str) -> zarr.Array:
    """The array to open in a group without multiscales: "0", the single one or the largest."""
    import zarr

    zero = _member(group, "0")
    if isinstance(zero, zarr.Array):
        log.info("%s: no multiscales metadata; opening its array '0'", source)
        return zero
    try:
        arrays = dict(group.arrays())
        groups = [name for name, _ in group.groups()]
    except (NotImplementedError, OSError) as exc:
        raise ScrollsegError(
            f"cannot list the arrays of the zarr group {source}; add the array's name to the "
            f"path (e.g. {source.rstrip('/')}/data)"
        ) from exc
    if not arrays:
        hint = f" (it has groups: {', '.join(sorted(groups)[:5])})" if groups else ""
        raise ScrollsegError(
            f"the zarr group {source} holds no array{hint}; point at an array or an image inside it"
        )
    name = max(arrays, key=lambda n: (arrays[n].nbytes, n))
    if len(arrays) > 1:
        log.warning(
            "%s holds %d arrays (%s); opening the largest, %r",
            source,
            len(arrays),
            ", ".join(sorted(arrays)),
            name,
        )
    else:
        log.info("%s: no multiscales metadata; opening its array %r", source, name)
    return arrays[name]


def _from_zarr(arr: zarr.Array, source: str) -> da.Array:
    """``da.from_zarr`` after the checks it would hang or fail on (absurd shape, 0 chunk)."""
    import dask.array as da

    shape, chunks = tuple(int(s) for s in arr.shape), tuple(int(c) for c in arr.chunks)
    if math.prod(shape) > MAX_VOXELS:
        raise ScrollsegError(
            f"{source} claims shape {shape} ({math.prod(shape):.3g} voxels), far beyond any "
            "scan; its metadata is wrong"
        )
    if min(shape, default=0) < 1:
        raise ScrollsegError(
            f"{source}: an array has shape {shape}, with an empty axis; a volume needs at "
            "least one voxel along every axis"
        )
    if min(chunks, default=0) < 1:
        raise ScrollsegError(f"{source}: chunks {chunks} include 0; rewrite the volume")
    token = _tokenize(source, str(arr.store), arr.path, shape, chunks, str(arr.dtype))
    return da.from_array(
        _CheckedZarr(arr, source),
        chunks=chunks,
        meta=np.empty((0,) * arr.ndim, arr.dtype),
        name=f"zarr-{token}",
    )


class _CheckedZarr:
    """A zarr array whose reads raise one clear error for a damaged or unreachable chunk.

    :meth:`read_box` with a :class:`ChunkCache` (a prediction run's reader) serves boxes
    from decoded chunks: neighbouring boxes decode each chunk once instead of once per
    box. Indexing (dask's reads) reads zarr directly."""

    def __init__(self, array: zarr.Array, source: str) -> None:
        self.array, self.source = array, source
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.chunks = tuple(int(c) for c in array.chunks)
        self.token = uuid.uuid4().hex  # this open array's entries in the cache

    def __getitem__(self, key: Any) -> np.ndarray:
        return read_block(self.array, key, self.source)

    def read_box(self, key: tuple[slice, ...], cache: ChunkCache | None = None) -> np.ndarray:
        """``self[key]``, through ``cache`` when given and its chunks are small enough."""
        box = _plain_box(key, self.shape)
        if cache is None or box is None or not cache.fits(self.chunk_bytes):
            return read_block(self.array, key, self.source)
        return cache.read(self, box)

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.chunks) * self.dtype.itemsize

    def __getstate__(self) -> dict:  # another process: a new token (its own cache)
        return {k: v for k, v in self.__dict__.items() if k != "token"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, token=uuid.uuid4().hex)


def _plain_box(key: Any, shape: Sequence[int]) -> tuple[slice, ...] | None:
    """``key`` as one in-bounds, non-empty ``slice(start, stop)`` per axis, else None."""
    if not isinstance(key, tuple) or len(key) != len(shape):
        return None
    box = []
    for k, n in zip(key, shape):
        if not isinstance(k, slice) or k.step not in (None, 1):
            return None
        start, stop, _ = k.indices(int(n))
        if start >= stop:
            return None
        box.append(slice(start, stop))
    return tuple(box)


class ChunkCache:
    """Decoded zarr chunks, least recently used first out, within ``max_bytes``.

    One per prediction run (:func:`input_cache` sizes it), read through
    :meth:`_CheckedZarr.read_box`; keys hold the array's token. A miss reads the box of
    all the missing chunks of a read in one zarr call (remote stores fetch them
    concurrently). Thread-safe; a chunk two threads miss at once is decoded twice, never
    served half-written. Pickled (for a dask.distributed worker) it arrives empty."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.held = 0
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple:
        return (ChunkCache, (self.max_bytes,))

    def fits(self, chunk_bytes: int) -> bool:
        """Whether chunks of this size are cached (at most a sixteenth of the bound)."""
        return 0 < chunk_bytes * 16 <= self.max_bytes

    def read(self, arr: _CheckedZarr, box: tuple[slice, ...]) -> np.ndarray:
        """``arr[box]`` assembled from cached chunks, reading the missing ones first."""
        ranges = [range(b.start // c, (b.stop - 1) // c + 1) for b, c in zip(box, arr.chunks)]
        found: dict[tuple, np.ndarray] = {}
        with self._lock:
            for index in itertools.product(*ranges):
                chunk = self._chunks.get((arr.token, index))
                if chunk is not None:
                    self._chunks.move_to_end((arr.token, index))
                    found[index] = chunk
        missing = [i for i in itertools.product(*ranges) if i not in found]
        if missing:
            found.update(self._load(arr, missing))
        from napari_scrollseg.engine.tiling import tile_overlap

        out = np.empty(tuple(b.stop - b.start for b in box), arr.dtype)
        for index, chunk in found.items():
            lo = [i * c for i, c in zip(index, arr.chunks)]
            src, dst = tile_overlap(lo, chunk.shape, box)  # the chunk lies in the box's range
            out[dst] = chunk[src]
        return out

    def _load(self, arr: _CheckedZarr, missing: list[tuple]) -> dict[tuple, np.ndarray]:
        """Read the chunks ``missing`` (one zarr read of their box) and cache them."""
        lo = [min(i[a] for i in missing) * c for a, c in enumerate(arr.chunks)]
        hi = [
            min((max(i[a] for i in missing) + 1) * c, n)
            for a, (c, n) in enumerate(zip(arr.chunks, arr.shape))
        ]
        block = read_block(arr.array, tuple(slice(a, b) for a, b in zip(lo, hi)), arr.source)
        loaded = {}
        for index in missing:
            start = [i * c - o for i, c, o in zip(index, arr.chunks, lo)]
            box = tuple(slice(a, a + c) for a, c in zip(start, arr.chunks))
            loaded[index] = block[box].copy()  # its own memory: the block is not kept
        with self._lock:
            for index, chunk in loaded.items():
                key = (arr.token, index)
                old = self._chunks.pop(key, None)
                self.held += chunk.nbytes - (0 if old is None else old.nbytes)
                self._chunks[key] = chunk
            while self.held > self.max_bytes and self._chunks:
                self.held -= self._chunks.popitem(last=False)[1].nbytes
        return loaded


def input_cache(
    volume: Volume, block: Sequence[int], patch: Sequence[int], *, cap: int = 1 << 30
) -> ChunkCache | None:
    """A :class:`ChunkCache` for a sweep of ``block``-sized reads (plus a ``patch`` of
    overlap) over a zarr ``volume`` in C order: room for two rows of blocks along the
    last axis (whole chunks), so the next block and the next row find their shared
    chunks decoded; it grows with one axis of the volume only, up to ``cap``. None for
    volumes that are not zarr."""
    direct = direct_array(getattr(volume, "data", None))
    if direct is None:
        return None
    chunks, shape = direct.chunks[-3:], direct.shape[-3:]
    depth = [(math.ceil((b + p) / c) + 1) * c for b, p, c in zip(block, patch, chunks)]
    row = depth[0] * depth[1] * (math.ceil(shape[2] / chunks[2]) * chunks[2])
    channels = direct.shape[0] if direct.ndim == 4 else 1
    return ChunkCache(min(2 * row * channels * direct.dtype.itemsize, cap))


def direct_array(data: Any) -> Any:
    """The checked zarr array under a dask array opened from zarr by this module, else
    None: reading it directly (zarr fetches the chunks of a box at once) skips building
    and running a dask graph per read."""
    name = getattr(data, "name", None)
    graph = getattr(data, "dask", None)
    if name is None or graph is None:
        return None
    try:
        source = graph[f"original-{name}"]
    except (KeyError, TypeError):
        return None
    ok = isinstance(source, _CheckedZarr) and tuple(source.shape) == tuple(data.shape)
    return source if ok else None


def _attr_triplet(attrs: Mapping[str, Any], keys: Sequence[str]) -> tuple[float, ...] | None:
    for key in keys:
        value = attrs.get(key)
        if isinstance(value, int | float):
            return (float(value),) * 3
        if isinstance(value, Sequence) and len(value) >= 3:
            try:
                return tuple(float(v) for v in value[-3:])
            except (TypeError, ValueError):
                continue
    return None


def _plain_zarr(arr: zarr.Array, root_attrs: Mapping[str, Any], *, source: str) -> Volume:

    attrs = {**root_attrs, **dict(arr.attrs)}
    names = [str(n).lower() for n in (getattr(arr.metadata, "dimension_names", None) or ())]
    if len(names) != arr.ndim or not set("zyx") <= set(names):
        names = list("tczyx"[-arr.ndim :]) if arr.ndim <= 5 else [str(i) for i in range(arr.ndim)]
    spatial = [i for i, n in enumerate(names) if n in _SPATIAL]
    data, axes = _arrange(_from_zarr(arr, source), names, spatial, source=source)
    spacing = _attr_triplet(attrs, ("spacing", "voxel_size", "resolution")) or (1.0,) * 3
    origin = _attr_triplet(attrs, ("origin", "offset")) or (0.0,) * 3
    return Volume(
        levels=(data,),
        spacing=spacing,
        origin=origin,
        axes=axes,
        source=source,
        kind="zarr",
        attrs=attrs,
    )


# -- TIFF ---------------------------------------------------------------------------------
def _slice_key(path: Path) -> tuple[int, str]:
    numbers = re.findall(r"\d+", path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


class _SliceStack:
    """A read-only array over 2D slice TIFFs that reads a slice only when indexed."""

    def __init__(self, files: Sequence[str], shape: tuple[int, int], dtype: np.dtype) -> None:
        self.files = tuple(files)
        self.shape = (len(self.files), *shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        zkey, rest = key[0], key[1:]
        if isinstance(zkey, slice):
            indices = range(*zkey.indices(self.shape[0]))
            out = np.empty((len(indices), *self.shape[1:]), self.dtype)[(slice(None), *rest)]
            for j, z in enumerate(indices):
                out[j] = _read_slice(self.files[z], self.shape[1:], self.dtype)[rest]
            return out
        return _read_slice(self.files[int(zkey)], self.shape[1:], self.dtype)[rest]


def _read_slice(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    import tifffile

    log.debug("read slice %s", path)
    data = tifffile.imread(path, key=0)
    if data.shape != shape or data.dtype != dtype:
        raise ScrollsegError(
            f"{path} is {data.shape} {data.dtype}, unlike the other slices "
            f"({shape} {dtype}); the files changed since opening, open the folder again"
        )
    return data


def _page_info(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the first page of a TIFF, from its header only."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages.first
            return tuple(int(s) for s in page.shape), np.dtype(page.dtype)
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise ScrollsegError(
            f"{path} is not a readable TIFF ({exc}); remove or replace it"
        ) from exc


def _is_stack(path: Path) -> bool:
    """Whether a TIFF holds more than one page or a 3D page (headers only)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            return series.axes[0] not in "YXS" and series.shape[0] > 1
    except (tifffile.TiffFileError, OSError, ValueError):
        return False


def _open_tiff_folder(path: Path, *, source: str) -> Volume:
    import dask.array as da

    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise ScrollsegError(f"the folder {source} is empty; point at a folder of slice TIFFs")
    files = sorted(
        (p for p in entries if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()), key=_slice_key
    )
    if not files:
        found = ", ".join(sorted(p.name for p in entries)[:3])
        raise ScrollsegError(
            f"the folder {source} has no .tif slices and no zarr metadata (found {found}, ...); "
            f"open {SUPPORTED}"
        )
    if len(files) == 1 and _is_stack(files[0]):
        log.info("%s holds one multi-page TIFF; opening it as the volume", source)
        return _open_tiff(files[0], source=str(files[0]))
    shape, dtype = _page_info(files[0])
    if len(shape) != 2:
        raise ScrollsegError(
            f"{files[0]} is not a single-channel 2D slice (shape {shape}); a slice folder "
            f"needs one grayscale 2D image per file"
        )
    from concurrent.futures import ThreadPoolExecutor

    # header reads only; threads hide the latency of network file systems
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        infos = list(pool.map(_page_info, files[1:]))
    for f, (s, d) in zip(files[1:], infos, strict=True):
        if s != shape or d != dtype:
            raise ScrollsegError(
                f"{f} is {s} {d} but {files[0].name} is {shape} {dtype}; all slices must have "
                f"the same shape and dtype: remove or fix it"
            )
    spacing = _vesuvius_spacing(path, len(files))
    stack = _SliceStack([str(f) for f in files], shape, dtype)
    data = da.from_array(
        stack,
        chunks=(1, *shape),
        meta=np.empty((0, 0, 0), dtype),
        name=f"slices-{_tokenize(stack.files, shape, str(dtype))}",
    )
    log.debug("slice folder %s: %d slices of %s %s", source, len(files), shape, dtype)
    return Volume(
        levels=(data,),
        spacing=spacing,
        origin=(0.0,) * 3,
        axes="zyx",
        source=source,
        kind="tiff-folder",
    )


def _tokenize(*args: Any) -> str:
    from dask.base import tokenize

    return tokenize(*args)


def _vesuvius_spacing(path: Path, n_files: int) -> tuple[float, float, float]:
    """Spacing from a Vesuvius ``meta.json`` (``voxelsize``) beside the slices, else 1."""
    meta = path / "meta.json"
    if not meta.is_file():
        return (1.0, 1.0, 1.0)
    try:
        info = json.loads(meta.read_text())
        size = float(info["voxelsize"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        log.warning("ignored %s: no voxelsize in it (%s)", meta, exc)
        return (1.0, 1.0, 1.0)
    if info.get("slices") not in (None, n_files):
        log.warning("%s says %s slices but the folder has %d", meta, info["slices"], n_files)
    return (size, size, size)


def _open_tiff(path: Path, *, source: str) -> Volume:
    import dask.array as da
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            tif_axes = series.axes.upper()
            spacing = _tiff_spacing(path, tf)
        store = tifffile.imread(path, aszarr=True, series=0)
        node = zarr.open(store=store, mode="r")
    except (tifffile.TiffFileError, OSError, ValueError, NotImplementedError) as exc:
        raise ScrollsegError(
            f"{source} cannot be read lazily as a TIFF ({exc}); convert it to OME-Zarr or a "
            f"folder of slice TIFFs"
        ) from exc
    if isinstance(node, zarr.Group):  # a pyramidal TIFF: one array per level
        keys = sorted((k for k, _ in node.arrays()), key=int)
        arrays = [_TiffLevel(str(path), k, node[k]) for k in keys]
    else:
        arrays = [_TiffLevel(str(path), None, node)]
    names = ["y" if a == "Y" else "x" if a == "X" else a.lower() for a in tif_axes]
    others = [i for i, a in enumerate(tif_axes) if a not in "YXCS"]
    big = [i for i in others if series.shape[i] > 1] or others[-1:]
    if len(tif_axes) != arrays[0].ndim or len(big) != 1 or "Y" not in tif_axes:
        shape = dict(zip(tif_axes, series.shape, strict=False))
        raise ScrollsegError(
            f"{source} is not a 3D volume (axes {shape}); a volume must be 3D (z, y, x)"
        )
    names[big[0]] = "z"
    names = ["c" if a in ("c", "s") else a for a in names]
    spatial = [names.index(a) for a in _SPATIAL]
    levels, axes = [], "zyx"
    stat = path.stat()
    for arr in arrays:
        token = _tokenize(str(path.resolve()), arr.key, stat.st_mtime_ns, stat.st_size)
        # strips and tiles are small: read whole multiples of them, about 1024 per y/x axis
        chunks = tuple(
            min(n, c * math.ceil(1024 / c)) if a in "YX" else c
            for a, c, n in zip(tif_axes, arr.chunks, arr.shape, strict=True)
        )
        lazy = da.from_array(
            arr, chunks=chunks, meta=np.empty((0,) * arr.ndim, arr.dtype), name=f"tiff-{token}"
        )
        level, axes = _arrange(lazy, names, spatial, source=source)
        levels.append(level)
    return Volume(
        levels=tuple(levels),
        spacing=spacing,
        origin=(0.0,) * 3,
        axes=axes,
        source=source,
        kind="tiff",
    )


class _TiffLevel:
    """A read-only array over one level of a TIFF series, through tifffile's zarr store.

    The store holds an open file, so it is reopened on first read in each process
    and the array pickles (for distributed schedulers).
    """

    def __init__(self, path: str, key: str | None, array: zarr.Array) -> None:
        self.path, self.key = path, key
        self.shape, self.dtype, self.chunks = array.shape, array.dtype, array.chunks
        self.ndim = len(self.shape)
        self._array: zarr.Array | None = array

    def _zarr(self) -> zarr.Array:
        if self._array is None:
            import tifffile
            import zarr

            node = zarr.open(store=tifffile.imread(self.path, aszarr=True, series=0), mode="r")
            self._array = node if self.key is None else node[self.key]
        return self._array

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._zarr()[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


_OME_UNITS_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _tiff_spacing(path: Path, tf: Any) -> tuple[float, float, float]:
    """Voxel size from, in order: an nnU-Net ``<name>.json`` sidecar, OME-TIFF physical
    sizes (in µm), ImageJ's ``spacing`` (z) with its x/y resolution (the ImageJ unit),
    else 1 with a warning.

    A TIFF resolution in inches or centimetres is a print resolution (e.g. 100 pixels per
    inch, written by default), not a voxel size: it is never used as one.
    """
    sidecar = path.with_name(path.name.split(".")[0] + ".json")
    if sidecar.is_file():
        try:
            spacing = tuple(float(s) for s in json.loads(sidecar.read_text())["spacing"])
            if len(spacing) == 3:
                return spacing
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("ignored %s: no 3-value spacing in it (%s)", sidecar, exc)
    if tf.is_ome and tf.ome_metadata:
        spacing = _ome_spacing(tf.ome_metadata)
        if spacing is not None:
            return spacing
    page = tf.pages.first
    unit = page.tags.get("ResolutionUnit")
    unit = int(unit.value) if unit is not None else 2  # TIFF's default unit is the inch
    if tf.is_imagej and tf.imagej_metadata is not None:
        meta = tf.imagej_metadata
        z = float(meta.get("spacing", 0) or 0)
        yx = []
        if unit == 1:  # ImageJ writes calibrated sizes with no resolution unit
            for tag in ("YResolution", "XResolution"):
                value = page.tags.get(tag)
                num, den = value.value if value is not None else (1, 1)
                yx.append(den / num if num else 1.0)
        if z or meta.get("unit") or any(abs(v - 1) > 1e-9 for v in yx):
            yx = yx or [1.0, 1.0]
            if not z:
                log.warning("%s: ImageJ metadata has no z spacing; using %g", path.name, yx[1])
            return (z or yx[1], yx[0], yx[1])
    log.warning(
        "%s records no voxel size (no ImageJ spacing/unit, OME physical size or %s); "
        "spacing 1 is used",
        path.name,
        sidecar.name,
    )
    return (1.0, 1.0, 1.0)


def _ome_spacing(xml: str) -> tuple[float, float, float] | None:
    """``(z, y, x)`` from the first OME ``Pixels`` element's physical sizes, in µm."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("Z", "Y", "X"):
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            sizes.append(None)
            continue
        factor = _OME_UNITS_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if factor is None:
            return None
        sizes.append(float(value) * factor)
    if sizes[1] is None and sizes[2] is None:
        return None
    yx = [s if s is not None else (sizes[2] or sizes[1]) for s in sizes[1:]]
    return (sizes[0] if sizes[0] is not None else yx[1], yx[0], yx[1])


# -- HDF5 ---------------------------------------------------------------------------------
class _H5Dataset:
    """A read-only array over one HDF5 dataset; each read opens the file and closes it.

    Holding no handle keeps it picklable and leaves the file free for other writers.
    """

    def __init__(self, file: str, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.file, self.name = file, name
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        import h5py

        with h5py.File(self.file, "r") as h5:
            return h5[self.name][key]


def _open_hdf5(file: str, dataset: str | None, *, source: str) -> Volume:
    import dask.array as da

    try:
        import h5py
    except ImportError as exc:
        raise ScrollsegError("reading HDF5 needs h5py: pip install napari-scrollseg[hdf5]") from exc
    path = Path(file).expanduser()
    if not path.is_file():
        raise ScrollsegError(f"{file} does not exist; check the path")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ScrollsegError(f"{file} is not a readable HDF5 file ({exc})") from exc
    with h5:
        found: list[str] = []
        h5.visititems(
            lambda name, obj: found.append("/" + name) if isinstance(obj, h5py.Dataset) else None
        )
        listing = ", ".join(found[:8]) or "none"
        if not dataset or dataset == "/":
            volumes = [n for n in found if h5[n].ndim >= 3]
            if len(volumes) != 1:
                raise ScrollsegError(
                    f"name the dataset to open in {file}, as {file}:/path/to/dataset "
                    f"(datasets in it: {listing})"
                )
            dataset = volumes[0]
            log.info("%s: opening its only 3D dataset %s", file, dataset)
        node = h5.get(dataset)
        if not isinstance(node, h5py.Dataset):
            what = "a group" if node is not None else "missing"
            raise ScrollsegError(
                f"{dataset} in {file} is {what}, not a dataset; datasets in it: {listing}"
            )
        shape, dtype, chunks = tuple(node.shape), node.dtype, node.chunks
        attrs = {k: _plain(v) for k, v in node.attrs.items()}
    name = dataset if dataset.startswith("/") else "/" + dataset
    array = _H5Dataset(str(path), name, shape, dtype)
    stat = path.stat()
    data = da.from_array(
        array,
        chunks=da.core.normalize_chunks("auto", shape, dtype=dtype, previous_chunks=chunks),
        meta=np.empty((0,) * len(shape), dtype),
        name=f"hdf5-{_tokenize(str(path.resolve()), name, stat.st_mtime_ns, stat.st_size)}",
    )
    names = list("tczyx"[-len(shape) :]) if len(shape) <= 5 else []
    spatial = [i for i, n in enumerate(names) if n in _SPATIAL] if len(shape) >= 3 else []
    data, axes = _arrange(
        data, names or [str(i) for i in range(len(shape))], spatial, source=source
    )
    spacing = _attr_triplet(attrs, ("element_size_um", "spacing", "voxel_size", "resolution"))
    return Volume(
        levels=(data,),
        spacing=spacing or (1.0,) * 3,
        origin=_attr_triplet(attrs, ("origin", "offset")) or (0.0,) * 3,
        axes=axes,
        source=source,
        kind="hdf5",
        attrs=attrs,
    )


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


# -- helpers ------------------------------------------------------------------------------
def _from_level(volume: Volume, level: int) -> Volume:
    n = len(volume.levels)
    if not 0 <= level < n:
        raise ScrollsegError(f"{volume.source} has levels 0..{n - 1}; level {level} does not exist")
    if level == 0:
        return volume
    spacings = tuple(volume.level_spacing(i) for i in range(n))
    origins = volume.level_origins or (volume.origin,) * n
    labels = {k: v[level:] for k, v in volume.labels.items() if len(v) > level}
    return replace(
        volume,
        levels=volume.levels[level:],
        spacing=spacings[level],
        origin=origins[level],
        labels=labels,
        level_spacings=spacings[level:],
        level_origins=origins[level:],
    )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"
