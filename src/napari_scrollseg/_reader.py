"""napari reader: open CT volumes lazily as (multiscale) dask-backed layers.

The work is :func:`napari_scrollseg.engine.volumes.open_volume`; this module only
decides cheaply whether a path looks like a volume and turns a
:class:`~napari_scrollseg.engine.volumes.Volume` into napari layer data:

- an image pyramid becomes one multiscale image layer (a list of dask arrays),
  ``scale`` = spacing and ``translate`` = origin;
- ``(c, z, y, x)`` volumes (e.g. per-class probabilities) open with ``channel_axis=0``;
- OME-Zarr label images (``labels/<name>``) become multiscale labels layers
  coloured from their NGFF ``image-label`` colours; an OME-Zarr whose root is a
  label image (as :mod:`napari_scrollseg._writer` writes) opens as labels too.

Nothing is loaded whole: contrast limits are percentiles of the smallest level (or a
few of its blocks).

CT display defaults: percentile contrast for every dtype (a CT scan rarely fills
0..255), attenuated MIP in 3D (a plain MIP turns dense material into a white block),
and label value 1 (air / matrix, the class around everything) transparent, so a
label image in 3D is not an opaque box.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_scrollseg.engine.colors import DEFAULT_LABEL_COLOR, label_colormap
from napari_scrollseg.engine.volumes import (
    H5_PATH_PATTERN,
    HDF5_SUFFIXES,
    TIFF_SUFFIXES,
    URL_PATTERN,
    ZARR_METADATA,
)

if TYPE_CHECKING:
    import dask.array as da

    from napari_scrollseg.engine.volumes import Volume

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[str | Sequence[str]], list[LayerData]]


# CT display defaults (see the module docstring)
RENDERING_3D = "attenuated_mip"
ATTENUATION_3D = 0.5
TRANSPARENT_LABEL = 1
AXIS_LABELS = ("z", "y", "x")  # every volume opens as (z, y, x), channels split off


def get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """Return :func:`read_volume` if ``path`` looks like a volume scrollseg opens, else None.

    The check is cheap (names, folder markers, a TIFF header); it never reads pixels.
    """
    if not isinstance(path, str | os.PathLike):
        if len(path) != 1:
            return None
        path = path[0]
    return read_volume if _looks_like_volume(os.fspath(path)) else None


def read_volume(path: str | Sequence[str]) -> list[LayerData]:
    """Open one volume lazily and return its napari layer data.

    Raises
    ------
    ScrollsegError
        When the path is not a readable 3D volume (the message says what to do).
    """
    from napari_scrollseg.engine.volumes import open_volume

    if not isinstance(path, str | os.PathLike):
        (path,) = path
    path = os.fspath(path)
    layers: list[LayerData] = []
    for source in _hdf5_volumes(path) or [path]:
        layers.extend(volume_layer_data(open_volume(source)))
    return layers


def volume_layer_data(volume: Volume, *, name: str | None = None) -> list[LayerData]:
    """napari layer data for a volume: its image (or labels) layer, then its label images.

    Parameters
    ----------
    volume
        An opened volume.
    name
        Layer name; default: the file or folder name without suffix.
    """
    name = name or _stem(volume.source)
    label_meta = _image_label(volume.attrs)
    layers: list[LayerData] = []
    if label_meta is not None and volume.axes == "zyx":
        layers.append(_labels_layer(volume.levels, volume, name, label_meta))
    elif _is_prediction(volume):
        layers.append(_probabilities_layer(volume, name))
    else:
        layers.append(_image_layer(volume, name))
    for label_name, levels in volume.labels.items():
        meta = _label_group_meta(volume.source, label_name)
        layers.append(_labels_layer(levels, volume, label_name, meta))
    return layers


def _hdf5_volumes(path: str) -> list[str]:
    """``file.h5:/dataset`` for each 3D+ dataset of an HDF5 file named without a dataset.

    napari only opens paths that exist, so a file with several volumes opens as
    one layer per volume. Empty for anything else (and where h5py is missing:
    :func:`open_volume` then says how to install it).
    """
    if Path(path).suffix.lower() not in HDF5_SUFFIXES or not Path(path).is_file():
        return []
    try:
        import h5py
    except ImportError:
        return []
    found: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.ndim >= 3:
            found.append(f"{path}:/{name}")

    try:
        with h5py.File(path, "r") as h5:
            h5.visititems(visit)
    except OSError:
        return []
    return found if len(found) > 1 else []


# -- cheap path checks --------------------------------------------------------------------
def _looks_like_volume(path: str) -> bool:
    if URL_PATTERN.match(path) and not path.startswith("file://"):
        return ".zarr" in path.lower()
    local = Path(path.removeprefix("file://")).expanduser()
    if local.is_dir():
        return _is_zarr_dir(local) or _has_tiff(local)
    suffix = local.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return local.is_file() and _tiff_is_volume(local)
    if suffix == ".zip":
        return local.name.lower().endswith(".zarr.zip")
    return bool(H5_PATH_PATTERN.match(path))


def _is_zarr_dir(path: Path) -> bool:
    return path.suffix.lower() == ".zarr" or any((path / m).exists() for m in ZARR_METADATA)


def _has_tiff(path: Path) -> bool:
    """Whether a folder holds a slice TIFF (stops at the first one found)."""
    try:
        with os.scandir(path) as entries:
            return any(e.name.lower().endswith(TIFF_SUFFIXES) and e.is_file() for e in entries)
    except OSError:
        return False


def _tiff_is_volume(path: Path) -> bool:
    """Whether a TIFF's first series has three non-channel axes larger than 1 (header only)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            shape, axes = series.shape, series.axes.upper()
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return False
    return sum(s > 1 for s, a in zip(shape, axes) if a not in "CS") >= 3


# -- layers -------------------------------------------------------------------------------
def _stem(source: str) -> str:
    text = source.rstrip("/")
    if (match := H5_PATH_PATTERN.match(text)) and match.group("dataset"):
        return match.group("dataset").strip("/").replace("/", "_") or "volume"
    name = text.rsplit("/", 1)[-1] or "volume"
    for suffix in (".ome.zarr", ".zarr.zip", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return Path(name).stem or name


def _image_layer(volume: Volume, name: str) -> LayerData:
    levels = list(volume.levels)
    meta: dict[str, Any] = {
        "name": name,
        "axis_labels": AXIS_LABELS,
        "scale": tuple(volume.spacing),
        "translate": tuple(volume.origin),
        "contrast_limits": contrast_limits(levels[-1]),
        "multiscale": len(levels) > 1,
        "rendering": RENDERING_3D,
        "attenuation": ATTENUATION_3D,
        "metadata": {"source": volume.source, "kind": volume.kind, "spacing": volume.spacing},
    }
    if volume.axes == "czyx":
        n = int(levels[0].shape[0])
        meta["channel_axis"] = 0
        meta["name"] = [f"{name} [{c}]" for c in range(n)]
        meta["colormap"] = "gray" if n == 1 else "magma"
        meta["blending"] = "additive"
    data = levels if len(levels) > 1 else levels[0]
    return data, meta, "image"


def _is_prediction(volume: Volume) -> bool:
    info = volume.attrs.get("scrollseg")
    return volume.axes == "czyx" and isinstance(info, Mapping) and info.get("kind") == "prediction"


def _probabilities_layer(volume: Volume, name: str) -> LayerData:
    """A prediction's class probabilities: one layer per class, named after it; only the
    last class (e.g. ink) visible, as a colormap whose 0 is black so that, added, it
    overlays the scan."""
    data, meta, kind = _image_layer(volume, name)
    n = int(volume.levels[0].shape[0])
    omero = volume.attrs.get("omero")
    channels = omero.get("channels") if isinstance(omero, Mapping) else None
    labels = [c.get("label") for c in channels] if isinstance(channels, list) else []
    if len(labels) != n or not all(labels):
        labels = [str(c) for c in range(n)]
    meta["name"] = [f"{name} [{label}]" for label in labels]
    meta["visible"] = [c == n - 1 for c in range(n)]
    meta["colormap"] = "inferno"
    meta["blending"] = "additive"
    meta["contrast_limits"] = (0, 255)  # uint8 probabilities: round(p * 255)
    return data, meta, kind


def _labels_layer(
    levels: Sequence[da.Array], volume: Volume, name: str, label_meta: Mapping[str, Any] | None
) -> LayerData:
    levels = list(levels)
    # a label image may be stored at another resolution than the image it belongs to
    full = volume.shape[-3:]
    scale = tuple(s * f / n for s, f, n in zip(volume.spacing, full, levels[0].shape[-3:]))
    meta: dict[str, Any] = {
        "name": name,
        "axis_labels": AXIS_LABELS,
        "scale": scale,
        "translate": tuple(volume.origin),
        "multiscale": len(levels) > 1,
        "metadata": {"source": volume.source, "kind": volume.kind, "spacing": scale},
    }
    colormap, features = _label_style(label_meta or {})
    if colormap:
        meta["colormap"] = colormap
    if features:
        meta["features"] = features
    data = levels if len(levels) > 1 else levels[0]
    return data, meta, "labels"


def _image_label(attrs: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The NGFF ``image-label`` entry of a group's attributes (v0.4 or v0.5), or None."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and isinstance(ome.get("image-label"), Mapping):
        return ome["image-label"]
    value = attrs.get("image-label")
    return value if isinstance(value, Mapping) else None


def _label_group_meta(source: str, name: str) -> Mapping[str, Any] | None:
    """The ``image-label`` metadata of ``source/labels/name`` (metadata read only)."""
    import zarr

    if not (URL_PATTERN.match(source) or Path(source).is_dir()):
        return None
    try:
        group = zarr.open_group(f"{source.rstrip('/')}/labels/{name}", mode="r")
        return _image_label(dict(group.attrs))
    except (OSError, KeyError, ValueError, TypeError) as exc:  # no colours: still open it
        log.info("no label colours for %s/labels/%s (%s)", source, name, exc)
        return None


def see_through_background(colormap: dict) -> dict:
    """``colormap`` (a napari direct colour dict) with class 1, the annotation's
    background (e.g. air), transparent: over the scan, a prediction shows its other
    classes only. Changed in place and returned."""
    rgba = colormap.get(TRANSPARENT_LABEL, DEFAULT_LABEL_COLOR)
    colormap[TRANSPARENT_LABEL] = (*rgba[:3], 0.0)
    return colormap


def _label_style(
    label_meta: Mapping[str, Any],
) -> tuple[dict[Any, tuple[float, ...]] | None, dict[str, list] | None]:
    """napari direct colormap and features (class names) from NGFF ``image-label``."""
    colors: dict[int, list[float]] = {}
    for entry in label_meta.get("colors") or ():
        try:
            colors[int(entry["label-value"])] = [float(c) for c in entry["rgba"]]
        except (KeyError, TypeError, ValueError):
            continue
    names: dict[int, str] = {}
    for entry in label_meta.get("properties") or ():
        if "label-value" in entry and "class" in entry:
            names[int(entry["label-value"])] = str(entry["class"])
    colormap = None
    if colors:
        colormap = see_through_background(label_colormap(colors))
    features = None
    if names:
        values = sorted(set(names) | {0})
        features = {
            "index": values,
            "class": [names.get(v, "unlabeled" if v == 0 else "") for v in values],
        }
    return colormap, features


def contrast_limits(arr: da.Array) -> tuple[float, float]:
    """Contrast limits for display, without reading the array whole: the 0.5 and 99.5
    percentiles of a bounded sample of ``arr`` (pass the smallest pyramid level), for
    8-bit scans too (:func:`napari_scrollseg.engine.contrast.percentile_window`)."""
    from napari_scrollseg.engine.contrast import percentile_window

    return percentile_window(arr)
