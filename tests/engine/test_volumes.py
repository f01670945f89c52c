"""Opening volumes lazily: every supported form, values, geometry, laziness, bad input."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import logging
import os
import pickle
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from zarr.storage import LocalStore, WrapperStore

from napari_scrollseg.engine import omezarr
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.phantom import SPACING
from napari_scrollseg.engine.volumes import Volume, describe, disk_size, open_volume

AWKWARD = (7, 13, 11)


def _random(shape, dtype=np.uint16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


METADATA = (".zgroup", ".zarray", ".zattrs", ".zmetadata", "zarr.json")


class CountingStore(WrapperStore):
    """A real zarr store that counts the chunk reads going through it."""

    def __init__(self, store) -> None:
        super().__init__(store)
        self.chunk_reads: list[str] = []

    def _with_store(self, store):
        return self  # one counter for every view of the store

    async def get(self, key, prototype, byte_range=None):
        if key.rsplit("/", 1)[-1] not in METADATA:
            self.chunk_reads.append(key)
        return await self._store.get(key, prototype, byte_range)


# -- OME-Zarr -----------------------------------------------------------------------------
def test_phantom_ome_zarr_levels_geometry_labels(phantom_zarr):
    vol = open_volume(phantom_zarr)
    root = zarr.open_group(str(phantom_zarr), mode="r")
    n = omezarr.default_levels((64, 128, 128), "zyx")
    assert n >= 2
    assert vol.kind == "ome-zarr"
    assert vol.axes == "zyx"
    assert vol.source == str(phantom_zarr)
    assert [lv.shape for lv in vol.levels] == omezarr.level_shapes((64, 128, 128), "zyx", n)
    assert vol.shape == (64, 128, 128)
    assert vol.dtype == np.uint8
    assert vol.ndim == 3
    assert vol.spacing == pytest.approx(SPACING)
    assert vol.origin == (0.0, 0.0, 0.0)
    assert vol.level_spacing(1) == pytest.approx([2 * s for s in SPACING])
    assert vol.data.chunksize == root["0"].chunks
    np.testing.assert_array_equal(vol.levels[1].compute(), root["1"][:])
    assert set(vol.labels) == {"truth"}
    assert len(vol.labels["truth"]) == n
    np.testing.assert_array_equal(vol.labels["truth"][0].compute(), root["labels/truth/0"][:])
    assert "scrollseg" in vol.attrs  # the phantom's provenance
    files = [f for f in phantom_zarr.rglob("*") if f.is_file()]
    assert disk_size(phantom_zarr) == sum(f.stat().st_size for f in files)
    # the pyramid from level 1 down, with level 1's geometry (a coarse voxel's centre moves)
    coarse = open_volume(phantom_zarr, level=1)
    assert coarse.shape == vol.levels[1].shape
    assert len(coarse.levels) == n - 1
    assert coarse.spacing == pytest.approx([2 * s for s in SPACING])
    assert coarse.origin == pytest.approx([s / 2 for s in SPACING])
    with pytest.raises(ScrollsegError, match=f"levels 0..{n - 1}; level 9 does not exist"):
        open_volume(phantom_zarr, level=9)


def test_ome_zarr_v05_zarr3_written_by_hand(tmp_path):
    """NGFF v0.5: zarr format 3, metadata under attrs["ome"], axes t, c, z, y, x."""
    data = _random((1, 2, *AWKWARD), np.uint16, seed=1)
    root = zarr.open_group(str(tmp_path / "v05.zarr"), mode="w", zarr_format=3)
    axes = [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        *({"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"),
    ]
    datasets = []
    for level, arr in enumerate([data, data[:, :, ::2, ::2, ::2]]):
        f = 2**level
        root.create_array(
            str(level), data=arr, chunks=(1, 1, 4, 5, 6), dimension_names=list("tczyx")
        )
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, 1.0, 3.0 * f, 0.5 * f, 0.25 * f]},
                    {"type": "translation", "translation": [0.0, 0.0, 10.0, 20.0, 30.0]},
                ],
            }
        )
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"name": "v05", "axes": axes, "datasets": datasets}],
    }
    labels = root.create_group("labels")
    labels.attrs["ome"] = {"version": "0.5", "labels": ["cells"]}
    cells = labels.create_group("cells")
    cells.create_array("0", data=(data[0, 0] % 3).astype(np.uint8), chunks=(4, 5, 6))
    scale = [{"type": "scale", "scale": [3.0, 0.5, 0.25]}]
    cells.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {"axes": axes[2:], "datasets": [{"path": "0", "coordinateTransformations": scale}]}
        ],
    }

    vol = open_volume(tmp_path / "v05.zarr")
    assert vol.kind == "ome-zarr"
    assert vol.axes == "czyx"
    assert vol.shape == (2, *AWKWARD)
    np.testing.assert_array_equal(vol.data.compute(), data[0])
    np.testing.assert_array_equal(vol.levels[1].compute(), data[0, :, ::2, ::2, ::2])
    assert vol.spacing == (3.0, 0.5, 0.25)
    assert vol.origin == (10.0, 20.0, 30.0)
    assert vol.level_spacing(1) == (6.0, 1.0, 0.5)
    np.testing.assert_array_equal(vol.labels["cells"][0].compute(), data[0, 0] % 3)
    assert "(NGFF 0.5)" in describe(vol)


def test_bioformats2raw_layout_opens_image_0(tmp_path):
    data = _random(AWKWARD, np.uint8, seed=7)
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    omezarr.write_image(tmp_path / "b2r.zarr" / "0", data, spacing=(1.0, 2.0, 2.0), n_levels=2)
    vol = open_volume(tmp_path / "b2r.zarr")
    assert vol.kind == "ome-zarr"
    assert vol.spacing == (1.0, 2.0, 2.0)
    assert len(vol.levels) == 2
    np.testing.assert_array_equal(vol.data.compute(), data)


# -- plain zarr ---------------------------------------------------------------------------
def test_plain_zarr_array_and_groups(tmp_path, caplog):
    data = _random(AWKWARD, np.uint8, seed=2)
    arr = zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(3, 5, 4))
    arr.attrs["spacing"] = [2.0, 1.5, 1.5]
    vol = open_volume(tmp_path / "a.zarr")
    assert (vol.kind, vol.axes, vol.spacing, vol.origin) == (
        "zarr",
        "zyx",
        (2.0, 1.5, 1.5),
        (0.0, 0.0, 0.0),
    )
    assert vol.data.chunksize == (3, 5, 4)
    np.testing.assert_array_equal(vol.data.compute(), data)

    # a group without multiscales: the largest array, said in the log
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    group.create_array("small", data=data[:2])
    group.create_array("big", data=data)
    with caplog.at_level(logging.WARNING, logger="napari_scrollseg.engine.volumes"):
        vol = open_volume(tmp_path / "g.zarr")
    np.testing.assert_array_equal(vol.data.compute(), data)
    assert "opening the largest, 'big'" in caplog.text
    # "0" wins over size; a 4D array is (c, z, y, x)
    group.create_array("0", data=np.stack([data[:1], data[:1] + 1]))
    vol = open_volume(tmp_path / "g.zarr")
    assert vol.axes == "czyx"
    assert vol.shape == (2, 1, 13, 11)

    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w").create_group("sub")
    with pytest.raises(ScrollsegError, match=r"holds no array \(it has groups: sub\); point at"):
        open_volume(tmp_path / "empty.zarr")
    zarr.create_array(str(tmp_path / "flat.zarr"), data=data[0])
    with pytest.raises(ScrollsegError, match=r"not a 3D volume .*must be 3D \(z, y, x\)"):
        open_volume(tmp_path / "flat.zarr")


# -- TIFF ---------------------------------------------------------------------------------
def test_tiff_folder_values_order_and_spacing(tmp_path):
    data = _random(AWKWARD, np.uint16, seed=3)
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, plane in enumerate(data):  # unpadded names: 10.tif sorts after 9.tif
        tifffile.imwrite(folder / f"{z}.tif", plane, compression="zlib")
    (folder / "meta.json").write_text(json.dumps({"voxelsize": 7.91, "slices": AWKWARD[0]}))
    vol = open_volume(folder)
    assert (vol.kind, vol.axes, vol.spacing) == ("tiff-folder", "zyx", (7.91, 7.91, 7.91))
    assert vol.data.chunks[0] == (1,) * AWKWARD[0]  # one slice per chunk
    np.testing.assert_array_equal(vol.data.compute(), data)
    np.testing.assert_array_equal(vol.data[2:6:3, 4:9, -3:].compute(), data[2:6:3, 4:9, -3:])
    # the graph pickles (distributed schedulers send it to workers)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(vol.data))[5].compute(), data[5])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", r"the folder .* is empty"),
        ("no_tiffs", r"has no \.tif slices and no zarr metadata \(found notes.txt"),
        ("shape", r"00002\.tif is \(9, 11\) uint8 but 00000\.tif is \(13, 11\) uint8"),
        ("dtype", r"00001\.tif is \(13, 11\) uint16 but 00000\.tif is \(13, 11\) uint8"),
        ("rgb", r"not a single-channel 2D slice"),
        ("broken", r"00001\.tif is not a readable TIFF"),
    ],
)
def test_tiff_folder_errors(tmp_path, setup, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    plane = np.zeros(AWKWARD[1:], np.uint8)
    if setup != "empty":
        (folder / "notes.txt").write_text("scan notes")
    if setup in ("shape", "dtype", "broken"):
        for z in range(3):
            tifffile.imwrite(folder / f"{z:05d}.tif", plane)
    if setup == "shape":
        tifffile.imwrite(folder / "00002.tif", plane[:9])
    if setup == "dtype":
        tifffile.imwrite(folder / "00001.tif", plane.astype(np.uint16))
    if setup == "broken":
        (folder / "00001.tif").write_bytes(b"not a tiff")
    if setup == "rgb":
        tifffile.imwrite(folder / "00000.tif", np.zeros((*AWKWARD[1:], 3), np.uint8))
    with pytest.raises(ScrollsegError, match=message):
        open_volume(folder)


def test_tiff_files(tmp_path):
    data = _random(AWKWARD, np.uint16, seed=4)
    tifffile.imwrite(tmp_path / "case_0000.tif", data, compression="zlib")
    (tmp_path / "case_0000.json").write_text(json.dumps({"spacing": [2.0, 0.5, 0.5]}))
    vol = open_volume(tmp_path / "case_0000.tif")  # nnU-Net's Tiff3DIO sidecar spacing
    assert (vol.kind, vol.axes, vol.spacing) == ("tiff", "zyx", (2.0, 0.5, 0.5))
    assert vol.data.numblocks[0] == AWKWARD[0]  # read page by page
    np.testing.assert_array_equal(vol.data.compute(), data)
    # the graph pickles although tifffile's store holds an open file
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(vol.data))[2:4].compute(), data[2:4])

    # an ImageJ hyperstack (z, c, y, x) becomes (c, z, y, x), spacing from its metadata
    zcyx = _random((AWKWARD[0], 2, *AWKWARD[1:]), np.uint8, seed=5)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        zcyx,
        imagej=True,
        resolution=(4.0, 4.0),
        metadata={"axes": "ZCYX", "spacing": 3.0, "unit": "um"},
    )
    vol = open_volume(tmp_path / "ij.tif")
    assert vol.axes == "czyx"
    assert vol.spacing == (3.0, 0.25, 0.25)
    np.testing.assert_array_equal(vol.data.compute(), zcyx.transpose(1, 0, 2, 3))

    # a folder holding just one stack opens that stack
    (tmp_path / "one").mkdir()
    tifffile.imwrite(tmp_path / "one" / "stack.tif", data)
    vol = open_volume(tmp_path / "one")
    assert vol.kind == "tiff"
    np.testing.assert_array_equal(vol.data.compute(), data)

    tifffile.imwrite(tmp_path / "flat.tif", data[0])
    with pytest.raises(ScrollsegError, match=r"is not a 3D volume .*must be 3D"):
        open_volume(tmp_path / "flat.tif")


# -- HDF5 ---------------------------------------------------------------------------------
def test_hdf5(tmp_path):
    data = _random(AWKWARD, np.uint16, seed=6)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("/exchange/data", data=data, chunks=(2, 5, 5))
        ds.attrs["element_size_um"] = [4.0, 2.0, 2.0]
    vol = open_volume(f"{path}:/exchange/data")
    assert (vol.kind, vol.axes, vol.spacing) == ("hdf5", "zyx", (4.0, 2.0, 2.0))
    np.testing.assert_array_equal(vol.data.compute(), data)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(vol.data))[3].compute(), data[3])
    assert disk_size(f"{path}:/exchange/data") == path.stat().st_size
    # the only 3D dataset is opened when none is named
    np.testing.assert_array_equal(open_volume(path).data[1].compute(), data[1])

    with h5py.File(path, "a") as f:
        f.create_dataset("/exchange/dark", data=data[:2])
    with pytest.raises(ScrollsegError, match=r"name the dataset to open in .*/exchange/dark"):
        open_volume(path)
    with pytest.raises(ScrollsegError, match=r"/nope in .* is missing, not a dataset; datasets"):
        open_volume(f"{path}:/nope")
    with pytest.raises(ScrollsegError, match=r"/exchange in .* is a group, not a dataset"):
        open_volume(f"{path}:/exchange")


# -- bad paths ----------------------------------------------------------------------------
def test_bad_paths(tmp_path):
    with pytest.raises(ScrollsegError, match=r"nothere\.zarr does not exist; check the path"):
        open_volume(tmp_path / "nothere.zarr")
    with pytest.raises(ScrollsegError, match=r"missing\.h5 does not exist"):
        open_volume(f"{tmp_path}/missing.h5:/data")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(ScrollsegError, match=r"unsupported file type \.png; open an OME-Zarr"):
        open_volume(tmp_path / "scan.png")


def test_hdf5_without_h5py_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["v"] = np.zeros((2, 3, 4), np.uint8)
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    with pytest.raises(ScrollsegError, match=r"needs h5py: pip install napari-scrollseg\[hdf5\]"):
        open_volume(f"{path}:/v")


def test_url_protocol_errors():
    with pytest.raises(ScrollsegError, match=r"cannot open nosuch://b/v\.zarr: .*fsspec knows"):
        open_volume("nosuch://b/v.zarr")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ScrollsegError, match=r"gcs:// URLs needs an fsspec driver .*gcsfs"):
            open_volume("gcs://bucket/v.zarr")


# -- URLs ---------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(phantom_zarr):
    """A real HTTP server on 127.0.0.1 serving the phantom's folder; stopped after the test."""
    handler = functools.partial(_QuietHandler, directory=str(phantom_zarr.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_ome_zarr_over_http(http_root, phantom_zarr):
    url = f"{http_root}/{phantom_zarr.name}"
    vol = open_volume(url)
    local = open_volume(phantom_zarr)
    assert vol.source == url
    assert vol.kind == "ome-zarr"
    assert disk_size(url) is None
    assert [lv.shape for lv in vol.levels] == [lv.shape for lv in local.levels]
    assert vol.spacing == local.spacing
    assert set(vol.labels) == {"truth"}
    np.testing.assert_array_equal(vol.data[10:30, 50:90].compute(), local.data[10:30, 50:90])
    with pytest.raises(ScrollsegError, match=r"no zarr array or group at .*/missing\.zarr"):
        open_volume(f"{http_root}/missing.zarr")


def test_unreachable_url():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ScrollsegError, match=r"cannot read http://127.0.0.1:\d+/s\.zarr.*network"):
        open_volume(f"http://127.0.0.1:{port}/s.zarr")


# -- laziness -----------------------------------------------------------------------------
def test_opening_a_4gb_ome_zarr_reads_no_chunk(tmp_path):
    """A (1000, 2048, 2048) uint8 OME-Zarr with no chunk written: 4 GB of voxels."""
    path = tmp_path / "big.zarr"
    omezarr.create_image(
        path, shape=(1000, 2048, 2048), dtype="uint8", chunks=(64, 256, 256), spacing=(1, 1, 1)
    )
    store = CountingStore(LocalStore(path, read_only=True))
    start = time.perf_counter()
    vol = open_volume(store)
    seconds = time.perf_counter() - start
    assert vol.shape == (1000, 2048, 2048)
    assert vol.data.nbytes == 1000 * 2048**2
    assert store.chunk_reads == []
    assert seconds < 10  # about 0.05 s here; the bound only catches a full read
    assert "3.9 GiB of voxels" in describe(vol)
    assert store.chunk_reads == []
    # the counter does see reads: one z-slice in one tile touches exactly one chunk
    assert vol.data[5, :10, :10].compute().max() == 0
    assert store.chunk_reads == ["0/0/0/0"]


def test_opening_a_4gb_tiff_folder_reads_no_slice(tmp_path, caplog):
    """1000 slices of 2048 x 2048 uint8 (4 GB of voxels), zlib zeros, hard links on disk."""
    folder = tmp_path / "slices"
    folder.mkdir()
    tifffile.imwrite(folder / "00000.tif", np.zeros((2048, 2048), np.uint8), compression="zlib")
    for z in range(1, 1000):
        os.link(folder / "00000.tif", folder / f"{z:05d}.tif")
    with caplog.at_level(logging.DEBUG, logger="napari_scrollseg.engine.volumes"):
        start = time.perf_counter()
        vol = open_volume(folder)
        seconds = time.perf_counter() - start
        reads = [r for r in caplog.records if r.getMessage().startswith("read slice")]
        assert reads == []
        assert vol.shape == (1000, 2048, 2048)
        assert vol.data.npartitions == 1000
        assert seconds < 20  # about 0.4 s here (one header read per file)
        assert vol.data[500].max().compute() == 0
    reads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read slice")]
    assert len(reads) == 1
    assert reads[0].endswith("00500.tif")


def test_volume_contract_fields():
    import dask.array as da

    vol = Volume(
        levels=(da.zeros((4, 6, 8), chunks=2), da.zeros((2, 3, 4), chunks=2)),
        spacing=(1.0, 2.0, 3.0),
        origin=(0.0, 0.0, 0.0),
        axes="zyx",
        source="mem",
        kind="zarr",
    )
    assert vol.labels == {}
    assert vol.attrs == {}
    assert vol.level_spacing(1) == (2.0, 4.0, 6.0)  # from the shape ratio
    assert "path:     mem" in describe(vol)
    assert "size:     1.5 KiB of voxels, unknown" in describe(vol)


def test_chunk_cache_serves_boxes_decoding_each_chunk_once(tmp_path, monkeypatch):
    """Prediction's box reads (``read_box``) equal zarr's, decode a chunk once while it
    is cached (one zarr read for all the chunks a box misses) and stay within the bound."""
    from napari_scrollseg.engine import volumes

    data = np.random.default_rng(0).integers(0, 255, (20, 30, 40), dtype=np.uint8)
    omezarr.write_image(tmp_path / "v.zarr", data, spacing=(1.0, 1.0, 1.0), chunks=(8, 8, 8))
    direct = volumes.direct_array(open_volume(tmp_path / "v.zarr").data)
    cache = volumes.ChunkCache(16 * 8**3)  # chunks of 512 bytes: 16 of them fit
    reads = []
    real = volumes.read_block
    monkeypatch.setattr(volumes, "read_block", lambda a, k, s: reads.append(k) or real(a, k, s))

    box = (slice(3, 12), slice(5, 14), slice(30, 40))  # 2 x 2 x 2 chunks, one at the edge
    np.testing.assert_array_equal(direct.read_box(box, cache), data[box])
    assert len(reads) == 1
    np.testing.assert_array_equal(direct.read_box(box, cache), data[box])
    assert len(reads) == 1  # all cached
    near = (slice(3, 12), slice(10, 20), slice(30, 40))  # 4 of its 8 chunks are cached
    np.testing.assert_array_equal(direct.read_box(near, cache), data[near])
    assert reads[-1] == (slice(0, 16), slice(16, 24), slice(24, 40))  # the missing ones only
    for z in range(0, 20, 5):  # a sweep: the bound holds, the answers stay right
        for y in range(0, 30, 7):
            b = (slice(z, z + 6), slice(y, y + 9), slice(0, 40))
            np.testing.assert_array_equal(direct.read_box(b, cache), data[b])
    assert 0 < cache.held <= cache.max_bytes
    n = len(reads)
    assert pickle.loads(pickle.dumps(direct)).token != direct.token  # another process's own
    assert pickle.loads(pickle.dumps(cache)).held == 0  # a worker's cache starts empty
    assert direct.read_box(box).shape == (9, 9, 10)  # no cache: zarr directly
    assert len(reads) == n + 1
