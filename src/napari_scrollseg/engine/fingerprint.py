"""Fingerprints of a prediction's input and model, so a resume never mixes two of them.

A prediction records both in its provenance; resuming it refuses when either differs
(:func:`check_resume_fingerprints`).

- :func:`input_fingerprint` is cheap on a huge volume: the metadata (shape, dtype,
  chunks, spacing, origin, attributes), the listing of the files that hold it (names
  and sizes; local sources only, without ``labels/``), their modification times (kept
  apart: a copy of the scan changes only those) and the sha256 of a fixed sample of
  its chunks (spread over the volume, at most :data:`SAMPLES`).
- :func:`model_fingerprint`: the sha256 of each checkpoint file used, of plans.json
  and of dataset.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from napari_scrollseg.engine.dask_compute import to_numpy
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.volumes import URL_PATTERN

log = logging.getLogger(__name__)

VERSION = 2  # 2: modification times apart from the listing
SAMPLES = 16
LISTING_LIMIT_S = 120.0


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _local_root(source: str) -> Path | None:
    """The file or folder a local source lives in (an HDF5 ``file.h5:/ds`` is its file)."""
    if not source or URL_PATTERN.match(source):
        return None
    p = Path(source).expanduser()
    if not p.exists() and ":" in source:
        p = Path(source.rsplit(":", 1)[0]).expanduser()
    return p if p.exists() else None


def _listing(root: Path, limit_s: float = LISTING_LIMIT_S) -> tuple[str, str] | None:
    """sha256 of ``relative path, size`` and of ``relative path, mtime_ns`` of every file
    under ``root`` (sorted), or None when the listing takes over ``limit_s``."""
    if root.is_file():
        st = root.stat()
        return _sha(f"{root.name}\t{st.st_size}"), _sha(f"{root.name}\t{st.st_mtime_ns}")
    sizes: list[str] = []
    times: list[str] = []
    deadline = time.monotonic() + limit_s
    stack = [root]
    while stack:
        if time.monotonic() > deadline:
            log.warning("listing %s took over %.0f s: fingerprint without it", root, limit_s)
            return None
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                if folder == root and e.name == "labels":
                    continue  # label images added to the scan do not change the image
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    rel = Path(e.path).relative_to(root).as_posix()
                    sizes.append(f"{rel}\t{st.st_size}")
                    times.append(f"{rel}\t{st.st_mtime_ns}")
    return _sha("\n".join(sorted(sizes))), _sha("\n".join(sorted(times)))


def _samples(data: Any, n: int = SAMPLES) -> str:
    """sha256 over ``n`` chunks of a dask array spread evenly over its chunk grid."""
    from napari_scrollseg.engine.volumes import direct_array

    total = int(np.prod(data.numblocks))
    picks = sorted({int(i) for i in np.linspace(0, total - 1, min(n, total))})
    direct = direct_array(data)  # zarr under the dask array: no graph per chunk
    h = hashlib.sha256()
    for flat in picks:
        idx = [int(i) for i in np.unravel_index(flat, data.numblocks)]
        if direct is not None:
            box = tuple(slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(data.chunks, idx))
            block = np.ascontiguousarray(direct[box])
        else:
            block = np.ascontiguousarray(to_numpy(data.blocks[tuple(idx)]))
        h.update(f"{flat}:{block.shape}:{block.dtype}:".encode())
        h.update(hashlib.sha256(block.tobytes()).digest())
    return h.hexdigest()


def input_fingerprint(volume: Any) -> dict:
    """The fingerprint of an opened Volume (see the module docstring)."""
    data = volume.data
    meta = {
        "shape": [int(s) for s in data.shape],
        "dtype": str(data.dtype),
        "chunks": [int(c) for c in data.chunksize],
        "spacing": [float(s) for s in volume.spacing],
        "origin": [float(o) for o in getattr(volume, "origin", (0.0, 0.0, 0.0))],
        "attrs": getattr(volume, "attrs", {}),
    }
    root = _local_root(str(getattr(volume, "source", "")))
    listing = _listing(root) if root is not None else None
    return {
        "version": VERSION,
        "metadata": _sha(json.dumps(meta, sort_keys=True, default=str)),
        "listing": listing[0] if listing else None,
        "mtimes": listing[1] if listing else None,
        "samples": _samples(data),
    }


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(folder: str | os.PathLike, checkpoints: list[Path] | None = None) -> dict:
    """sha256 of each checkpoint (relative path -> hash), of plans.json and dataset.json."""
    folder = Path(folder)
    files = checkpoints if checkpoints is not None else sorted(folder.glob("fold_*/*.pth"))
    return {
        "version": VERSION,
        "checkpoints": {
            Path(f).relative_to(folder).as_posix(): _file_sha(Path(f)) for f in sorted(files)
        },
        "plans": _file_sha(folder / "plans.json"),
        "dataset_json": _file_sha(folder / "dataset.json"),
    }


def loaded_model_fingerprint(model: Any) -> dict:
    """:func:`model_fingerprint` of the checkpoints a LoadedModel ensembles."""
    folder = Path(model.folder)
    files = [
        folder / ("fold_all" if f == "all" else f"fold_{f}") / model.checkpoint for f in model.folds
    ]
    return model_fingerprint(folder, files)


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two ``{"input": ..., "model": ...}`` records, in words."""
    words = {
        ("input", "metadata"): "the input's metadata (shape, dtype, chunks, spacing, attributes)",
        ("input", "listing"): "the input's files (names or sizes)",
        ("input", "samples"): "the input's voxels (sampled chunks)",
        ("model", "checkpoints"): "the model's checkpoints",
        ("model", "plans"): "the model's plans.json",
        ("model", "dataset_json"): "the model's dataset.json",
    }
    out = []
    for (part, key), text in words.items():
        a, b = (old.get(part) or {}), (new.get(part) or {})
        if a.get("version") != b.get("version"):
            continue  # recorded by another fingerprint version: not comparable
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            out.append(text)
    return out


def check_resume_fingerprints(out: Path, recorded: dict | None, now: dict) -> None:
    """Refuse to resume ``out`` when its recorded fingerprints differ from ``now``."""
    if not recorded:
        return  # a run of an older version: nothing to compare
    changed = differences(recorded, now)
    old, new = recorded.get("input") or {}, now.get("input") or {}
    if (
        not changed
        and old.get("version") == new.get("version")
        and None not in (old.get("mtimes"), new.get("mtimes"))
        and old["mtimes"] != new["mtimes"]
    ):
        log.warning(
            "%s: the input's files have new modification times (copied or touched?) but the "
            "same names, sizes, metadata and sampled voxels: resuming",
            out,
        )
    if changed:
        raise ScrollsegError(
            f"{out} was started on other data: {'; '.join(changed)} changed since; resuming "
            "would mix both. Pass --overwrite to start again, or choose another output path"
        )
