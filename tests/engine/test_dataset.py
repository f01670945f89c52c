"""nnU-Net raw dataset export: crops, label mapping, sidecars, append, nnU-Net's own checks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_scrollseg.cli import main
from napari_scrollseg.engine import dataset as dataset_mod
from napari_scrollseg.engine.annotations import AnnotationStore
from napari_scrollseg.engine.dataset import (
    DEFAULT_MARGIN,
    _Case,
    _slabs,
    _SlabWriter,
    export_dataset,
    iter_export_dataset,
    verify_dataset,
)
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.phantom import SPACING
from napari_scrollseg.engine.volumes import open_volume

NAMES = ["air", "papyrus", "ink"]


def _sparse_stores(phantom: Path, tmp: Path, n: int) -> list[AnnotationStore]:
    """n annotations of the phantom: 3 z-slices of the truth each, plus an ignore blob."""
    volume = open_volume(phantom)
    truth = np.asarray(volume.labels["truth"][0])
    stores = []
    for i in range(n):
        store = AnnotationStore.open_or_create(tmp / f"ann{i}.zarr", volume, NAMES)
        for z in (20 + i, 28 + 2 * i, 40 - i):
            store[z] = truth[z]
        store[30:33, 50:60, 50:60] = store.ignore_value
        store.save()
        stores.append(store)
    return stores


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_export_phantom_passes_nnunet_integrity_check(phantom_zarr: Path, tmp_path: Path) -> None:
    stores = _sparse_stores(phantom_zarr, tmp_path, 5)
    out = tmp_path / "raw"
    seen = []
    ds = export_dataset(
        [(phantom_zarr, s) for s in stores],
        out_dir=out,
        dataset_id=7,
        name="Phantom",
        classes=NAMES,
        margin=(4, 100, 100),
        on_case=lambda i, name: seen.append((i, name)),
    )
    assert ds == out / "Dataset007_Phantom"
    assert seen == [(i, f"Phantom_{i:03d}") for i in range(5)]
    verify_dataset(ds)  # nnU-Net's verify_dataset_integrity, in a subprocess

    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "papyrus": 1, "ink": 2, "ignore": 3}
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["numTraining"] == 5
    assert meta["file_ending"] == ".tif"
    assert meta["scrollseg"]["classes"] == {"air": 1, "papyrus": 2, "ink": 3}
    assert meta["scrollseg"]["margin"] == [4, 100, 100]

    # case 1: slices 21, 30, 39 annotated -> z crop 17..43 (inclusive), y/x the whole volume
    case = meta["scrollseg"]["cases"]["Phantom_001"]
    assert case["crop"] == [[17, 44], [0, 128], [0, 128]]
    volume = open_volume(phantom_zarr)
    image = tifffile.imread(ds / "imagesTr" / "Phantom_001_0000.tif")
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.asarray(volume.data[17:44]))
    labels = tifffile.imread(ds / "labelsTr" / "Phantom_001.tif")
    truth = np.asarray(volume.labels["truth"][0][17:44])
    for z in (21, 39):
        np.testing.assert_array_equal(labels[z - 17], truth[z - 17] - 1)  # air -> 0, ink -> 2
    assert (labels[0] == 3).all()  # unlabeled -> ignore
    assert (labels[31 - 17, 50:60, 50:60] == 3).all()  # ignore blob -> ignore
    for sub in ("imagesTr", "labelsTr"):
        sidecar = json.loads((ds / sub / "Phantom_001.json").read_text())
        assert sidecar == {"spacing": list(SPACING)}

    # nnU-Net's reader sees the sidecar spacing and the data
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

    data, props = Tiff3DIO().read_images([str(ds / "imagesTr" / "Phantom_001_0000.tif")])
    assert list(props["spacing"]) == list(SPACING)
    assert data.shape == (1, 27, 128, 128)

    # append keeps numbering and updates numTraining
    ds2 = export_dataset(
        [(phantom_zarr, stores[0])],
        out_dir=out,
        dataset_id=7,
        name="Phantom",
        classes=NAMES,
        margin=(4, 100, 100),
        append=True,
    )
    meta = json.loads((ds2 / "dataset.json").read_text())
    assert meta["numTraining"] == 6
    assert (ds2 / "labelsTr" / "Phantom_005.tif").exists()
    assert "Phantom_005" in meta["scrollseg"]["cases"]
    assert _leftovers(out) == ["Dataset007_Phantom"]

    # a broken dataset: nnU-Net's message comes back as a ScrollsegError
    meta["numTraining"] = 9
    (ds2 / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ScrollsegError, match=r"integrity check rejected.*expected number"):
        verify_dataset(ds2)


def test_crop_margin_is_exact_and_clipped(tmp_path: Path) -> None:
    image = np.arange(20 * 30 * 40, dtype=np.uint16).reshape(20, 30, 40)
    labels = np.zeros(image.shape, np.uint8)
    labels[10, 20, 1] = 2
    labels[12, 21, 1] = 255  # ignore does not extend the box
    ds = export_dataset(
        [(image, labels)], out_dir=tmp_path, dataset_id=1, name="Tiny", classes=NAMES, margin=2
    )
    img = tifffile.imread(ds / "imagesTr" / "Tiny_000_0000.tif")
    lab = tifffile.imread(ds / "labelsTr" / "Tiny_000.tif")
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, image[8:13, 18:23, 0:4])  # x clipped at 0
    assert lab.shape == (5, 5, 4)
    assert lab[2, 2, 1] == 1
    assert (lab != 1).sum() == lab.size - 1
    assert set(np.unique(lab)) == {1, 3}
    assert DEFAULT_MARGIN == 32

    # two channels (c, z, y, x): one file per channel, both named in dataset.json
    two = np.stack([image, image + 1])
    ds = export_dataset(
        [(two, labels)], out_dir=tmp_path, dataset_id=2, name="Two", classes=NAMES, margin=2
    )
    assert json.loads((ds / "dataset.json").read_text())["channel_names"] == {"0": "CT", "1": "CT"}
    second = tifffile.imread(ds / "imagesTr" / "Two_000_0001.tif")
    np.testing.assert_array_equal(second, image[8:13, 18:23, 0:4] + 1)


def test_nifti_export_with_normalization(tmp_path: Path) -> None:
    import dask.array as da
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rng = np.random.default_rng(0)
    image = rng.integers(10, 200, (30, 20, 24)).astype(np.uint8)
    labels = np.zeros(image.shape, np.uint8)
    labels[3:27, 5, 6:20] = 1
    labels[15, 10, 10] = 3
    lazy = da.from_array(image, chunks=(7, 11, 13))  # awkward chunks: several slabs
    events = list(
        iter_export_dataset(
            [(lazy, labels)],
            out_dir=tmp_path,
            dataset_id=3,
            name="Nii",
            classes=NAMES,
            margin=(0, 0, 1),
            norm="rescale_to_0_1",
            ending=".nii.gz",
        )
    )
    assert [(e.done, e.total) for e in events] == [(i, 8) for i in range(1, 9)]
    # streamed one source z-chunk at a time
    case = _Case(lazy[None], labels, (1.0,) * 3, (0.0,) * 3, "", "", crop=(slice(3, 27),) * 3)
    assert _slabs(case) == [(3, 7), (7, 14), (14, 21), (21, 27)]
    ds = tmp_path / "Dataset003_Nii"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "noNorm"}
    params = meta["scrollseg"]["cases"]["Nii_000"]["norm_params"]
    assert params == {"min": float(image.min()), "max": float(image.max())}
    io = SimpleITKIO()
    data, props = io.read_images([str(ds / "imagesTr" / "Nii_000_0000.nii.gz")])
    seg, seg_props = io.read_seg(str(ds / "labelsTr" / "Nii_000.nii.gz"))
    crop = image[3:27, 5:11, 5:21]
    expected = (crop.astype(np.float32) - image.min()) / float(image.max() - image.min())
    np.testing.assert_allclose(data[0], expected, rtol=1e-6)
    assert seg.shape == (1, 24, 6, 16)
    assert seg[0, 12, 5, 5] == 2
    assert seg[0, 12, 0, 5] == 0
    assert seg[0, 0, 1, 1] == 3
    assert list(props["spacing"]) == [1.0, 1.0, 1.0] == list(seg_props["spacing"])

    # cancelling (closing the generator) part-way leaves nothing behind
    cancel = tmp_path / "cancel"
    gen = iter_export_dataset(
        [(lazy, labels)], out_dir=cancel, dataset_id=4, name="Cancel", classes=NAMES, margin=0
    )
    assert next(gen).done == 1
    gen.close()
    assert _leftovers(cancel) == []


def test_bad_inputs_are_clear_errors_and_leave_nothing(tmp_path: Path) -> None:
    image = np.zeros((10, 12, 14), np.uint8)
    good = np.zeros(image.shape, np.uint8)
    good[5, 5, 5] = 1
    out = tmp_path / "raw"
    common = dict(out_dir=out, dataset_id=5, name="Bad", classes=NAMES)
    with pytest.raises(ScrollsegError, match=r"image shape \(10, 12, 14\) and label shape"):
        export_dataset([(image, good[:, :, :7])], **common)
    outside = good.copy()
    outside[1, 1, 1] = 4
    with pytest.raises(ScrollsegError, match=r"label values \[4\] are outside the class table"):
        export_dataset([(image, outside)], **common)
    only_ignore = np.zeros(image.shape, np.uint8)
    only_ignore[2] = 255
    with pytest.raises(ScrollsegError, match="no annotated voxel"):
        export_dataset([(image, good), (image, only_ignore)], **common)
    with pytest.raises(ScrollsegError, match="5-fold cross-validation needs at least 5 cases"):
        export_dataset([(image, good)] * 2, folds=5, **common)
    assert not out.exists()

    export_dataset([(image, good)], **common)
    with pytest.raises(ScrollsegError, match="dataset ID 5 is already used by Dataset005_Bad"):
        export_dataset([(image, good)], **{**common, "name": "Other"})
    with pytest.raises(ScrollsegError, match="already exists; append"):
        export_dataset([(image, good)], **common)
    with pytest.raises(ScrollsegError, match="same class table"):
        export_dataset([(image, good)], append=True, **{**common, "classes": ["a", "b"]})
    assert _leftovers(out) == ["Dataset005_Bad"]
    assert len(list((out / "Dataset005_Bad" / "imagesTr").iterdir())) == 2  # image + sidecar


def test_cli_export_from_paths(phantom_zarr: Path, tmp_path: Path, capsys) -> None:
    truth = phantom_zarr / "labels" / "truth"
    out = tmp_path / "raw"
    argv = ["export", "--image", str(phantom_zarr), "--labels", str(truth)]
    argv += ["--classes", "air,papyrus,ink", "--out", str(out), "--dataset-id", "12"]
    argv += ["--name", "Cli", "--margin", "0"]
    assert main(argv) == 0
    assert "Dataset012_Cli" in capsys.readouterr().out
    meta = json.loads((out / "Dataset012_Cli" / "dataset.json").read_text())
    assert meta["numTraining"] == 1
    assert meta["scrollseg"]["cases"]["Cli_000"]["labels"] == str(truth)
    assert main([*argv[:3], "--image", str(phantom_zarr), *argv[3:]]) == 2
    assert "error: 2 --image but 1 --labels" in capsys.readouterr().err


def test_error_while_writing_leaves_the_dataset_as_it_was(tmp_path: Path) -> None:
    from napari_scrollseg.engine.omezarr import write_image

    image = np.arange(16 * 16 * 16, dtype=np.uint16).reshape(16, 16, 16)
    labels = np.zeros(image.shape, np.uint8)
    labels[2, 3, 4] = 1
    labels[12, 3, 4] = 2
    scan = tmp_path / "scan.zarr"
    write_image(scan, image, spacing=(1.0, 1.0, 1.0), chunks=(8, 8, 8))
    out = tmp_path / "raw"
    common = dict(out_dir=out, dataset_id=9, name="Io", classes=NAMES, margin=0)
    ds = export_dataset([(scan, labels)], **common)
    lab = tifffile.imread(ds / "labelsTr" / "Io_000.tif")  # a one-voxel-wide crop
    assert lab.shape == (11, 1, 1)
    assert lab[:, 0, 0].tolist() == [0] + [3] * 9 + [1]
    before = sorted(p.name for p in ds.rglob("*"))
    (scan / "0" / "1" / "0" / "0").write_bytes(b"not a blosc chunk")  # z 8..15 unreadable
    with pytest.raises(Exception):  # noqa: B017, PT011 - the codec's own error
        export_dataset([(scan, labels)], append=True, **common)
    assert _leftovers(out) == ["Dataset009_Io"]
    assert sorted(p.name for p in ds.rglob("*")) == before
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 1
    with pytest.raises(Exception):  # noqa: B017, PT011
        export_dataset([(scan, labels)], **{**common, "dataset_id": 10})
    assert _leftovers(out) == ["Dataset009_Io"]


# -- the slab writer thread (issue 13, item 0) ---------------------------------------------
def _fake_writer(pages_wanted: int, finished: threading.Event, seen: list, fail_after=None):
    """A stand-in for _write_volume that, like tifffile, stops reading after its last page."""

    def write(path, pages, shape, dtype, **kwargs):
        try:
            for page in pages:
                seen.append(int(page[0, 0]))
                if fail_after is not None and len(seen) == fail_after:
                    raise OSError("disk full")
                if len(seen) == pages_wanted:
                    return
        finally:
            finished.set()

    return write


def _slab(z0: int, z1: int) -> np.ndarray:
    return np.arange(z0, z1, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)


def test_writer_that_finished_before_close_is_success(tmp_path: Path, monkeypatch) -> None:
    finished, seen = threading.Event(), []
    monkeypatch.setattr(dataset_mod, "_write_volume", _fake_writer(6, finished, seen))
    writer = _SlabWriter(tmp_path / "a.tif", (6, 2, 2), np.uint8)
    writer.write(_slab(0, 3))
    writer.write(_slab(3, 6))
    assert finished.wait(10)  # the file writer has every page and returned
    writer._thread.join(timeout=0.5)  # give a thread that would end now the time to end
    writer.close()  # the old code raised "the file writer stopped" here
    assert seen == list(range(6))
    assert not writer._thread.is_alive()


def test_writer_error_propagates_and_extra_slabs_are_refused(tmp_path: Path, monkeypatch) -> None:
    finished, seen = threading.Event(), []
    monkeypatch.setattr(dataset_mod, "_write_volume", _fake_writer(6, finished, seen, 2))
    writer = _SlabWriter(tmp_path / "a.tif", (6, 2, 2), np.uint8)
    writer.write(_slab(0, 3))
    assert finished.wait(10)
    writer._thread.join(timeout=10)
    with pytest.raises(OSError, match="disk full"):  # the writer's own error, not "stopped"
        writer.write(_slab(3, 6))
    with pytest.raises(OSError, match="disk full"):
        writer.close()

    finished, seen = threading.Event(), []
    monkeypatch.setattr(dataset_mod, "_write_volume", _fake_writer(3, finished, seen))
    writer = _SlabWriter(tmp_path / "b.tif", (3, 2, 2), np.uint8)
    writer.write(_slab(0, 3))
    writer.write(_slab(3, 6))  # one slab too many: the file is already complete
    with pytest.raises(ScrollsegError, match=r"more slices than b.tif holds \(3, 2, 2\)"):
        writer.close()


def test_export_with_a_consumer_that_pauses_between_progress_events(tmp_path: Path) -> None:
    """The real TIFF export, driven like a GUI that is slow to ask for the next slab."""
    image = np.arange(100 * 30 * 30, dtype=np.uint32).reshape(100, 30, 30).astype(np.uint8)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:90:20, 5:25:4, 5:25:3] = 2
    labels[50, 10, 10] = 1
    image = da.from_array(image, chunks=(25, 30, 30))  # 4 slabs per file
    out = tmp_path / "raw"
    gen = iter_export_dataset(
        [(image, labels)], out_dir=out, dataset_id=3, name="Slow", classes=NAMES, margin=0
    )
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            ds = stop.value
            break
        time.sleep(0.3)  # tifffile finishes the file meanwhile after the last slab
    assert [e.done for e in events] == list(range(1, events[0].total + 1))
    crop = json.loads((ds / "dataset.json").read_text())["scrollseg"]["cases"]["Slow_000"]["crop"]
    z, y, x = (slice(a, b) for a, b in crop)
    got = tifffile.imread(ds / "imagesTr" / "Slow_000_0000.tif")
    np.testing.assert_array_equal(got, np.asarray(image[z, y, x]))
    assert _leftovers(out) == ["Dataset003_Slow"]

    # a consumer that pauses, then gives up: no thread left waiting, nothing left behind
    gen = iter_export_dataset(
        [(image, labels)], out_dir=out, dataset_id=4, name="Gone", classes=NAMES, margin=0
    )
    next(gen)
    time.sleep(0.3)
    before = threading.active_count()
    gen.close()
    assert threading.active_count() <= before - 1
    assert _leftovers(out) == ["Dataset003_Slow"]
