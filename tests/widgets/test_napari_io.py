"""The napari contributions in a real viewer: sample data, the reader for each volume
form, and the labels writer round trip (run under Xvfb: ``xvfb-run -a pytest ...``)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_scrollseg._reader import get_reader
from napari_scrollseg._writer import write_labels
from napari_scrollseg.engine import omezarr
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.phantom import COLORS, INK, PAPYRUS, SPACING, make_phantom

PLUGIN = "napari-scrollseg"


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def _rgba(layer, value: int) -> np.ndarray:
    return np.asarray(layer.colormap.map(np.array([value])))[0]


def _random(shape: tuple[int, ...], dtype=np.uint16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(dtype)


# -- sample data ------------------------------------------------------------------------
def test_sample_phantom(viewer):
    layers = viewer.open_sample(PLUGIN, "phantom")
    image, truth = layers
    assert image._type_string == "image"
    assert truth._type_string == "labels"
    assert image.data.shape == truth.data.shape == (64, 128, 128)
    np.testing.assert_allclose(image.scale, SPACING)
    np.testing.assert_allclose(truth.scale, SPACING)
    assert set(np.unique(truth.data)) == {1, 2, 3}
    np.testing.assert_allclose(_rgba(truth, INK), np.array(COLORS[INK]) / 255, atol=1e-6)
    assert list(truth.features["class"]) == ["unlabeled", "air", "papyrus", "ink"]
    assert image.axis_labels == truth.axis_labels == viewer.dims.axis_labels == ("z", "y", "x")


# -- reader: each volume form -----------------------------------------------------------
def test_open_ome_zarr_pyramid_with_labels(viewer, phantom_zarr):
    layers = viewer.open(phantom_zarr, plugin=PLUGIN)
    assert [layer._type_string for layer in layers] == ["image", "labels"]
    image, truth = layers
    assert image.name == "phantom"
    assert truth.name == "truth"
    for layer in layers:
        assert layer.multiscale
        assert len(layer.data) >= 2
        assert all(isinstance(level, da.Array) for level in layer.data)
        assert layer.data[0].shape == (64, 128, 128)
        np.testing.assert_allclose(layer.scale, SPACING)
        assert layer.axis_labels == ("z", "y", "x")
    assert viewer.dims.axis_labels == ("z", "y", "x")  # the sliders say z, not -3
    # CT display defaults: percentile contrast for uint8 too, attenuated MIP, air transparent
    scan = np.asarray(zarr.open_array(str(phantom_zarr / str(len(image.data) - 1)))[...])
    assert tuple(image.contrast_limits) == tuple(np.percentile(scan, [0.5, 99.5]))
    assert 0 < image.contrast_limits[0] < image.contrast_limits[1] < 255
    assert image.rendering == "attenuated_mip"
    assert _rgba(truth, 1)[3] == 0
    assert _rgba(truth, INK)[3] == 1
    np.testing.assert_allclose(_rgba(truth, PAPYRUS), np.array(COLORS[PAPYRUS]) / 255, atol=1e-6)
    # the displayed slice is the stored data
    expected = np.asarray(zarr.open_array(str(phantom_zarr / "labels" / "truth" / "0"))[10])
    np.testing.assert_array_equal(np.asarray(truth.data[0][10]), expected)


def test_open_prediction_channels(viewer, tmp_path):
    """A (c, z, y, x) probability image opens with one layer per class, plus its labels."""
    probs = _random((3, 64, 72, 64), np.uint8, seed=1)
    out = tmp_path / "pred.zarr"
    omezarr.write_image(out, probs, spacing=(2.0, 1.0, 1.0), chunks=(1, 32, 32, 32))
    omezarr.write_image(
        out / "labels" / "prediction",
        probs.argmax(0).astype(np.uint8),
        spacing=(2.0, 1.0, 1.0),
        chunks=(32, 32, 32),
        labels_of=out,
        name="prediction",
        reduction="mode",
    )
    layers = viewer.open(out, plugin=PLUGIN)
    assert [layer._type_string for layer in layers] == ["image"] * 3 + ["labels"]
    for c, layer in enumerate(layers[:3]):
        assert layer.multiscale
        assert [level.shape for level in layer.data] == [(64, 72, 64), (32, 36, 32)]
        assert all(isinstance(level, da.Array) for level in layer.data)
        np.testing.assert_allclose(layer.scale, (2.0, 1.0, 1.0))
        np.testing.assert_array_equal(layer.data[0].compute(), probs[c])
    assert all(layer.axis_labels == ("z", "y", "x") for layer in layers)
    assert layers[3].name == "prediction"


def test_open_single_level_forms(viewer, tmp_path):
    """Plain zarr, slice-TIFF folder, 3D TIFF and HDF5 open as lazy image layers.

    One viewer for the four forms keeps the test fast; each block checks one form.
    """
    # plain zarr array, spacing from its attributes
    data = _random((20, 33, 47))
    arr = zarr.create_array(
        str(tmp_path / "plain.zarr"), shape=data.shape, chunks=(8, 16, 16), dtype=data.dtype
    )
    arr[:] = data
    arr.attrs["spacing"] = [3.0, 1.5, 1.5]
    (layer,) = viewer.open(tmp_path / "plain.zarr", plugin=PLUGIN)
    assert layer._type_string == "image"
    assert not layer.multiscale
    assert isinstance(layer.data, da.Array)
    np.testing.assert_allclose(layer.scale, (3.0, 1.5, 1.5))
    np.testing.assert_array_equal(layer.data.compute(), data)
    lo, hi = layer.contrast_limits
    assert data.min() <= lo < hi <= data.max()

    # folder of 2D slice TIFFs: one slice per chunk
    data = _random((12, 30, 40), seed=2)
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, plane in enumerate(data):
        tifffile.imwrite(folder / f"{z:05d}.tif", plane)
    (layer,) = viewer.open(folder, plugin=PLUGIN)
    assert layer._type_string == "image"
    assert layer.name == "slices"
    assert isinstance(layer.data, da.Array)
    assert layer.data.chunksize[0] == 1
    np.testing.assert_array_equal(layer.data.compute(), data)

    # one 3D TIFF with ImageJ voxel size
    data = _random((10, 24, 20), seed=3)
    path = tmp_path / "vol.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.5),
        metadata={"spacing": 2.0, "axes": "ZYX"},
    )
    (layer,) = viewer.open(path, plugin=PLUGIN)
    assert layer.name == "vol"
    assert isinstance(layer.data, da.Array)
    np.testing.assert_allclose(layer.scale, (2.0, 0.5, 0.5))
    np.testing.assert_array_equal(layer.data.compute(), data)

    # HDF5: napari opens only existing paths, so a file with several volumes gives
    # one layer per volume; the reader itself also takes file.h5:/dataset
    h5py = pytest.importorskip("h5py")
    raw, seg = _random((8, 20, 16), seed=4), _random((8, 20, 16), np.uint8, seed=5)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("volume/raw", data=raw, chunks=(4, 10, 8))
        h5.create_dataset("volume/seg", data=seg)
        h5.create_dataset("notes", data=np.arange(3))
    layers = viewer.open(path, plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["volume_raw", "volume_seg"]
    assert all(isinstance(layer.data, da.Array) for layer in layers)
    np.testing.assert_array_equal(layers[0].data.compute(), raw)
    (data, _meta, kind) = get_reader(f"{path}:/volume/seg")(f"{path}:/volume/seg")[0]
    assert kind == "image"
    np.testing.assert_array_equal(data.compute(), seg)


def test_open_large_volume_lazily(viewer, tmp_path):
    """An 8 GiB uint16 volume opens in napari without being read whole.

    napari shows one plane, which reads the one slab of chunks through it (here
    16 x 2048 x 2048 voxels, 128 MiB); everything else stays on disk.
    """
    shape = (1024, 2048, 2048)
    zarr.create_array(
        str(tmp_path / "big.zarr"),
        shape=shape,
        chunks=(16, 512, 512),
        dtype=np.uint16,
        fill_value=0,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    (layer,) = viewer.open(tmp_path / "big.zarr", plugin=PLUGIN)
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert layer.data.shape == shape
    assert isinstance(layer.data, da.Array)
    assert elapsed < 20, f"opening took {elapsed:.1f} s"
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB"


def test_get_reader_declines_what_it_cannot_open(tmp_path):
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((20, 30), np.uint8))
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("no volume here")
    assert get_reader(str(png)) is None
    assert get_reader(str(flat)) is None
    assert get_reader(str(empty)) is None
    assert get_reader([str(flat), str(flat)]) is None


# -- writer -----------------------------------------------------------------------------
def test_save_labels_round_trip(viewer, tmp_path):
    _, truth = make_phantom((64, 64, 64), seed=1)
    layer = viewer.add_labels(truth, scale=(2.0, 0.5, 0.5), name="annot")
    layer.colormap = {0: "transparent", 2: (0.0, 1.0, 0.0, 1.0), None: "gray"}
    written = layer.save(str(tmp_path / "annot.zarr"), plugin=PLUGIN)
    assert written == [str(tmp_path / "annot.zarr")]
    written = layer.save(str(tmp_path / "annot.tif"), plugin=PLUGIN)
    assert written == [str(tmp_path / "annot.tif")]

    (back,) = viewer.open(tmp_path / "annot.zarr", plugin=PLUGIN)
    assert back._type_string == "labels"
    assert back.multiscale
    np.testing.assert_array_equal(np.asarray(back.data[0]), truth)
    np.testing.assert_allclose(back.scale, (2.0, 0.5, 0.5))
    np.testing.assert_allclose(_rgba(back, 2), (0.0, 1.0, 0.0, 1.0))

    (back,) = viewer.open(tmp_path / "annot.tif", plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(back.data), truth)
    np.testing.assert_allclose(back.scale, (2.0, 0.5, 0.5))

    # saving again replaces the label image it wrote
    layer.data = np.where(truth == 3, 1, truth).astype(truth.dtype)
    layer.save(str(tmp_path / "annot.zarr"), plugin=PLUGIN)
    stored = zarr.open_array(str(tmp_path / "annot.zarr" / "0"))
    assert not (np.asarray(stored) == 3).any()


def test_write_labels_from_dask(tmp_path):
    truth = make_phantom((24, 40, 36), seed=2)[1].astype(np.uint16)
    lazy = da.from_array(truth, chunks=(5, 17, 13))
    meta = {
        "scale": (1.0, 2.0, 3.0),
        "name": "lazy",
        "features": {"index": [0, 1], "class": ["unlabeled", "air"]},
    }
    (zpath,) = write_labels(str(tmp_path / "lazy.zarr"), lazy, meta)
    attrs = json.loads((Path(zpath) / ".zattrs").read_text())
    assert attrs["image-label"]["properties"] == [{"label-value": 1, "class": "air"}]
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        1.0,
        2.0,
        3.0,
    ]
    np.testing.assert_array_equal(zarr.open_array(zpath + "/0")[:], truth)
    # uint16 goes to ImageJ TIFF; int64 (napari's default labels dtype) to BigTIFF + sidecar
    (tpath,) = write_labels(str(tmp_path / "lazy.tif"), lazy, meta)
    np.testing.assert_array_equal(tifffile.imread(tpath), truth)
    written = write_labels(str(tmp_path / "wide.tiff"), lazy.astype(np.int64), meta)
    assert [Path(p).name for p in written] == ["wide.tiff", "wide.json"]
    assert json.loads(Path(written[1]).read_text()) == {"spacing": [1.0, 2.0, 3.0]}
    np.testing.assert_array_equal(tifffile.imread(written[0]), truth)


def test_write_labels_refuses_to_replace_other_data(phantom_zarr):
    before = sorted(p.name for p in phantom_zarr.iterdir())
    with pytest.raises(ScrollsegError, match="not a label image"):
        write_labels(str(phantom_zarr), np.zeros((4, 4, 4), np.uint8), {"scale": (1, 1, 1)})
    assert sorted(p.name for p in phantom_zarr.iterdir()) == before
    with pytest.raises(ScrollsegError, match=r"\.zarr, \.tif or \.tiff"):
        write_labels(str(phantom_zarr.parent / "x.png"), np.zeros((4, 4, 4), np.uint8), {})


@pytest.mark.slow
def test_open_a_scrollseg_prediction(viewer, tmp_path):
    """A `scrollseg predict` output opens as probability layers named by class (only the
    last class shown, a black-based colormap added over the scan) and the labels layer
    in the annotation's ids with class names and colours."""
    from napari_scrollseg.engine.phantom import write_phantom
    from napari_scrollseg.engine.predict_volume import predict_volume

    ph = write_phantom(tmp_path / "ph.zarr", (16, 64, 64), seed=4)
    out = predict_volume("phantom-tiny", ph, tmp_path / "pred.zarr", mirror=False, bar=False)
    scan = viewer.open(ph, plugin=PLUGIN)[0]
    layers = viewer.open(out, plugin=PLUGIN)
    assert [layer._type_string for layer in layers] == ["image"] * 3 + ["labels"]
    probs, labels = layers[:3], layers[3]
    assert [p.name for p in probs] == ["pred [air]", "pred [papyrus]", "pred [ink]"]
    assert [p.visible for p in probs] == [False, False, True]
    ink = probs[2]
    assert ink.blending == "additive"
    assert tuple(ink.contrast_limits) == (0, 255)
    np.testing.assert_allclose(
        ink.colormap.map(np.array([0.0]))[0][:3], 0, atol=0.02
    )  # 0 adds nothing
    assert scan.visible
    assert labels.name == "prediction"
    assert list(labels.features["class"]) == ["unlabeled", "air", "papyrus", "ink"]
    assert set(np.unique(np.asarray(labels.data[0]))) <= {1, 2, 3}
    np.testing.assert_allclose(_rgba(labels, INK), np.array(COLORS[INK]) / 255, atol=1e-6)
