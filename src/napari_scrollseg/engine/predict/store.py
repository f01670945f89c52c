"""The prediction output store: location checks, provenance and resume, creation, the run
lock, done markers and partial sums (the pyramid: :mod:`.pyramid`).

An output is an OME-Zarr (probabilities, ``labels/prediction``) with its provenance in
the ``scrollseg`` attributes; ``OUT.zarr/.scrollseg/`` holds the run's state: ``done/<chunk>``
markers (empty files, written to a temporary name then renamed), ``partial/<block>.npz``
partial sums and a ``lock`` file that keeps two live runs off one output.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.safe_write import check_not_locked

if TYPE_CHECKING:
    from napari_scrollseg.engine.model import LoadedModel

log = logging.getLogger(__name__)

STATE_DIR = ".scrollseg"
LABELS_NAME = "prediction"


def key(index: Sequence[int]) -> str:
    """A chunk's or block's index as a file name: ``"1_0_2"``."""
    return "_".join(str(i) for i in index)


def marker_path(state: Path, index: Sequence[int]) -> Path:
    """The done marker of an output chunk."""
    return state / "done" / key(index)


def partial_path(state: Path, index: Sequence[int]) -> Path:
    """The partial sums file of a block (its pieces, by reading chunk)."""
    return state / "partial" / f"{key(index)}.npz"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def scrollseg_info(out: Path) -> dict | None:
    """The ``scrollseg`` attributes of an existing prediction output, else None."""
    try:
        attrs = json.loads((out / ".zattrs").read_text())
    except (OSError, ValueError):
        return None
    info = attrs.get("scrollseg") if isinstance(attrs, dict) else None
    return info if isinstance(info, dict) and info.get("kind") == "prediction" else None


def check_location(out: Path) -> None:
    """Refuse an output path that is a file, holds something else, or cannot be written."""
    for p in [out.parent, *out.parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise ScrollsegError(f"cannot write {out}: {p} is a file, not a folder")
            break
    if out.exists():
        if not out.is_dir():
            raise ScrollsegError(f"{out} is a file; choose another output path (nothing changed)")
        if scrollseg_info(out) is None and any(out.iterdir()):
            raise ScrollsegError(
                f"{out} holds something that is not a scrollseg prediction; choose another "
                "output path (scrollseg never replaces it, even with --overwrite)"
            )
        probe_dir, made = out, False
    else:
        probe_dir, made = out, True
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        probe = probe_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ScrollsegError(
            f"cannot write to {out} ({exc.strerror or exc}); choose a writable output location"
        ) from None
    finally:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()


def check_resume(
    out: Path, config_hash: str, overwrite: bool, legacy_hashes: Sequence[str] = ()
) -> bool:
    """True when ``out`` holds an unfinished or finished run of the same configuration
    (``legacy_hashes``: the same configuration as older versions hashed it)."""
    info = scrollseg_info(out)
    if info is None:
        return False
    if overwrite:
        check_not_locked(out / STATE_DIR)  # never delete a live run's output
        log.info("replacing %s (--overwrite)", out)
        shutil.rmtree(out)
        return False
    if info.get("config_hash") not in (config_hash, *legacy_hashes):
        raise ScrollsegError(
            f"{out} holds a prediction made with another model or other arguments; "
            "pass --overwrite to replace it or choose another output path"
        )
    if not (out / "labels" / LABELS_NAME / "0" / ".zarray").is_file():
        log.info("%s was interrupted while being created: creating it again", out)
        return False
    return True


def create_output(
    out: Path,
    *,
    model: LoadedModel,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    spacing: Sequence[float],
    origin: Sequence[float],
    attrs: dict,
) -> None:
    from napari_scrollseg.engine.annotations import ClassTable
    from napari_scrollseg.engine.omezarr import create_image, create_labels

    n_levels = None
    table = ClassTable.from_dataset_json(model.dataset_json)
    omero = {  # names the probability channels (nnU-Net label k-1 = class k)
        "channels": [
            {
                "label": c.name,
                "color": "{:02X}{:02X}{:02X}".format(*c.color),
                "window": {"min": 0, "max": 255, "start": 0, "end": 255},
                "active": c.id == len(table),
            }
            for c in table.classes
        ]
    }
    create_image(
        out,
        shape=(model.n_classes, *shape),
        dtype="uint8",
        chunks=(model.n_classes, *chunks),
        spacing=spacing,
        origin=origin,
        axes="czyx",
        n_levels=n_levels,
        name="probabilities",
        attrs={"scrollseg": attrs, "omero": omero},
        overwrite=True,
    )
    create_labels(
        out,
        LABELS_NAME,
        names={c.id: c.name for c in table.classes},
        colors={c.id: (*c.color, 255) for c in table.classes},
        shape=shape,
        dtype="uint8" if model.n_classes < 255 else "uint16",
        chunks=chunks,
        spacing=spacing,
        origin=origin,
        axes="zyx",
        n_levels=n_levels,
    )


def write_attrs(out: Path, info: dict) -> None:
    import zarr

    group = zarr.open_group(str(out), mode="r+")
    group.attrs["scrollseg"] = info


def atomic_touch(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(b"")
    os.replace(tmp, path)


@functools.lru_cache(maxsize=16)
def output_array(path: str, run: str, write_empty_chunks: bool) -> Any:
    """The output level-0 array at ``path``, opened once per process and run.

    ``run`` keeps an array recreated by another run (``overwrite``) from being served
    with stale metadata. ``write_empty_chunks`` skips zarr's per-chunk comparison with
    the fill value (for probabilities, whose chunks are never all zero).
    """
    import zarr

    arr = zarr.open_array(path, mode="r+")
    return arr.with_config({"write_empty_chunks": True}) if write_empty_chunks else arr
