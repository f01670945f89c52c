"""Export sparse annotations as an nnU-Net v2 raw dataset, append cases, verify.

Layout written (nnU-Net's ``Dataset<ID>_<Name>`` raw format)::

    Dataset<ID>_<Name>/
        dataset.json
        imagesTr/<case>_0000<ending>   (+ <case>.json spacing sidecar for .tif)
        labelsTr/<case><ending>        (+ <case>.json spacing sidecar for .tif)

Rules (DESIGN.md "Annotation", SEEDS.md "Export to nnU-Net"):

- each case is cropped to the bounding box of its class voxels (``1..K``) plus
  ``margin`` voxels per side, clipped to the volume (default :data:`DEFAULT_MARGIN`,
  half of a 64^3 patch);
- label ``0`` (unlabeled) and the ignore value (largest value of the label dtype)
  both become nnU-Net's ignore label ``K``; class ``k`` becomes ``k - 1``, so class 1
  is nnU-Net's ``background`` (nnU-Net requires that name for label 0; the original
  class names are kept in ``dataset.json["scrollseg"]["classes"]``);
- the image dtype is kept unless normalization is applied on export
  (:data:`NORMS`); the spacing goes into ``.json`` sidecars (``.tif``, read by
  nnU-Net's ``Tiff3DIO``, which ``dataset.json`` names explicitly) or the NIfTI
  header (``.nii.gz``);
- crops are streamed slab by slab (one source z-chunk at a time), never loaded whole;
- everything (for ``append``, the whole dataset: hard links of its files plus the new
  cases) is written into a hidden folder beside the target and swapped in only when
  complete, so an error or a kill leaves the old dataset or the new one, and the next
  export tidies what a killed one left (:mod:`~napari_scrollseg.engine.safe_write`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.annotations import ClassTable, _writable, ignore_value
from napari_scrollseg.engine.dask_compute import compute, to_numpy
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.safe_write import partial_dir, swap_in, tidy
from napari_scrollseg.engine.volumes import as_czyx, volume_parts

if TYPE_CHECKING:
    import dask.array as da

    from napari_scrollseg.engine.config import ExportConfig


log = logging.getLogger(__name__)

DEFAULT_MARGIN = 32  # voxels per side: half of a 64^3 patch (the built-in model's size)
ENDINGS = (".tif", ".nii.gz")
# norm -> channel name written to dataset.json; CT / zscore are nnU-Net's own schemes,
# the others are applied on export and written as float32 with channel "noNorm"
NORMS = {
    "CT": "CT",
    "zscore": "zscore",
    "noNorm": "noNorm",
    "rescale_to_0_1": "noNorm",
    "rgb_to_0_1": "noNorm",
}
READERS = {".tif": "Tiff3DIO", ".nii.gz": "SimpleITKIO"}
MIN_FOLDS_WARNING = 5
_SLAB_BYTES = 256 * 2**20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


@dataclass(frozen=True)
class ExportProgress:
    """One step of an export: ``done`` of ``total`` slabs of case ``index`` written."""

    case: str
    index: int
    n_cases: int
    done: int
    total: int


@dataclass
class _Case:
    image: da.Array  # (c, z, y, x)
    labels: Any  # AnnotationStore or dask array (z, y, x)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    image_source: str
    labels_source: str
    crop: tuple[slice, slice, slice] = ()  # type: ignore[assignment]
    norm_params: dict[str, float] = field(default_factory=dict)


# -- public API ---------------------------------------------------------------------------
def dataset_dir_name(dataset_id: int, name: str) -> str:
    """``Dataset<ID:03d>_<name>``, as nnU-Net names raw dataset folders."""
    return f"Dataset{int(dataset_id):03d}_{name}"


def planned_case_count(
    out_dir: str | Path, dataset_id: int, name: str, n_new: int, *, append: bool
) -> int:
    """How many cases the dataset will hold after exporting ``n_new`` (appended or not).

    Compare with :data:`MIN_FOLDS_WARNING` to warn before exporting, as the CLI does.
    """
    target = Path(out_dir) / dataset_dir_name(dataset_id, name)
    if not append or not (target / "dataset.json").is_file():
        return n_new
    try:
        ending = json.loads((target / "dataset.json").read_text())["file_ending"]
    except (OSError, ValueError, KeyError):
        return n_new
    return n_new + len(_identifiers(target, ending))


def export_dataset(
    cases: Sequence[tuple[Any, Any]],
    config: ExportConfig | None = None,
    *,
    on_case: Callable[[int, str], None] | None = None,
    **options: Any,
) -> Path:
    """Export ``(image, labels)`` pairs as the nnU-Net raw dataset ``Dataset<ID>_<name>``.

    Parameters
    ----------
    config, options
        An :class:`~napari_scrollseg.engine.config.ExportConfig` and/or its fields as
        keywords (validated there; documented here).
    cases
        Pairs ``(image, labels)``. ``image``: a Volume, a path :func:`open_volume` reads,
        or an array ``(z, y, x)`` / ``(c, z, y, x)``. ``labels``: an
        :class:`~napari_scrollseg.engine.annotations.AnnotationStore`, a Volume, a path
        (annotation store or volume) or an integer array, ``0`` unlabeled, ``1..K``
        classes, ignore = the dtype's largest value.
    out_dir
        The nnU-Net raw folder (``nnUNet_raw``) that receives the dataset folder.
    dataset_id, name
        nnU-Net dataset ID (1..999) and name (letters, digits, ``-``).
    classes
        Class table or class names for ids ``1..K`` (K >= 2; class 1 is background).
    margin
        Voxels added around the annotated box per side (int or ``(z, y, x)``);
        default :data:`DEFAULT_MARGIN`.
    norm
        One of :data:`NORMS`: ``CT``/``zscore`` leave normalization to nnU-Net;
        ``noNorm`` writes the values as they are; ``rescale_to_0_1`` (min/max of the
        whole source image) and ``rgb_to_0_1`` (x/255) are applied here (float32).
    ending
        ``.tif`` (default) or ``.nii.gz``.
    append
        Add the cases to an existing dataset of the same name, continuing its numbering.
    folds
        Cross-validation folds you will train; fewer cases in total is an error. When
        None, fewer than 5 cases only logs a warning (nnU-Net's default is 5 folds).
    on_case
        Called as ``on_case(index, case_name)`` after each case is written.
    ignore_spacing
        Export even when an image's and its labels' recorded spacings differ (the
        image's is used). Default: refuse.

    Returns
    -------
    Path
        ``out_dir / "Dataset<ID>_<name>"``.
    """
    from napari_scrollseg.engine.config import ExportConfig
    from napari_scrollseg.engine.progress import drive

    if config is None:
        config = ExportConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)

    def case_done(event: ExportProgress) -> None:
        if on_case is not None and event.done == event.total:
            on_case(event.index, event.case)

    return drive(iter_export_dataset(cases, **config.kwargs()), case_done)


def iter_export_dataset(
    cases: Sequence[tuple[Any, Any]],
    *,
    out_dir: str | Path,
    dataset_id: int,
    name: str,
    classes: ClassTable | Sequence[str],
    margin: int | Sequence[int] | None = None,
    norm: str = "CT",
    ending: str = ".tif",
    append: bool = False,
    folds: int | None = None,
    ignore_spacing: bool = False,
) -> Generator[ExportProgress, None, Path]:
    """:func:`export_dataset` as a generator yielding one :class:`ExportProgress` per slab.

    The dataset path is the generator's return value. Closing the generator early
    leaves nothing behind.
    """
    table = classes if isinstance(classes, ClassTable) else ClassTable.from_names(classes)
    _check_options(table, dataset_id=dataset_id, name=name, norm=norm, ending=ending)
    margins = _margins(margin)
    out_dir = Path(out_dir)
    target = out_dir / dataset_dir_name(dataset_id, name)
    tidy(target)  # what a killed export left: the old dataset back, stale partials gone
    existing = _check_target(out_dir, target, dataset_id=dataset_id, append=append)
    old_json = _load_existing(target, table, norm=norm, ending=ending) if existing else None
    if not cases:
        raise ScrollsegError("give at least one (image, labels) pair to export")

    prepared = [
        _prepare(i, img, lab, table, ignore_spacing=ignore_spacing)
        for i, (img, lab) in enumerate(cases)
    ]
    n_channels = _check_channels(prepared, old_json)
    n_old = old_json["numTraining"] if old_json else 0
    n_total = n_old + len(prepared)
    if folds is not None and n_total < folds:
        raise ScrollsegError(
            f"{folds}-fold cross-validation needs at least {folds} cases, the dataset would "
            f"have {n_total}; annotate more volumes (or crops) or train fewer folds"
        )
    if folds is None and n_total < MIN_FOLDS_WARNING:
        log.warning(
            "the dataset has %d case(s): nnU-Net's default 5-fold cross-validation needs at "
            "least 5; train fold 'all' or add cases",
            n_total,
        )
    for case in prepared:
        case.crop = _crop_box(case.crop, margins, case.image.shape[1:])
        if norm == "rescale_to_0_1":
            case.norm_params = _minmax(case.image)

    start = _next_index(target, name) if existing else 0
    names = [f"{name}_{start + i:03d}" for i in range(len(prepared))]
    tmp = _partial(out_dir, target)
    try:
        if existing:  # the new state is the whole dataset: hard links of what is there
            shutil.copytree(target, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        (tmp / "imagesTr").mkdir(exist_ok=True)
        (tmp / "labelsTr").mkdir(exist_ok=True)
        for i, (case, cname) in enumerate(zip(prepared, names)):
            yield from _write_case(tmp, cname, case, i, len(prepared), table, norm, ending)
        record = {
            cname: {
                "image": case.image_source,
                "labels": case.labels_source,
                "crop": [[s.start, s.stop] for s in case.crop],
                "spacing": list(case.spacing),
                **({"norm_params": case.norm_params} if case.norm_params else {}),
            }
            for cname, case in zip(names, prepared)
        }
        meta = _dataset_json(
            old_json,
            table,
            name=name,
            norm=norm,
            ending=ending,
            margins=margins,
            record=record,
            n_channels=n_channels,
        )
        _check_written(tmp, names, prepared, ending, n_channels=n_channels)
        meta["numTraining"] = len(_identifiers(tmp, ending))
        _write_json(tmp / "dataset.json", meta)  # replaces the link: the old file is untouched
        swap_in(tmp, target)  # a kill leaves the old dataset or the new one, never a mix
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %d case(s) to %s", len(names), target)
    return target


def verify_dataset(dataset_dir: str | Path, *, num_processes: int = 1) -> None:
    """Run nnU-Net's own ``verify_dataset_integrity`` on a raw dataset folder.

    It runs in a subprocess (nnU-Net prints its findings from worker processes);
    a failure raises :class:`ScrollsegError` with nnU-Net's message.
    """
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "dataset.json").is_file():
        raise ScrollsegError(f"{dataset_dir} has no dataset.json: export a dataset first")
    code = (
        "import sys\n"
        "from nnunetv2.experiment_planning.verify_dataset_integrity import "
        "verify_dataset_integrity\n"
        "verify_dataset_integrity(sys.argv[1], int(sys.argv[2]))\n"
    )
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.setdefault(var, str(dataset_dir.parent))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(dataset_dir), str(max(1, num_processes))],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    output = proc.stdout + proc.stderr
    log.debug("nnU-Net verify_dataset_integrity output:\n%s", output)
    if proc.returncode != 0:
        lines = [ln for ln in output.splitlines() if ln.strip()]
        keep = [ln for ln in lines if re.search(r"error|Error|assert|Expected|Found", ln)]
        message = " | ".join((keep or lines)[-6:])
        raise ScrollsegError(f"nnU-Net's integrity check rejected {dataset_dir}: {message}")


# -- checks -------------------------------------------------------------------------------
def _check_options(
    table: ClassTable, *, dataset_id: int, name: str, norm: str, ending: str
) -> None:
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise ScrollsegError(f"dataset ID must be an integer 1..999, got {dataset_id!r}")
    if not _NAME.match(name or ""):
        raise ScrollsegError(
            f"dataset name {name!r} must be letters, digits and '-' (no spaces or '_')"
        )
    if norm not in NORMS:
        raise ScrollsegError(f"unknown normalization {norm!r}; use one of {', '.join(NORMS)}")
    if ending not in ENDINGS:
        raise ScrollsegError(f"unknown file ending {ending!r}; use {' or '.join(ENDINGS)}")
    if len(table) < 2:
        raise ScrollsegError(
            "nnU-Net needs at least two classes (class 1 becomes its background): "
            f"got {table.names()}"
        )
    if "background" in table.names()[1:]:
        raise ScrollsegError(
            "only class 1 may be called 'background' (nnU-Net's name for label 0); rename it"
        )


def _margins(margin: int | Sequence[int] | None) -> tuple[int, int, int]:
    if margin is None:
        margin = DEFAULT_MARGIN
    values = (margin,) * 3 if isinstance(margin, (int, np.integer)) else tuple(margin)
    if len(values) != 3 or any(int(m) != m or m < 0 for m in values):
        raise ScrollsegError(f"margin must be one or three integers >= 0, got {margin!r}")
    return tuple(int(m) for m in values)  # type: ignore[return-value]


def _check_target(out_dir: Path, target: Path, *, dataset_id: int, append: bool) -> bool:
    """Refuse an ID used by another name, or an existing dataset without ``append``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ScrollsegError(f"{out_dir} is a file; give a folder as the nnU-Net raw folder")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not _writable(existing):
        raise ScrollsegError(f"{existing} is not writable; choose another nnU-Net raw folder")
    prefix = f"Dataset{int(dataset_id):03d}_"
    others = (
        sorted(p.name for p in out_dir.glob(prefix + "*") if p.is_dir() and p != target)
        if out_dir.is_dir()
        else []
    )
    if others:
        raise ScrollsegError(
            f"dataset ID {int(dataset_id)} is already used by {others[0]} in {out_dir}; "
            "nnU-Net finds datasets by ID, so choose another --dataset-id"
        )
    if target.exists():
        if not append:
            raise ScrollsegError(
                f"{target} already exists; append to it (append=True, --append) "
                "or choose another dataset ID"
            )
        if not (target / "dataset.json").is_file():
            raise ScrollsegError(f"{target} exists but has no dataset.json; remove it first")
        return True
    return False


def _load_existing(target: Path, table: ClassTable, *, norm: str, ending: str) -> dict:
    try:
        meta = json.loads((target / "dataset.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ScrollsegError(
            f"{target / 'dataset.json'} is not valid JSON ({exc}); restore it or export to a "
            "new dataset ID"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("scrollseg", {}), dict):
        raise ScrollsegError(f"{target / 'dataset.json'} is not a dataset.json scrollseg wrote")
    theirs = meta.get("scrollseg", {})
    if meta.get("file_ending") != ending:
        raise ScrollsegError(
            f"{target} uses file ending {meta.get('file_ending')}, not {ending}; "
            "append with the same ending"
        )
    if theirs.get("classes") != {c.name: c.id for c in table.classes}:
        raise ScrollsegError(
            f"{target} has classes {theirs.get('classes')}; append with the same class table"
        )
    if theirs.get("norm") != norm:
        raise ScrollsegError(f"{target} was exported with norm {theirs.get('norm')}, not {norm}")
    meta["numTraining"] = len(_identifiers(target, ending))
    return meta


def _identifiers(target: Path, ending: str) -> list[str]:
    suffix = "_0000" + ending
    return sorted(p.name[: -len(suffix)] for p in (target / "imagesTr").glob("*" + suffix))


def _next_index(target: Path, name: str) -> int:
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)_0000\.")
    numbers = [
        int(m.group(1)) for p in (target / "imagesTr").iterdir() if (m := pattern.match(p.name))
    ]
    return max(numbers) + 1 if numbers else 0


# -- reading the inputs -------------------------------------------------------------------
def _source_name(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    for attr in ("source", "path"):
        value = getattr(obj, attr, None)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return f"<{type(obj).__name__} {tuple(getattr(obj, 'shape', ()))}>"


def _open_image(image: Any) -> tuple[da.Array, tuple | None, tuple | None]:
    if isinstance(image, (str, os.PathLike)):
        from napari_scrollseg.engine.volumes import open_volume

        image = open_volume(image)
    data, spacing = as_czyx(image)
    return data, spacing, volume_parts(image)[2]


def _open_labels(labels: Any) -> tuple[Any, tuple | None]:
    import dask.array as da

    from napari_scrollseg.engine.annotations import AnnotationStore

    if isinstance(labels, (str, os.PathLike)):
        try:
            labels = AnnotationStore.open(labels)
        except ScrollsegError:
            from napari_scrollseg.engine.volumes import open_volume

            labels = open_volume(labels)
    if isinstance(labels, AnnotationStore):
        return labels, labels.spacing
    data, spacing, _ = volume_parts(labels)
    if not isinstance(data, da.Array):
        data = np.asarray(data)
        data = da.from_array(data, chunks=(64,) * data.ndim)
    if data.ndim != 3:
        raise ScrollsegError(f"labels must be 3D (z, y, x), got shape {tuple(data.shape)}")
    if data.dtype.kind not in "ui":
        raise ScrollsegError(f"labels must be an integer array (uint8, uint16), got {data.dtype}")
    return data, spacing


def _prepare(
    index: int, image: Any, labels: Any, table: ClassTable, *, ignore_spacing: bool = False
) -> _Case:
    from napari_scrollseg.engine.annotations import AnnotationStore

    data, spacing, origin = _open_image(image)
    lab, lab_spacing = _open_labels(labels)
    where = f"case {index} ({_source_name(image)})"
    if tuple(lab.shape) != tuple(data.shape[1:]):
        raise ScrollsegError(
            f"{where}: image shape {tuple(data.shape[1:])} and label shape {tuple(lab.shape)} "
            "differ; pair each image with the annotation made on it"
        )
    k = len(table)
    if isinstance(lab, AnnotationStore):
        if lab.classes.names()[:k] != table.names()[: len(lab.classes)]:
            log.warning(
                "%s: the annotation's classes %s differ from the export's %s; "
                "label values are exported by id",
                where,
                lab.classes.names(),
                table.names(),
            )
        ign = lab.ignore_value
        values = sorted(lab.class_counts())
        bbox = lab.annotated_bbox(classes_only=True)
    else:
        ign = ignore_value(lab.dtype)
        values, bbox = _scan_labels(lab, ign)
    bad = [v for v in values if not (0 <= v <= k or v == ign)]
    if bad:
        raise ScrollsegError(
            f"{where}: label values {bad[:10]} are outside the class table "
            f"(0 unlabeled, 1..{k} = {', '.join(table.names())}, {ign} ignore); "
            "add those classes or repaint them"
        )
    if bbox is None:
        raise ScrollsegError(
            f"{where}: no annotated voxel (only unlabeled/ignore); paint at least one "
            "class voxel before exporting"
        )
    _check_spacing(where, spacing, lab_spacing, ignore_spacing)
    spacing = spacing or lab_spacing or (1.0, 1.0, 1.0)
    return _Case(
        image=data,
        labels=lab,
        spacing=tuple(float(s) for s in spacing[-3:]),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in (origin or (0.0, 0.0, 0.0))[-3:]),  # type: ignore[arg-type]
        image_source=_source_name(image),
        labels_source=_source_name(labels),
        crop=bbox,
    )


def _check_spacing(where: str, image: Any, labels: Any, ignore: bool) -> None:
    """Refuse an image and labels whose recorded spacings differ (all ones = not recorded)."""
    known = [
        tuple(float(v) for v in s[-3:])
        for s in (image, labels)
        if s is not None and not np.allclose(s[-3:], 1.0)
    ]
    if len(known) < 2 or np.allclose(known[0], known[1], rtol=1e-3):
        return
    message = (
        f"{where}: the image's spacing {known[0]} differs from its labels' {known[1]}; "
        "pair each image with the labels made on it, fix the files' spacing, or export with "
        "--ignore-spacing (ignore_spacing=True in Python) to use the image's"
    )
    if not ignore:
        raise ScrollsegError(message)
    log.warning(message)


def _block_summary(block: np.ndarray, offset: tuple[int, ...], ign: int) -> tuple:
    values = np.unique(block)
    mask = (block != 0) & (block != ign)
    spans = []
    for ax in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        spans.append((offset[ax] + hit[0], offset[ax] + hit[-1]) if hit.size else None)
    return values, spans


def _scan_labels(lab: da.Array, ign: int) -> tuple[list[int], tuple[slice, ...] | None]:
    """Values present and bounding box of class voxels, one task per dask block."""
    import dask

    starts = [np.cumsum((0, *c[:-1])) for c in lab.chunks]
    blocks = lab.to_delayed()
    tasks = [
        dask.delayed(_block_summary)(
            blocks[idx], tuple(int(s[i]) for s, i in zip(starts, idx)), ign
        )
        for idx in np.ndindex(*lab.numblocks)
    ]
    results = compute(*tasks)
    values = sorted({int(v) for vals, _ in results for v in vals})
    lo, hi = [None] * 3, [None] * 3
    for _, spans in results:
        if spans[0] is None:
            continue
        for ax in range(3):
            a, b = spans[ax]
            lo[ax] = a if lo[ax] is None else min(lo[ax], a)
            hi[ax] = b if hi[ax] is None else max(hi[ax], b)
    if lo[0] is None:
        return values, None
    return values, tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


def _crop_box(bbox: tuple[slice, ...], margins: tuple[int, ...], shape: Sequence[int]) -> tuple:
    return tuple(
        slice(max(0, s.start - m), min(int(n), s.stop + m)) for s, m, n in zip(bbox, margins, shape)
    )


def _minmax(image: da.Array) -> dict[str, float]:

    lo, hi = compute(image.min(), image.max())
    return {"min": float(lo), "max": float(hi)}


# -- writing ------------------------------------------------------------------------------
def _slabs(case: _Case) -> list[tuple[int, int]]:
    """z ranges of the crop, aligned to the image's z-chunks, each under ``_SLAB_BYTES``."""
    zc = case.crop[0]
    edges = set(np.cumsum((0, *case.image.chunks[1])).tolist())
    plane = (case.crop[1].stop - case.crop[1].start) * (case.crop[2].stop - case.crop[2].start)
    plane *= max(case.image.dtype.itemsize, 4)
    cap = max(1, _SLAB_BYTES // max(1, plane))
    cuts = sorted({zc.start, zc.stop, *(e for e in edges if zc.start < e < zc.stop)})
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out += [(z, min(b, z + cap)) for z in range(a, b, cap)]
    return out


def _label_lut(k: int, dtype: np.dtype) -> np.ndarray:
    """Lookup table: class k -> k-1, everything else (0, ignore) -> k."""
    lut = np.full(int(np.iinfo(dtype).max) + 1, k, dtype=np.uint8 if k < 255 else np.uint16)
    lut[1 : k + 1] = np.arange(k)
    return lut


def _image_slab(case: _Case, channel: int, z0: int, z1: int, norm: str) -> np.ndarray:
    _, ys, xs = case.crop
    slab = to_numpy(case.image[channel, z0:z1, ys, xs])
    if norm == "rescale_to_0_1":
        lo, hi = case.norm_params["min"], case.norm_params["max"]
        return ((slab.astype(np.float32) - lo) / max(hi - lo, 1e-8)).astype(np.float32)
    if norm == "rgb_to_0_1":
        return (slab.astype(np.float32) / 255.0).astype(np.float32)
    return slab


def _label_slab(case: _Case, z0: int, z1: int, lut: np.ndarray | None, k: int) -> np.ndarray:
    _, ys, xs = case.crop
    lab = case.labels[slice(z0, z1), ys, xs]
    lab = to_numpy(lab)
    if lut is not None:
        return lut[lab]
    out = np.full(lab.shape, k, np.uint8 if k < 255 else np.uint16)
    cls = (lab >= 1) & (lab <= k)
    out[cls] = lab[cls] - 1
    return out


class _Abort(Exception):
    """Stops a :class:`_SlabWriter` thread part-way (the file is then discarded)."""


class _SlabWriter:
    """Write one volume file from slabs handed over by the caller, on a thread.

    The caller reads slab ``i + 1`` while slab ``i`` is compressed and written, and can
    yield progress between slabs (tifffile consumes a page iterator in one call).

    The thread always runs until it receives the end marker from :meth:`close` (or
    :meth:`abort`), even when the file writer stopped reading earlier: tifffile stops
    once it has every page, and a thread that ended then would race ``close()``. A slab
    arriving after the file is complete is an error.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: Any, **kwargs: Any) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._ended = False  # the end marker was received
        self._thread = threading.Thread(
            target=self._run, args=(path, shape, dtype), kwargs=kwargs, daemon=True
        )
        self._thread.start()

    def _pages(self) -> Iterator[np.ndarray]:
        while True:
            slab = self._queue.get()
            if slab is None:
                self._ended = True
                return
            if slab is _Abort:
                raise _Abort
            yield from slab

    def _run(self, path: Path, shape: tuple[int, ...], dtype: Any, **kwargs: Any) -> None:
        try:
            _write_volume(path, self._pages(), shape, dtype, **kwargs)
            if not self._ended:  # the file is complete: wait for the caller's end marker
                item = self._queue.get()
                if item is _Abort:
                    raise _Abort
                if item is not None:
                    raise ScrollsegError(
                        f"internal error: more slices than {path.name} holds {tuple(shape)}"
                    )
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc

    def _put(self, item: Any) -> None:
        while True:
            alive = self._thread.is_alive()  # read before _error: a dead thread set it first
            if self._error is not None or not alive:
                self._thread.join()
                raise self._error or ScrollsegError("internal error: the file writer stopped")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, slab: np.ndarray) -> None:
        """Queue the next slab (z-slices in order)."""
        self._put(slab)

    def close(self) -> None:
        """Finish the file; raise the writer's error if it had one."""
        self._put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the writer without finishing the file."""
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(_Abort, timeout=5)
            self._thread.join(timeout=30)


def _write_case(
    tmp: Path,
    cname: str,
    case: _Case,
    index: int,
    n_cases: int,
    table: ClassTable,
    norm: str,
    ending: str,
) -> Iterator[ExportProgress]:
    k = len(table)
    lab_dtype = np.dtype(case.labels.dtype)
    lut = _label_lut(k, lab_dtype) if lab_dtype.itemsize <= 2 else None
    slabs = _slabs(case)
    shape = tuple(s.stop - s.start for s in case.crop)
    n_channels = case.image.shape[0]
    total = len(slabs) * (n_channels + 1)
    geometry = {
        "spacing": case.spacing,
        "origin": tuple(o + s.start * sp for o, s, sp in zip(case.origin, case.crop, case.spacing)),
    }
    image_dtype = np.float32 if norm in ("rescale_to_0_1", "rgb_to_0_1") else case.image.dtype
    files: list[tuple[Path, Any, Callable[[int, int], np.ndarray], bool]] = [
        (
            tmp / "imagesTr" / f"{cname}_{c:04d}{ending}",
            image_dtype,
            lambda z0, z1, c=c: _image_slab(case, c, z0, z1, norm),
            False,
        )
        for c in range(n_channels)
    ]
    files.append(
        (
            tmp / "labelsTr" / f"{cname}{ending}",
            np.uint8 if k < 255 else np.uint16,
            lambda z0, z1: _label_slab(case, z0, z1, lut, k),
            True,
        )
    )
    done = 0
    for path, dtype, make, compress in files:
        writer = _SlabWriter(path, shape, dtype, compress=compress, **geometry)
        try:
            for z0, z1 in slabs:
                writer.write(make(z0, z1))
                done += 1
                yield ExportProgress(cname, index, n_cases, done, total)
            writer.close()
        finally:
            writer.abort()
    if ending == ".tif":
        sidecar = {"spacing": list(case.spacing)}
        _write_json(tmp / "imagesTr" / f"{cname}.json", sidecar)
        _write_json(tmp / "labelsTr" / f"{cname}.json", sidecar)


def _write_volume(
    path: Path,
    pages: Iterator[np.ndarray],
    shape: tuple[int, ...],
    dtype: Any,
    *,
    spacing: tuple[float, ...],
    origin: tuple[float, ...],
    compress: bool,
) -> None:
    """Write z-slices from ``pages`` as a 3D TIFF or a gzipped NIfTI, one slice at a time."""
    dtype = np.dtype(dtype)
    if path.name.endswith(".tif"):
        import tifffile

        tifffile.imwrite(
            path,
            data=(np.ascontiguousarray(p, dtype=dtype) for p in pages),
            shape=shape,
            dtype=dtype,
            photometric="minisblack",
            # tifffile 2026.3 mis-shapes compressed iterators of one-pixel-wide pages
            compression="zlib" if compress and shape[-1] > 1 else None,
        )
        return
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape[::-1])  # NIfTI axes are x, y, z; x varies fastest
    affine = np.diag([*spacing[::-1], 1.0])
    affine[:3, 3] = origin[::-1]
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")  # values as given: SimpleITK would rescale micron to mm
    header["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1 if not compress else 6) as f:
        f.write(header.binaryblock)
        f.write(b"\x00" * 4)  # no extensions
        for p in pages:
            f.write(np.ascontiguousarray(p, dtype=dtype.newbyteorder("<")).tobytes())


def _dataset_json(
    old: dict | None,
    table: ClassTable,
    *,
    name: str,
    norm: str,
    ending: str,
    margins: tuple[int, ...],
    record: dict,
    n_channels: int,
) -> dict:
    from napari_scrollseg import __version__

    k = len(table)
    if old is not None:
        meta = dict(old)
        meta["scrollseg"] = dict(meta.get("scrollseg", {}))
        cases = {**meta["scrollseg"].get("cases", {}), **record}
        meta["scrollseg"]["cases"] = cases
        return meta
    labels = {"background": 0, **{n: i for i, n in enumerate(table.names()[1:], start=1)}}
    labels["ignore"] = k
    return {
        "name": name,
        "description": "sparse annotations exported by napari-scrollseg",
        "channel_names": {str(c): NORMS[norm] for c in range(n_channels)},
        "labels": labels,
        "numTraining": 0,
        "file_ending": ending,
        "overwrite_image_reader_writer": READERS[ending],
        "scrollseg": {
            "version": __version__,
            "norm": norm,
            "normalization_applied": NORMS[norm] == "noNorm" and norm != "noNorm",
            "margin": list(margins),
            "classes": {c.name: c.id for c in table.classes},
            "colors": {c.name: list(c.color) for c in table.classes},
            "label_mapping": "class k -> k-1; unlabeled (0) and ignore (dtype max) -> ignore",
            "cases": record,
        },
    }


def _check_channels(cases: list[_Case], old: dict | None) -> int:
    """All cases (and the dataset appended to) have the same number of channels."""
    counts = [int(c.image.shape[0]) for c in cases]
    if old is not None:
        counts.insert(0, len(old["channel_names"]))
    if len(set(counts)) > 1:
        raise ScrollsegError(
            f"cases have {counts} channels; all images of a dataset need the same channels"
        )
    return counts[0]


def _check_written(
    tmp: Path, names: list[str], cases: list[_Case], ending: str, *, n_channels: int
) -> None:
    """Every file is there with the crop's shape (read from headers only)."""
    for cname, case in zip(names, cases):
        want = tuple(s.stop - s.start for s in case.crop)
        files = [tmp / "labelsTr" / f"{cname}{ending}"] + [
            tmp / "imagesTr" / f"{cname}_{c:04d}{ending}" for c in range(n_channels)
        ]
        for f in files:
            got = _file_shape(f)
            if got != want:
                raise ScrollsegError(f"internal error: wrote {f.name} with shape {got}, not {want}")


def _file_shape(path: Path) -> tuple[int, ...]:
    if path.name.endswith(".tif"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return tuple(int(s) for s in tf.series[0].shape)
    import nibabel as nib

    return tuple(int(s) for s in nib.load(path).shape[::-1])


def _partial(out_dir: Path, target: Path) -> Path:
    """The hidden folder the new state of ``target`` is built in (refuses an unwritable place)."""
    try:
        return partial_dir(target)
    except OSError as exc:
        raise ScrollsegError(
            f"cannot write the dataset in {out_dir} ({exc.strerror or exc}); choose a writable "
            "--out folder"
        ) from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_json(path: Path, data: dict) -> None:
    part = path.with_name(path.name + ".partial")
    part.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(part, path)
