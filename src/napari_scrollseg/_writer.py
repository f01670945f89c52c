"""napari writer: save a labels layer as an OME-Zarr label image or a TIFF.

- ``.zarr``: an OME-Zarr multiscale label image (NGFF v0.4, written by
  :func:`napari_scrollseg.engine.omezarr.write_image`, pyramid by ``mode``), with
  the layer's spacing, origin, class colours and class names. Dask data is
  written chunk by chunk. An existing label image at the path is replaced; any
  other existing path is left alone.
- ``.tif`` / ``.tiff``: an ImageJ hyperstack (voxel size in its metadata) for
  ``uint8``, ``uint16`` and ``float32`` up to 4 GB; otherwise a BigTIFF with an
  nnU-Net ``<name>.json`` spacing sidecar. Written one z-slab at a time.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.dask_compute import to_numpy
from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    import dask.array as da

log = logging.getLogger(__name__)

ZARR_SUFFIXES = (".zarr",)
TIFF_SUFFIXES = (".tif", ".tiff")
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
_IMAGEJ_MAX_BYTES = 2**32 - 2**25
_SLAB_BYTES = 64 * 2**20


def write_labels(path: str, data: Any, meta: Mapping[str, Any]) -> list[str]:
    """Save one labels layer (npe2 single-layer writer).

    Parameters
    ----------
    path
        Target ending ``.zarr``, ``.tif`` or ``.tiff``.
    data
        The layer data: numpy, dask, or a list of levels (multiscale; level 0 is
        written and the pyramid rebuilt).
    meta
        The layer state: ``scale``, ``translate``, ``name``, ``colormap``, ``features``.

    Returns
    -------
    list of str
        The paths written.
    """
    target = Path(path)
    array = _level0(data, meta)
    if array.ndim not in (2, 3):
        raise ScrollsegError(
            f"cannot save a {array.ndim}D labels layer; scrollseg saves 2D or 3D (z, y, x) labels"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ScrollsegError(f"labels must be integers, got {array.dtype}; convert the layer")
    spacing = _spatial(meta.get("scale"), array.ndim, 1.0)
    origin = _spatial(meta.get("translate"), array.ndim, 0.0)
    suffix = target.suffix.lower()
    if suffix in ZARR_SUFFIXES:
        written = _write_zarr(target, array, spacing, origin, meta)
    elif suffix in TIFF_SUFFIXES:
        written = _write_tiff(target, array, spacing)
    else:
        raise ScrollsegError(
            f"cannot save labels as {target.name}; end the name with .zarr, .tif or .tiff"
        )
    log.info("saved labels %s %s to %s", array.shape, array.dtype, target)
    return [str(p) for p in written]


def _level0(data: Any, meta: Mapping[str, Any]) -> np.ndarray | da.Array:
    if meta.get("multiscale") or isinstance(data, list | tuple):
        data = data[0]
    return data if hasattr(data, "ndim") and hasattr(data, "dtype") else np.asarray(data)


def _spatial(values: Sequence[float] | None, ndim: int, default: float) -> tuple[float, ...]:
    if values is None:
        return (default,) * ndim
    values = [float(v) for v in values]
    return tuple(values[-ndim:]) if len(values) >= ndim else (default,) * ndim


# -- OME-Zarr ----------------------------------------------------------------------------
def _write_zarr(
    target: Path,
    array: np.ndarray | da.Array,
    spacing: tuple[float, ...],
    origin: tuple[float, ...],
    meta: Mapping[str, Any],
) -> list[Path]:
    from napari_scrollseg.engine import omezarr

    if target.exists():
        if not _is_label_image(target):
            raise ScrollsegError(
                f"{target} already exists and is not a label image; choose another name "
                f"(scrollseg replaces only label images it can recognise)"
            )
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    colors = label_colors(meta.get("colormap"))
    names = label_names(meta.get("features"))
    image_label: dict[str, Any] = {}
    if colors:
        image_label["colors"] = [
            {"label-value": v, "rgba": list(rgba)} for v, rgba in sorted(colors.items())
        ]
    if names:
        image_label["properties"] = [
            {"label-value": v, "class": n} for v, n in sorted(names.items())
        ]
    ndim = array.ndim
    omezarr.write_image(
        target,
        array,
        spacing=spacing,
        origin=origin,
        chunks=(64,) * 3 if ndim == 3 else (512, 512),
        axes="zyx"[-ndim:],
        reduction="mode",
        name=str(meta.get("name") or target.stem),
        image_label=image_label,
    )
    return [target]


def _is_label_image(path: Path) -> bool:
    """Whether ``path`` is an OME-Zarr label image (NGFF ``image-label`` at its root)."""
    for name in (".zattrs", "zarr.json"):
        try:
            attrs = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        attrs = attrs.get("attributes", attrs)
        if "image-label" in attrs or "image-label" in (attrs.get("ome") or {}):
            return True
    return False


def label_colors(colormap: Any) -> dict[int, tuple[int, int, int, int]]:
    """RGBA (0..255) per label value from a napari direct label colormap or a mapping.

    Cyclic (random) colormaps, label 0 and the default colour give nothing.
    """
    if colormap is None:
        return {}
    mapping = colormap if isinstance(colormap, Mapping) else getattr(colormap, "color_dict", None)
    if not isinstance(mapping, Mapping):
        return {}
    out = {}
    for value, color in mapping.items():
        if value is None or int(value) == 0:
            continue
        rgba = np.asarray(color, dtype=float).ravel()
        if rgba.size not in (3, 4):
            continue  # a colour name; napari has already turned those into RGBA
        rgba = np.append(rgba, 1.0) if rgba.size == 3 else rgba
        out[int(value)] = tuple(round(float(c) * 255) for c in np.clip(rgba, 0, 1))
    return out


def label_names(features: Any) -> dict[int, str]:
    """Class name per label value from a layer's features (``index`` and ``class`` columns)."""
    if features is None or "class" not in features:
        return {}
    classes = list(features["class"])
    index = list(features["index"]) if "index" in features else list(range(len(classes)))
    return {int(v): str(n) for v, n in zip(index, classes) if int(v) != 0 and str(n)}


# -- TIFF ---------------------------------------------------------------------------------
def _write_tiff(
    target: Path, array: np.ndarray | da.Array, spacing: tuple[float, ...]
) -> list[Path]:
    import tifffile

    dtype = np.dtype(array.dtype)
    nbytes = int(np.prod(array.shape)) * dtype.itemsize
    imagej = dtype in _IMAGEJ_DTYPES and nbytes < _IMAGEJ_MAX_BYTES
    yx = spacing[-2:]
    kwargs: dict[str, Any] = {
        "shape": tuple(int(s) for s in array.shape),
        "dtype": dtype,
        "resolution": (1.0 / yx[1], 1.0 / yx[0]),
        "photometric": "minisblack",
    }
    written = [target]
    if imagej:
        meta: dict[str, Any] = {"axes": "ZYX"[-array.ndim :], "unit": "um"}
        if array.ndim == 3:
            meta["spacing"] = spacing[0]
        kwargs.update(imagej=True, metadata=meta)
    else:
        kwargs.update(bigtiff=True, compression="zlib", metadata={"spacing": list(spacing)})
        if array.ndim == 3:
            sidecar = target.with_name(target.name.split(".")[0] + ".json")
            sidecar.write_text(json.dumps({"spacing": list(spacing)}))
            written.append(sidecar)
    target.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(target, _planes(array), **kwargs)
    return written


def _planes(array: np.ndarray | da.Array) -> Iterator[np.ndarray]:
    """The 2D planes of ``array``, computing a dask array one z-slab at a time."""
    if array.ndim == 2:
        yield to_numpy(array)
        return
    plane_bytes = max(1, int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize)
    step = max(1, _SLAB_BYTES // plane_bytes)
    for z0 in range(0, array.shape[0], step):
        slab = array[z0 : z0 + step]
        slab = to_numpy(slab)
        yield from slab
