"""Whole chunks of local zarr v2 arrays, read and written in the calling thread.

zarr-python 3 sends every read and write through its asyncio loop thread, its codec
pipeline and, for writes, a comparison with the fill value: on a 64^3 uint8 chunk that
cost 4-9 ms per write and 2 ms per read against 0.5 and 0.25 ms for the same Zstd
encode / decode and file access done here (``benchmarks/pipeline_ceiling.py``). A
whole-volume run writes every output chunk once and the pyramid reads it back, so this
is most of the host's time next to a GPU.

The format is zarr v2's, nothing more: a chunk is its C-order bytes through the array's
compressor (no filters), stored at the array's chunk key, full-size at the edges (the part
outside the array holds the fill value) and absent where never written (it reads as the
fill value). A chunk is written to a temporary name, then renamed, as zarr's
``LocalStore`` does. Any other array (zarr v3, filters, F order, a remote store, a box
that is not made of whole chunks) goes through zarr itself.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_scrollseg.engine.tiling import tile_overlap

__all__ = ["RawChunks", "raw_chunks", "read_box", "write_box"]

Box = tuple[slice, ...]


@dataclass(frozen=True)
class RawChunks:
    """A local zarr v2 array's chunks as files."""

    root: Path  # the array's folder
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    compressor: Any  # a numcodecs codec, or None
    metadata: Any  # zarr's ArrayV2Metadata: encodes the chunk keys

    def path(self, index: Sequence[int]) -> Path:
        return self.root / self.metadata.encode_chunk_key(tuple(int(i) for i in index))

    def read(self, index: Sequence[int]) -> np.ndarray:
        """The whole chunk at ``index`` (chunk shape, edges included); the fill value
        where it was never written."""
        try:
            raw = self.path(index).read_bytes()
        except FileNotFoundError:
            return np.full(self.chunks, self.fill_value, self.dtype)
        if self.compressor is not None:
            raw = self.compressor.decode(raw)
        return np.frombuffer(raw, self.dtype).reshape(self.chunks)

    def write(self, index: Sequence[int], data: np.ndarray) -> None:
        """Write chunk ``index``: ``data`` is its part inside the array."""
        if tuple(data.shape) != self.chunks:  # an edge chunk is stored full-size
            full = np.full(self.chunks, self.fill_value, self.dtype)
            full[tuple(slice(0, n) for n in data.shape)] = data
            data = full
        raw = np.ascontiguousarray(data, dtype=self.dtype)
        encoded = raw if self.compressor is None else self.compressor.encode(raw)
        path = self.path(index)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            tmp.write_bytes(encoded)
        except FileNotFoundError:  # the first chunk of its folder ("/" separator)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(encoded)
        os.replace(tmp, path)


def raw_chunks(arr: Any) -> RawChunks | None:
    """:class:`RawChunks` of a zarr array this module can read and write directly (local,
    zarr v2, no filters, C order, a plain numeric dtype), else None."""
    try:
        from zarr.core.metadata.v2 import ArrayV2Metadata
        from zarr.storage import LocalStore

        meta = arr.metadata
        store_path = arr.store_path
    except (AttributeError, ImportError):
        return None
    if not isinstance(meta, ArrayV2Metadata) or not isinstance(store_path.store, LocalStore):
        return None
    if meta.filters or meta.order != "C":
        return None
    try:
        dtype = np.dtype(meta.dtype.to_native_dtype())
    except (AttributeError, TypeError):
        return None
    if dtype.kind not in "biuf" or meta.fill_value is None:
        return None
    return RawChunks(
        root=Path(store_path.store.root) / store_path.path,
        shape=tuple(int(s) for s in arr.shape),
        chunks=tuple(int(c) for c in meta.chunks),
        dtype=dtype,
        fill_value=dtype.type(meta.fill_value),
        compressor=meta.compressor,
        metadata=meta,
    )


def _chunk_range(box: Box, raw: RawChunks, *, whole: bool) -> list[range] | None:
    """The chunk indices of ``box`` per axis; with ``whole``, None unless the box is made
    of whole chunks (edge chunks end at the array's edge)."""
    ranges = []
    for b, c, n in zip(box, raw.chunks, raw.shape):
        start, stop = b.start, b.stop
        if b.step not in (None, 1) or not 0 <= start < stop <= n:
            return None
        if whole and (start % c or (stop % c and stop != n)):
            return None
        ranges.append(range(start // c, (stop - 1) // c + 1))
    return ranges


def _plain(box: Any, ndim: int) -> Box | None:
    if not isinstance(box, tuple) or len(box) != ndim:
        return None
    if not all(isinstance(b, slice) and b.start is not None and b.stop is not None for b in box):
        return None
    return box


def write_box(arr: Any, box: Box, data: np.ndarray) -> None:
    """``arr[box] = data``: chunk by chunk in this thread when ``box`` is made of whole
    chunks of a :func:`raw_chunks` array, else through zarr."""
    raw = raw_chunks(arr)
    plain = _plain(box, len(arr.shape)) if raw is not None else None
    ranges = _chunk_range(plain, raw, whole=True) if plain is not None else None
    if ranges is None or tuple(data.shape) != tuple(b.stop - b.start for b in box):
        arr[box] = data
        return
    for index in itertools.product(*ranges):
        _, part = tile_overlap([i * c for i, c in zip(index, raw.chunks)], raw.chunks, box)
        raw.write(index, data[part])


def read_box(arr: Any, box: Any) -> np.ndarray:
    """``arr[box]`` as numpy: chunk by chunk in this thread for a :func:`raw_chunks`
    array and a box of plain slices, else through ``arr`` itself (zarr, dask, ...)."""
    from napari_scrollseg.engine.dask_compute import to_numpy

    raw = raw_chunks(arr)
    plain = _plain(box, len(arr.shape)) if raw is not None else None
    ranges = _chunk_range(plain, raw, whole=False) if plain is not None else None
    if ranges is None:
        return to_numpy(arr[box])
    out = np.empty(tuple(b.stop - b.start for b in plain), raw.dtype)
    for index in itertools.product(*ranges):
        src, dst = tile_overlap([i * c for i, c in zip(index, raw.chunks)], raw.chunks, plain)
        out[dst] = raw.read(index)[src]
    return out
