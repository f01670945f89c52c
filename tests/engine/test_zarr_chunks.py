"""Whole zarr v2 chunks read and written in the calling thread agree with zarr itself."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from numcodecs import Blosc, Delta, Zstd

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.volumes import read_block
from napari_scrollseg.engine.zarr_chunks import raw_chunks, read_box, write_box

SHAPE = (2, 37, 50, 41)  # not a multiple of the chunks: edge chunks
CHUNKS = (2, 16, 16, 16)


def _array(path, dtype, compressor, separator="/", fill=0, zarr_format=2, shape=SHAPE):
    kw = {"chunk_key_encoding": {"name": "v2", "separator": separator}}
    if zarr_format == 2:
        kw["compressors"] = compressor
    return zarr.create_array(
        str(path),
        shape=shape,
        chunks=CHUNKS,
        dtype=dtype,
        fill_value=fill,
        zarr_format=zarr_format,
        **kw,
    )


def _data(dtype, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


@pytest.mark.parametrize(
    ("dtype", "compressor", "separator"),
    [
        ("uint8", Zstd(level=1), "/"),
        ("uint16", Blosc("zstd", 1, Blosc.SHUFFLE), "."),
        (">i2", None, "/"),  # big-endian on disk
        ("float32", Blosc("lz4", 5, Blosc.NOSHUFFLE), "."),
    ],
)
def test_chunks_written_here_read_back_through_zarr_and_the_other_way(
    tmp_path, dtype, compressor, separator
):
    data = _data(np.dtype(dtype).newbyteorder("="))
    ours = _array(tmp_path / "ours.zarr", dtype, compressor, separator)
    assert raw_chunks(ours) is not None
    write_box(ours, tuple(slice(0, n) for n in SHAPE), data)  # every chunk, edges too
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours.zarr"))[:], data)

    theirs = _array(tmp_path / "theirs.zarr", dtype, compressor, separator)
    theirs[:] = data
    box = (slice(0, 2), slice(5, 37), slice(3, 50), slice(16, 33))  # any box: not aligned
    np.testing.assert_array_equal(read_box(theirs, box), data[box])
    np.testing.assert_array_equal(read_box(theirs, (slice(None),) * 4), data)  # not plain


def test_unwritten_chunks_read_as_the_fill_value_and_edge_chunks_hold_it(tmp_path):
    arr = _array(tmp_path / "a.zarr", "uint8", Zstd(level=1), fill=7)
    piece = np.full((2, 5, 16, 9), 200, np.uint8)  # the last chunk along y and x: an edge
    box = (slice(0, 2), slice(32, 37), slice(32, 48), slice(32, 41))
    write_box(arr, box, piece)
    expected = np.full(SHAPE, 7, np.uint8)
    expected[box] = 200
    np.testing.assert_array_equal(
        read_box(arr, (slice(0, 2), *(slice(0, n) for n in SHAPE[1:]))), expected
    )
    np.testing.assert_array_equal(arr[:], expected)
    raw = raw_chunks(arr)
    stored = raw.read((0, 2, 2, 2))  # full chunk size on disk, the fill value past the edge
    assert stored.shape == CHUNKS
    assert (stored[:, 5:] == 7).all()
    assert (stored[:, :, :, 9:] == 7).all()


def test_boxes_that_are_not_whole_chunks_and_other_arrays_go_through_zarr(tmp_path):
    arr = _array(tmp_path / "a.zarr", "uint8", Zstd(level=1))
    box = (slice(0, 2), slice(3, 20), slice(0, 16), slice(0, 16))  # starts inside a chunk
    data = _data(np.uint8, (2, 17, 16, 16))
    write_box(arr, box, data)
    np.testing.assert_array_equal(arr[box], data)
    assert (arr[:, :3] == 0).all()  # the rest of the chunk kept

    v3 = _array(tmp_path / "v3.zarr", "uint8", None, zarr_format=3)
    assert raw_chunks(v3) is None
    whole = _data(np.uint8)
    write_box(v3, tuple(slice(0, n) for n in SHAPE), whole)
    np.testing.assert_array_equal(
        read_box(v3, (slice(0, 2), slice(1, 9), slice(0, 50), slice(3, 4))), whole[:, 1:9, :, 3:4]
    )

    filtered = zarr.create_array(
        str(tmp_path / "f.zarr"),
        shape=(8,),
        chunks=(4,),
        dtype="uint8",
        zarr_format=2,
        filters=[Delta(dtype="uint8")],
    )
    assert raw_chunks(filtered) is None


def test_a_damaged_chunk_is_one_clear_error(tmp_path):
    arr = _array(tmp_path / "a.zarr", "uint8", Zstd(level=1))
    write_box(arr, tuple(slice(0, n) for n in SHAPE), _data(np.uint8))
    raw_chunks(arr).path((0, 1, 1, 1)).write_bytes(b"not zstd")
    with pytest.raises(ScrollsegError, match="damaged or unreachable"):
        read_block(arr, (slice(0, 2), slice(16, 32), slice(16, 32), slice(16, 32)), "a.zarr")
