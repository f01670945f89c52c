"""Sparse annotations aligned with an image: class table, zarr-backed label store, Otsu start.

Label semantics (DESIGN.md): ``0`` unlabeled, ``1..K`` user classes, and one explicit
*ignore* value, the largest value of the label dtype (255 for uint8, 65535 for uint16).

The :class:`AnnotationStore` is an OME-Zarr label image (zarr format 2, one level,
written by :mod:`napari_scrollseg.engine.omezarr`) whose chunks exist on disk only
where something was painted, so it can cover a whole scroll. Painting goes into
per-chunk buffers in memory; :meth:`AnnotationStore.save` writes the dirty chunks only.

Atomic saving: each chunk is written through zarr-python's ``LocalStore``, which (zarr
3.1, ``zarr/storage/_local.py``: ``_atomic_write``) writes ``<key>.<uuid>.partial`` and
then ``os.replace``-s it onto the chunk key; a chunk that becomes all ``0`` is deleted
(``write_empty_chunks=False``), also a single atomic call. A ``kill -9`` in the middle of
a save therefore leaves every chunk either in its old or its new state (a test kills a
saving process repeatedly to check this). Left-over ``*.partial`` files are removed when
the store is opened. Not covered: power loss (no ``fsync``), and two processes writing
the same store at once (one writer per store).

Autosave is left to the caller (the widget calls :meth:`AnnotationStore.save` on a
timer); :func:`autosave_every` is a small helper for scripts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_scrollseg.engine.colors import IGNORE_COLOR, TRANSPARENT, label_colormap, palette_color
from napari_scrollseg.engine.dask_compute import compute, to_numpy
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.volumes import read_block, volume_parts

if TYPE_CHECKING:
    import dask.array as da
    import zarr

log = logging.getLogger(__name__)

UNLABELED = 0


class _BadIndex(ScrollsegError, IndexError):
    """An index outside the annotation (an IndexError too, as numpy raises)."""


ATTRS_KEY = "scrollseg"
FORMAT_VERSION = 1


def ignore_value(dtype: np.dtype | str) -> int:
    """The ignore label of a label dtype: its largest value (255 for uint8, 65535 for uint16)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui":
        raise ScrollsegError(f"label dtype must be an integer type such as uint8, got {dtype}")
    return int(np.iinfo(dtype).max)


IGNORE = {"uint8": ignore_value("uint8"), "uint16": ignore_value("uint16")}


@dataclass
class LabelClass:
    """One annotation class: label value ``id`` (1..K), ``name`` and RGB ``color`` (0..255)."""

    id: int
    name: str
    color: tuple[int, int, int]


@dataclass
class ClassTable:
    """The classes ``1..K`` of an annotation, in id order, ids consecutive from 1."""

    classes: list[LabelClass] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.classes = sorted(self.classes, key=lambda c: c.id)
        ids = self.ids()
        if not ids:
            raise ScrollsegError("a class table needs at least one class (class 1 is background)")
        if ids != list(range(1, len(ids) + 1)):
            raise ScrollsegError(
                f"class ids must be 1, 2, ..., K with no gaps (0 means unlabeled), got {ids}"
            )
        names = self.names()
        if len(set(names)) != len(names) or "ignore" in names or any(not n for n in names):
            raise ScrollsegError(
                f"class names must be unique, non-empty and not 'ignore', got {names}"
            )

    @classmethod
    def from_names(cls, names: Sequence[str]) -> ClassTable:
        """Classes ``1..K`` named in order, with default colours."""
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        return cls([LabelClass(i + 1, str(n), palette_color(i + 1)) for i, n in enumerate(names)])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassTable:
        """From ``{name: {"id": int, "color": [r, g, b]}}``; an id 0 entry (unlabeled) is skipped."""
        classes = []
        try:
            for name, entry in data.items():
                cid = int(entry["id"])
                if cid == UNLABELED:
                    continue
                color = tuple(int(c) for c in entry.get("color", palette_color(cid)))[:3]
                classes.append(LabelClass(cid, str(name), color))  # type: ignore[arg-type]
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ScrollsegError(
                'class table must map each name to {"id": int, "color": [r, g, b]}'
            ) from exc
        return cls(classes)

    @classmethod
    def from_json(cls, path: str | Path) -> ClassTable:
        """Read a ``dataset_info.json``-style file: ``{name: {"id": ..., "color": [...]}}``."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ScrollsegError(f"cannot read class table {path}: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("classes"), dict):
            data = data["classes"]
        return cls.from_dict(data)

    @classmethod
    def from_dataset_json(cls, meta: dict[str, Any]) -> ClassTable:
        """The annotation classes of an nnU-Net ``dataset.json``: nnU-Net label ``v`` is class ``v+1``.

        Names and colours come from the ``scrollseg`` section that export writes; for
        another dataset, from its ``labels`` (ignore left out) with default colours.
        """
        own = meta.get("scrollseg", {})
        if isinstance(own.get("classes"), dict):
            colors = own.get("colors", {})
            return cls.from_dict(
                {
                    name: {"id": cid, **({"color": colors[name]} if name in colors else {})}
                    for name, cid in own["classes"].items()
                }
            )
        labels = {
            int(v): str(n)
            for n, v in meta["labels"].items()
            if n != "ignore" and isinstance(v, int)
        }
        return cls.from_dict({n: {"id": v + 1} for v, n in sorted(labels.items())})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{name: {"id": id, "color": [r, g, b]}}`` in id order."""
        return {c.name: {"id": c.id, "color": list(c.color)} for c in self.classes}

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def ids(self) -> list[int]:
        """Class ids, ``[1, ..., K]``."""
        return [c.id for c in self.classes]

    def names(self) -> list[str]:
        """Class names in id order."""
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def as_napari_colors(self, *, ignore: int | None = 255) -> dict[int | None, tuple[float, ...]]:
        """Colour dict for a napari labels layer (RGBA 0..1; 0 transparent, ignore grey)."""
        colors = {c.id: c.color for c in self.classes}
        return label_colormap(colors, default=TRANSPARENT, ignore=ignore)


def _image_label(classes: ClassTable, ignore: int) -> dict[str, Any]:
    """NGFF ``image-label`` colours and class names (ignore grey) of a class table."""
    colors = {c.id: (*c.color, 255) for c in classes.classes}
    colors[ignore] = tuple(round(c * 255) for c in IGNORE_COLOR)
    names = {c.id: c.name for c in classes.classes}
    names[ignore] = "ignore"
    return {
        "colors": [{"label-value": v, "rgba": list(c)} for v, c in colors.items()],
        "properties": [{"label-value": v, "class": n} for v, n in names.items()],
    }


@dataclass(frozen=True)
class AnnotationCounts:
    """Voxels per label value (``0`` left out) and the annotated slice indices per axis."""

    voxels: dict[int, int]
    slices: tuple[list[int], list[int], list[int]]


def default_store_path(image_source: str | Path) -> Path:
    """Where a volume's annotations go by default: ``<volume name>.annotations.zarr`` beside it."""
    source = Path(str(image_source).rstrip("/"))
    name = source.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif", ".h5"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return source.with_name(f"{name or 'volume'}.annotations.zarr")


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, so read-only mounts count too)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _normalize_box(key: Any, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Basic-indexing key -> (step-1 slices clipped to ``shape``, axes indexed by an int)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    if len(key) > len(shape):
        raise _BadIndex(f"too many indices for a {len(shape)}-d annotation")
    key = key + (slice(None),) * (len(shape) - len(key))
    slices, int_axes = [], []
    for ax, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                raise _BadIndex("annotation boxes take slices with step 1 only")
            slices.append(slice(start, max(start, stop)))
        elif isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise _BadIndex(f"index {k} out of range for axis {ax} of size {n}")
            slices.append(slice(i, i + 1))
            int_axes.append(ax)
        else:
            raise _BadIndex("annotation boxes take ints and slices only")
    return tuple(slices), tuple(int_axes)


def _overlap(
    box: tuple[slice, ...], cbox: tuple[slice, ...]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where ``box`` and chunk box ``cbox`` overlap, relative to each of them."""
    inter = [slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, cbox)]
    in_box = tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inter, box))
    in_chunk = tuple(slice(i.start - c.start, i.stop - c.start) for i, c in zip(inter, cbox))
    return in_box, in_chunk


class AnnotationStore:
    """An integer label volume aligned with an image, backed by a sparse zarr on disk.

    Create with :meth:`create`, :meth:`open` or :meth:`open_or_create`. Index it like a
    numpy array with ints and step-1 slices: reading returns numpy (unsaved paint
    included), assigning paints into per-chunk buffers marked dirty. :meth:`save` writes
    the dirty chunks atomically and returns how many it wrote.
    """

    def __init__(self, path: str | Path, *, _group: zarr.Group | None = None) -> None:
        import zarr

        self.path = Path(path)
        try:
            group = _group if _group is not None else zarr.open_group(str(self.path), mode="r+")
            meta = dict(group.attrs[ATTRS_KEY]["annotation"])
            self._array = group["0"]
            spacing = tuple(float(v) for v in meta["spacing"])
            origin = tuple(float(o) for o in meta["origin"])
            classes = ClassTable.from_dict(meta["classes"])
            if len(self._array.shape) != 3:
                raise ValueError("not 3D")
        except (OSError, KeyError, TypeError, ValueError, ScrollsegError) as exc:
            raise ScrollsegError(
                f"{self.path} is not a scrollseg annotation store (or it is damaged: {exc}); "
                "choose another path, or create a new store"
            ) from exc
        self._group = group
        self.spacing = spacing
        self.origin = origin
        self._classes = classes
        self.dtype = np.dtype(self._array.dtype)
        self.ignore_value = ignore_value(self.dtype)
        self.chunks = tuple(int(c) for c in self._array.chunks)
        self._dirty: dict[tuple[int, ...], np.ndarray] = {}
        self._meta_dirty = False
        self._lock = threading.RLock()
        # running counts (see counts()): per value, and non-zero voxels per index of each axis
        self._voxels: np.ndarray | None = None
        self._per_slice: list[np.ndarray] | None = None
        if not _writable(self.path / "0"):
            raise ScrollsegError(
                f"annotation store {self.path} is read-only; copy it to a writable folder "
                "(or fix its permissions) to annotate"
            )
        self._remove_partials()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        shape: Sequence[int],
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        origin: Sequence[float] | None = None,
        classes: ClassTable | Sequence[str],
        chunks: Sequence[int] = (64, 64, 64),
        dtype: str | np.dtype = "uint8",
        overwrite: bool = False,
    ) -> AnnotationStore:
        """Create an empty store (nothing but metadata on disk) at ``path``."""
        from napari_scrollseg.engine import omezarr

        classes = classes if isinstance(classes, ClassTable) else ClassTable.from_names(classes)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ScrollsegError(f"annotation shape must be three sizes (z, y, x), got {shape}")
        ign = ignore_value(dtype)
        if len(classes) >= ign:
            raise ScrollsegError(
                f"{len(classes)} classes do not fit {np.dtype(dtype)} with ignore={ign}; use uint16"
            )
        origin = tuple(float(o) for o in (origin if origin is not None else (0.0,) * 3))
        if spacing is None or len(spacing) != 3 or not all(float(v) > 0 for v in spacing):
            raise ScrollsegError(f"annotation spacing must be three sizes > 0, got {spacing!r}")
        if len(chunks) != 3 or min(int(c) for c in chunks) < 1:
            raise ScrollsegError(f"annotation chunks must be three sizes >= 1, got {chunks!r}")
        meta = {
            "version": FORMAT_VERSION,
            "spacing": [float(s) for s in spacing],
            "origin": list(origin),
            "ignore": ign,
            "classes": classes.to_dict(),
        }
        parent = Path(path).parent
        with contextlib.suppress(OSError):
            parent.mkdir(parents=True, exist_ok=True)
        if not _writable(parent):
            raise ScrollsegError(
                f"cannot create {path}: {parent} is not a writable folder; choose another path"
            )
        group = omezarr.create_image(
            path,
            shape=shape,
            dtype=dtype,
            chunks=tuple(int(c) for c in chunks),
            spacing=spacing,
            origin=origin,
            n_levels=1,
            name=Path(path).name,
            attrs={ATTRS_KEY: {"annotation": meta}},
            overwrite=overwrite,
            image_label=_image_label(classes, ign),
        )
        log.info("created annotation store %s shape %s", path, shape)
        return cls(path, _group=group)

    @classmethod
    def open(cls, path: str | Path) -> AnnotationStore:
        """Open an existing store (class table and labels resume where they were saved)."""
        if not Path(path).exists():
            raise ScrollsegError(f"annotation store {path} does not exist")
        return cls(path)

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        like: Any,
        classes: ClassTable | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> AnnotationStore:
        """Open ``path`` if it exists (checking it matches ``like``), else create it like ``like``.

        ``like`` is a Volume or an array (z, y, x). ``classes`` is needed to create.
        """
        data, spacing, origin = volume_parts(like)
        shape = tuple(int(s) for s in data.shape[-3:])
        if Path(path).exists():
            store = cls.open(path)
            if store.shape != shape:
                raise ScrollsegError(
                    f"annotation {path} has shape {store.shape} but the image has {shape}; "
                    "open the image it was made for or choose another annotation path"
                )
            return store
        if classes is None:
            raise ScrollsegError(f"{path} does not exist yet: give the classes to create it")
        return cls.create(
            path,
            shape=shape,
            spacing=spacing or (1.0, 1.0, 1.0),
            origin=origin,
            classes=classes,
            **kwargs,
        )

    # -- properties --------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape ``(z, y, x)``."""
        return tuple(int(s) for s in self._array.shape)

    @property
    def ndim(self) -> int:
        """Always 3."""
        return 3

    @property
    def classes(self) -> ClassTable:
        """The class table (assigning one marks it for the next :meth:`save`)."""
        return self._classes

    @classes.setter
    def classes(self, table: ClassTable) -> None:
        if len(table) >= self.ignore_value:
            raise ScrollsegError(f"{len(table)} classes do not fit {self.dtype}")
        self._classes = table
        self._meta_dirty = True

    @property
    def unsaved(self) -> bool:
        """Whether paint or class-table edits wait for :meth:`save`."""
        return bool(self._dirty) or self._meta_dirty

    @property
    def dirty_chunks(self) -> int:
        """Number of painted chunks not saved yet."""
        return len(self._dirty)

    def __repr__(self) -> str:
        return (
            f"AnnotationStore({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, "
            f"classes={self.classes.names()}, dirty={len(self._dirty)})"
        )

    # -- chunk geometry ----------------------------------------------------------------
    def _chunk_box(self, idx: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunks, self.shape)
        )

    def _chunks_in(self, box: tuple[slice, ...]) -> Iterator[tuple[int, ...]]:
        ranges = [
            range(s.start // c, (s.stop - 1) // c + 1) if s.stop > s.start else range(0)
            for s, c in zip(box, self.chunks)
        ]
        return product(*ranges)

    def _stored_chunk_ids(self) -> list[tuple[int, ...]]:
        """Chunk indices that exist on disk (listing files; never reads the empty grid)."""
        root = self.path / "0"
        found = []
        for dirpath, _, files in os.walk(root):
            rel = Path(dirpath).relative_to(root).parts
            for f in files:
                parts = (*rel, f)
                if len(parts) == 3 and all(p.isdigit() for p in parts):
                    found.append(tuple(int(p) for p in parts))
        return found

    def _remove_partials(self) -> None:
        for p in (self.path / "0").rglob("*.partial"):
            log.warning("removing unfinished write %s (an earlier save was interrupted)", p)
            p.unlink(missing_ok=True)

    # -- reading and painting ----------------------------------------------------------
    def _read_box(self, box: tuple[slice, ...]) -> np.ndarray:
        with self._lock:
            out = read_block(self._array, box, str(self.path))
            for idx in self._chunks_in(box):
                buf = self._dirty.get(idx)
                if buf is None:
                    continue
                in_box, in_chunk = _overlap(box, self._chunk_box(idx))
                out[in_box] = buf[in_chunk]
            return out

    def __getitem__(self, key: Any) -> np.ndarray:
        box, int_axes = _normalize_box(key, self.shape)
        out = self._read_box(box)
        return out.squeeze(axis=int_axes) if int_axes else out

    def _check_values(self, value: np.ndarray) -> None:
        allowed = np.array([UNLABELED, *self.classes.ids(), self.ignore_value])
        values = np.unique(value)
        bad = values[~np.isin(values, allowed)]
        if bad.size:
            raise ScrollsegError(
                f"label values {bad.tolist()[:10]} are not in the class table "
                f"(0 unlabeled, 1..{len(self.classes)} {self.classes.names()}, "
                f"{self.ignore_value} ignore); add the class first"
            )

    def __setitem__(self, key: Any, value: Any) -> None:
        box, int_axes = _normalize_box(key, self.shape)
        region = tuple(s.stop - s.start for s in box)
        value = np.asarray(value)
        if value.dtype.kind not in "biu" and not (
            value.dtype.kind == "f" and np.all(value % 1 == 0)
        ):
            raise ScrollsegError(f"labels must be integers, got {value.dtype}")
        self._check_values(value)
        if int_axes and value.ndim == len(self.shape) - len(int_axes):
            value = np.expand_dims(value, int_axes)
        try:
            value = np.broadcast_to(value.astype(self.dtype, copy=False), region)
        except ValueError as exc:
            raise ScrollsegError(f"cannot paint a {value.shape} array into box {region}") from exc
        with self._lock:
            for idx in self._chunks_in(box):
                cbox = self._chunk_box(idx)
                buf = self._dirty.get(idx)
                if buf is None:
                    buf = read_block(self._array, cbox, str(self.path)).astype(self.dtype)
                in_box, in_chunk = _overlap(box, cbox)
                if self._voxels is not None:
                    self._count_change(buf[in_chunk], value[in_box], in_chunk, cbox)
                buf[in_chunk] = value[in_box]
                self._dirty[idx] = buf

    def save(self) -> int:
        """Write dirty chunks (each atomically) and changed metadata; return chunks written."""
        with self._lock:
            if self._meta_dirty:
                attrs = dict(self._group.attrs[ATTRS_KEY])
                attrs["annotation"] = {**attrs["annotation"], "classes": self.classes.to_dict()}
                label = dict(self._group.attrs.get("image-label", {}))
                label.update(_image_label(self.classes, self.ignore_value))
                self._group.attrs.update({ATTRS_KEY: attrs, "image-label": label})
                self._meta_dirty = False
            written = 0
            for idx in sorted(self._dirty):
                self._array[self._chunk_box(idx)] = self._dirty[idx]
                written += 1
            self._dirty.clear()
        if written:
            log.debug("saved %d chunks to %s", written, self.path)
        return written

    def discard(self) -> int:
        """Drop unsaved paint; return how many chunks were dropped."""
        with self._lock:
            n = len(self._dirty)
            self._dirty.clear()
            self._voxels = self._per_slice = None  # recounted from disk when next asked
            return n

    # -- whole-volume views ------------------------------------------------------------
    def as_dask(self) -> da.Array:
        """The labels as a lazy dask array, one task per zarr chunk (unsaved paint included)."""
        import dask.array as da

        def block(block_info: dict | None = None) -> np.ndarray:
            loc = block_info[None]["array-location"]
            return self._read_box(tuple(slice(a, b) for a, b in loc))

        chunks = tuple(
            tuple(min(c, n - i) for i in range(0, n, c)) for c, n in zip(self.chunks, self.shape)
        )
        return da.map_blocks(
            block, dtype=self.dtype, chunks=chunks, meta=np.empty((0, 0, 0), self.dtype)
        )

    def annotated_bbox(self, *, classes_only: bool = False) -> tuple[slice, ...] | None:
        """Bounding box of voxels ``!= 0`` (or only of class voxels ``1..K``), or ``None``.

        Reads only chunks that exist on disk or hold unsaved paint.
        """
        lo = np.full(3, np.iinfo(np.int64).max)
        hi = np.full(3, -1)
        with self._lock:
            ids = set(self._stored_chunk_ids()) | set(self._dirty)
            for idx in ids:
                cbox = self._chunk_box(idx)
                block = self._dirty.get(idx)
                if block is None:
                    block = read_block(self._array, cbox, str(self.path))
                mask = (
                    (block != UNLABELED) & (block != self.ignore_value)
                    if classes_only
                    else block != 0
                )
                if not mask.any():
                    continue
                for ax in range(3):
                    other = tuple(a for a in range(3) if a != ax)
                    hit = np.flatnonzero(mask.any(axis=other))
                    lo[ax] = min(lo[ax], cbox[ax].start + hit[0])
                    hi[ax] = max(hi[ax], cbox[ax].start + hit[-1])
        if hi[0] < 0:
            return None
        return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))

    def class_counts(self) -> dict[int, int]:
        """Voxel count per stored value other than 0 (unsaved paint included)."""
        return self.counts().voxels

    def counts(self) -> AnnotationCounts:
        """Voxels per value and annotated slices per axis, without rescanning the volume.

        The first call reads the chunks that exist on disk or in memory; after that every
        paint updates the counts from the painted box alone.
        """
        with self._lock:
            if self._voxels is None or self._per_slice is None:
                self._recount()
            voxels = {int(v): int(n) for v, n in enumerate(self._voxels) if v and n}  # type: ignore[arg-type]
            slices = tuple(np.flatnonzero(a).tolist() for a in self._per_slice)  # type: ignore[union-attr]
        return AnnotationCounts(voxels, slices)  # type: ignore[arg-type]

    def _recount(self) -> None:
        self._voxels = np.zeros(self.ignore_value + 1, np.int64)
        self._per_slice = [np.zeros(n, np.int64) for n in self.shape]
        for idx in set(self._stored_chunk_ids()) | set(self._dirty):
            cbox = self._chunk_box(idx)
            block = self._dirty.get(idx)
            if block is None:
                block = read_block(self._array, cbox, str(self.path))
            empty = np.zeros_like(block)
            self._count_change(empty, block, tuple(slice(0, n) for n in block.shape), cbox)

    def _count_change(
        self, old: np.ndarray, new: np.ndarray, in_chunk: tuple[slice, ...], cbox: tuple
    ) -> None:
        """Update the running counts for ``old`` -> ``new`` at ``in_chunk`` of chunk ``cbox``."""
        n = self.ignore_value + 1
        self._voxels += np.bincount(new.ravel(), minlength=n)[:n]
        self._voxels -= np.bincount(old.ravel(), minlength=n)[:n]
        diff = (new != 0).astype(np.int64) - (old != 0)
        if not diff.any():
            return
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            start = cbox[ax].start + in_chunk[ax].start
            per = diff.sum(axis=other)
            self._per_slice[ax][start : start + per.size] += per

    # -- class table edits (ids stay; only removing a class renumbers the ones after it) --
    def add_class(self, name: str, color: Sequence[int] | None = None) -> LabelClass:
        """Add class ``K + 1`` called ``name`` (default colour from the palette)."""
        k = len(self.classes) + 1
        rgb = tuple(int(c) for c in (color or palette_color(k)))[:3]
        new = LabelClass(k, str(name).strip(), rgb)  # type: ignore[arg-type]
        self.classes = ClassTable([*self.classes.classes, new])
        return new

    def rename_class(self, class_id: int, name: str) -> None:
        """Rename class ``class_id`` (no voxel changes)."""
        self._edit_class(class_id, name=str(name).strip())

    def recolor_class(self, class_id: int, color: Sequence[int]) -> None:
        """Give class ``class_id`` the RGB colour ``color`` (0..255)."""
        rgb = tuple(int(c) for c in color)[:3]
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ScrollsegError(f"a colour is three values 0..255, got {tuple(color)}")
        self._edit_class(class_id, color=rgb)

    def _edit_class(self, class_id: int, **change: Any) -> None:
        if class_id not in self.classes.ids():
            raise ScrollsegError(f"there is no class {class_id}; classes are {self.classes.ids()}")
        self.classes = ClassTable(
            [
                LabelClass(c.id, change.get("name", c.name), change.get("color", c.color))
                if c.id == class_id
                else c
                for c in self.classes.classes
            ]
        )

    def remove_class(self, class_id: int) -> int:
        """Remove a class: its voxels become unlabeled, classes after it move down by one.

        Reads and rewrites only chunks that hold paint. Returns how many voxels were
        cleared (ask the user first when it is not 0: see :meth:`counts`).
        """
        ids = self.classes.ids()
        if class_id not in ids:
            raise ScrollsegError(f"there is no class {class_id}; classes are {ids}")
        if len(ids) == 1:
            raise ScrollsegError("the last class cannot be removed; add another class first")
        lut = np.arange(self.ignore_value + 1, dtype=self.dtype)
        lut[class_id] = UNLABELED
        lut[class_id + 1 : len(ids) + 1] -= 1
        with self._lock:
            cleared = self.counts().voxels.get(class_id, 0)
            for idx in set(self._stored_chunk_ids()) | set(self._dirty):
                cbox = self._chunk_box(idx)
                block = self._read_box(cbox)
                relabeled = lut[block]
                if not np.array_equal(relabeled, block):
                    self[cbox] = relabeled
            kept = [c for c in self.classes.classes if c.id != class_id]
            self.classes = ClassTable(
                [LabelClass(i + 1, c.name, c.color) for i, c in enumerate(kept)]
            )
        return cleared

    # -- Otsu start --------------------------------------------------------------------
    def otsu_start(
        self,
        image: Any,
        *,
        z: int | None = None,
        z_stop: int | None = None,
        threshold_from: Literal["slice", "volume"] = "slice",
        upper: float | None = None,
        label: int | None = 1,
        below: int | None = None,
        max_blocks: int = 256,
    ) -> float:
        """Fill slices ``z..z_stop-1`` (default: the middle slice) from an Otsu threshold.

        Voxels with ``threshold < image < upper`` get ``label`` (None: left as they
        are), voxels at or below the threshold get ``below`` when given. Only unlabeled
        voxels are filled: painted voxels (classes and ignore) are never overwritten.
        The threshold comes from slice ``z`` or from the volume (a histogram over at most
        ``max_blocks`` evenly spread dask blocks, so the volume is never loaded whole).
        Returns the threshold. :meth:`threshold_fill` does the same with more bands.
        """
        return self.threshold_fill(
            image,
            bands=(below, label),
            z=z,
            z_stop=z_stop,
            threshold_from=threshold_from,
            upper=upper,
            max_blocks=max_blocks,
        )[0]

    def threshold_fill(
        self,
        image: Any,
        *,
        bands: Sequence[int | None],
        z: int | None = None,
        z_stop: int | None = None,
        threshold_from: Literal["slice", "volume"] = "volume",
        upper: float | None = None,
        max_blocks: int = 256,
    ) -> list[float]:
        """Fill unlabeled voxels of slices ``z..z_stop-1`` by Otsu / multi-Otsu bands.

        ``bands`` gives the class of each grey-level band from dark to bright (None:
        leave that band unlabeled); two bands use Otsu's threshold, more use multi-Otsu
        (``len(bands) - 1`` thresholds). Voxels at or above ``upper`` stay unlabeled.
        Painted voxels are never overwritten. Returns the thresholds.
        """
        data, _, _ = volume_parts(image)
        if tuple(data.shape) != self.shape:
            raise ScrollsegError(
                f"image shape {tuple(data.shape)} does not match the annotation {self.shape}"
            )
        z = self.shape[0] // 2 if z is None else int(z)
        z_stop = z + 1 if z_stop is None else int(z_stop)
        if not 0 <= z < z_stop <= self.shape[0]:
            raise ScrollsegError(
                f"slices {z}..{z_stop - 1} are outside the volume (0..{self.shape[0] - 1})"
            )
        if len(bands) < 2 or all(b is None for b in bands):
            raise ScrollsegError("give a class for at least one of two or more grey-level bands")
        for cid in bands:
            if cid is not None and cid not in self.classes.ids():
                raise ScrollsegError(f"class {cid} is not in the table {self.classes.ids()}")
        if threshold_from == "slice":
            thresholds = _otsu_of(to_numpy(data[z]), len(bands))
        elif threshold_from == "volume":
            thresholds = volume_thresholds(data, len(bands), max_blocks=max_blocks)
        else:
            raise ScrollsegError(
                f"threshold_from must be 'slice' or 'volume', not {threshold_from!r}"
            )
        filled = 0
        for zi in range(z, z_stop):
            plane = to_numpy(data[zi])
            band = np.digitize(plane, thresholds, right=True)  # 0 dark .. n-1 bright
            current = self[zi]
            free = current == UNLABELED
            if upper is not None:
                free &= plane < upper
            for i, cid in enumerate(bands):
                if cid is not None:
                    current[free & (band == i)] = cid
            filled += int(free.sum() - (current[free] == UNLABELED).sum())
            self[zi] = current
        log.info(
            "threshold fill: slices %d..%d, thresholds %s, %d voxels filled",
            z,
            z_stop - 1,
            [round(t, 4) for t in thresholds],
            filled,
        )
        return thresholds


def common_classes(stores: Sequence[AnnotationStore]) -> ClassTable:
    """The class table shared by ``stores`` (names and ids must agree; colours may differ).

    Raises
    ------
    ScrollsegError
        When there is no store or two stores name their classes differently.
    """
    if not stores:
        raise ScrollsegError("add at least one (image, annotation) pair first")
    first = stores[0]
    for other in stores[1:]:
        if other.classes.names() != first.classes.names():
            raise ScrollsegError(
                f"the annotations disagree on their classes: {first.path.name} has "
                f"{first.classes.names()}, {other.path.name} has {other.classes.names()}; "
                "give them the same class table (import one table's JSON into the other)"
            )
    return first.classes


def _otsu_of(values: np.ndarray, n_bands: int = 2) -> list[float]:
    from skimage.filters import threshold_multiotsu, threshold_otsu

    if values.size == 0 or np.all(values == values.flat[0]):
        raise ScrollsegError("the image region is uniform: Otsu needs at least two grey levels")
    if n_bands == 2:
        return [float(threshold_otsu(values))]
    return [float(t) for t in threshold_multiotsu(values, classes=n_bands)]


def volume_otsu(data: Any, *, max_blocks: int = 256, bins: int = 1024) -> float:
    """Otsu threshold of a (dask or numpy) volume from a histogram of sampled blocks."""
    return volume_thresholds(data, 2, max_blocks=max_blocks, bins=bins)[0]


def volume_thresholds(
    data: Any, n_bands: int = 2, *, max_blocks: int = 256, bins: int = 1024
) -> list[float]:
    """Otsu (2 bands) or multi-Otsu thresholds of a volume from sampled blocks' histogram."""
    import dask.array as da
    from skimage.filters import threshold_multiotsu, threshold_otsu

    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
    n_blocks = arr.numblocks
    total = int(np.prod(n_blocks))
    picks = np.unique(np.linspace(0, total - 1, min(total, max_blocks)).round().astype(int))
    blocks = [arr.blocks[np.unravel_index(i, n_blocks)] for i in picks]
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        lo, hi = float(np.iinfo(arr.dtype).min), float(np.iinfo(arr.dtype).max) + 1
        bins = int(hi - lo)
    else:
        mins, maxs = compute([b.min() for b in blocks], [b.max() for b in blocks])
        lo, hi = float(min(mins)), float(max(maxs))
        if hi <= lo:
            raise ScrollsegError("the volume is uniform: Otsu needs at least two grey levels")
    hists = compute(*[da.histogram(b, bins=bins, range=(lo, hi))[0] for b in blocks])
    counts = np.sum(hists, axis=0)
    edges = np.linspace(lo, hi, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    keep = counts > 0
    if keep.sum() < n_bands:
        raise ScrollsegError(
            f"the volume has fewer than {n_bands} grey levels: too few for {n_bands} bands"
        )
    first, last = np.flatnonzero(keep)[[0, -1]]
    hist = (counts[first : last + 1], centres[first : last + 1])
    if n_bands == 2:
        return [float(threshold_otsu(hist=hist))]
    return [float(t) for t in threshold_multiotsu(hist=hist, classes=n_bands)]


def autosave_every(store: AnnotationStore, seconds: float) -> threading.Event:
    """Save ``store`` every ``seconds`` on a daemon thread; set the returned event to stop.

    Saves once more when stopped. The widget uses a Qt timer instead.
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            store.save()
        store.save()

    threading.Thread(target=loop, name=f"autosave-{store.path.name}", daemon=True).start()
    return stop


def annotations_from_prediction(
    prediction: str | Path,
    store: AnnotationStore | str | Path,
    *,
    box: Any = None,
    slab: int | None = None,
) -> AnnotationStore:
    """Copy a ``scrollseg predict`` output's labels (or a box of them) into an annotation store.

    The prediction is in the annotation's class ids (``1..K``), so it becomes a starting
    annotation to correct and train on again. ``store`` is an :class:`AnnotationStore`
    or a path; a path that does not exist yet is created with the prediction's shape,
    spacing, origin and classes. An existing store must have the same shape and class
    names. ``box`` is a tuple of slices (default: everything). The copy goes slab by slab
    of ``slab`` z-planes (default: the store's chunk depth), saved as it goes, so memory
    stays bounded. Returns the store, saved.
    """
    from napari_scrollseg.engine.omezarr import read_label_metadata
    from napari_scrollseg.engine.volumes import open_volume

    vol = open_volume(prediction)
    if "prediction" not in vol.labels:
        raise ScrollsegError(
            f"{prediction} has no labels/prediction: give a `scrollseg predict` output"
        )
    labels = vol.labels["prediction"][0]
    names, colors = read_label_metadata(Path(prediction) / "labels" / "prediction")
    if not names:
        raise ScrollsegError(
            f"{prediction} records no class names: predict it again with scrollseg"
        )
    classes = ClassTable(
        [
            LabelClass(v, n, tuple(colors.get(v, palette_color(v))[:3]))  # type: ignore[arg-type]
            for v, n in sorted(names.items())
        ]
    )
    if not isinstance(store, AnnotationStore):
        if Path(store).exists():
            store = AnnotationStore.open(store)
        else:
            store = AnnotationStore.create(
                store,
                shape=labels.shape,
                spacing=vol.spacing,
                origin=vol.origin,
                classes=classes,
                chunks=tuple(int(c[0]) for c in labels.chunks),
                dtype="uint8" if len(classes) < 255 else "uint16",
            )
    if store.shape != tuple(labels.shape):
        raise ScrollsegError(
            f"the annotation has shape {store.shape} but the prediction {tuple(labels.shape)}; "
            "predict the whole image the annotation belongs to"
        )
    if store.classes.names()[: len(classes)] != classes.names():
        raise ScrollsegError(
            f"the prediction's classes {classes.names()} are not the annotation's "
            f"{store.classes.names()}: use a model trained on this annotation's classes"
        )
    box, _ = _normalize_box(box if box is not None else (), store.shape)
    step = slab or store.chunks[0]
    for z in range(box[0].start, box[0].stop, step):
        part = (slice(z, min(z + step, box[0].stop)), *box[1:])
        store[part] = to_numpy(labels[part])
        store.save()
    return store
