"""Annotation store: class table, sparse painting, atomic incremental saves, Otsu start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_scrollseg.engine.annotations import (
    AnnotationStore,
    ClassTable,
    LabelClass,
    ignore_value,
    volume_otsu,
)
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.phantom import AIR, PAPYRUS, make_phantom

NAMES = ["air", "papyrus", "ink"]


def _chunk_files(store: AnnotationStore) -> dict[str, float]:
    root = store.path / "0"
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_class_table_json_round_trip(tmp_path: Path) -> None:
    table = ClassTable.from_names(NAMES)
    assert table.ids() == [1, 2, 3]
    assert table.names() == NAMES
    path = table.to_json(tmp_path / "dataset_info.json")
    data = json.loads(path.read_text())
    assert data["papyrus"] == {"id": 2, "color": list(table.classes[1].color)}
    # the soil workflow's file lists 0 = ToPredict: it is skipped
    data["ToPredict"] = {"id": 0, "color": [0, 0, 0]}
    path.write_text(json.dumps(data))
    again = ClassTable.from_json(path)
    assert again == table
    colors = again.as_napari_colors()
    assert colors[0][3] == 0.0
    assert colors[2] == (*(c / 255 for c in table.classes[1].color), 1.0)
    assert ignore_value("uint8") == 255
    assert ignore_value("uint16") == 65535


def test_class_table_rejects_gaps_and_duplicates() -> None:
    with pytest.raises(ScrollsegError, match="no gaps"):
        ClassTable([LabelClass(1, "a", (0, 0, 0)), LabelClass(3, "b", (0, 0, 0))])
    with pytest.raises(ScrollsegError, match="unique"):
        ClassTable.from_names(["a", "a"])


def test_store_paints_sparsely_saves_incrementally_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "ann.zarr"
    store = AnnotationStore.create(
        path, shape=(40, 70, 90), spacing=(2.0, 1.0, 1.0), classes=NAMES, chunks=(16, 32, 32)
    )
    assert _chunk_files(store) == {}
    store[5, 10:40, 0:30] = 2  # spans y-chunks 0 and 1 of z-chunk 0
    store[20:23, 65:70, 85:90] = 255  # one edge chunk, ignore
    assert store.dirty_chunks == 3
    assert store.save() == 3
    assert store.save() == 0
    files = _chunk_files(store)
    assert sorted(files) == ["0/0/0", "0/1/0", "1/2/2"]
    assert store.annotated_bbox() == (slice(5, 23), slice(10, 70), slice(0, 90))
    assert store.annotated_bbox(classes_only=True) == (slice(5, 6), slice(10, 40), slice(0, 30))

    time.sleep(0.01)
    store[6, 0, 0] = 3  # touches chunk 0/0/0 only
    assert store.save() == 1
    after = _chunk_files(store)
    assert after["0/1/0"] == files["0/1/0"]
    assert after["1/2/2"] == files["1/2/2"]
    assert after["0/0/0"] != files["0/0/0"]

    store.classes = ClassTable.from_names([*NAMES, "crack"])
    store.save()
    reopened = AnnotationStore.open(path)
    assert reopened.classes.names() == [*NAMES, "crack"]
    assert reopened.spacing == (2.0, 1.0, 1.0)
    expected = np.zeros((40, 70, 90), np.uint8)
    expected[5, 10:40, 0:30] = 2
    expected[20:23, 65:70, 85:90] = 255
    expected[6, 0, 0] = 3
    np.testing.assert_array_equal(reopened[:], expected)
    np.testing.assert_array_equal(reopened.as_dask().compute(), expected)
    assert reopened.class_counts() == {2: 900, 3: 1, 255: 75}

    # unsaved paint is visible through reads and as_dask, then discarded
    reopened[0, 0, 0] = 1
    assert reopened.as_dask()[0, 0, 0].compute() == 1
    assert reopened.discard() == 1
    assert reopened[0, 0, 0] == 0

    # erasing a whole chunk removes its file
    reopened[20:23, 65:70, 85:90] = 0
    reopened.save()
    assert "1/2/2" not in _chunk_files(reopened)


def test_store_rejects_bad_paint_and_wrong_image(tmp_path: Path) -> None:
    store = AnnotationStore.create(tmp_path / "a.zarr", shape=(8, 8, 8), classes=NAMES)
    with pytest.raises(ScrollsegError, match=r"label values \[7\] are not in the class table"):
        store[0, 0, 0:2] = [1, 7]
    with pytest.raises(ScrollsegError, match="cannot paint"):
        store[0, 0:2, 0:2] = np.ones((3, 3), np.uint8)
    assert store.dirty_chunks == 0
    with pytest.raises(ScrollsegError, match="not a scrollseg annotation store"):
        AnnotationStore.open(tmp_path)
    with pytest.raises(ScrollsegError, match=r"has shape \(8, 8, 8\) but the image has"):
        AnnotationStore.open_or_create(tmp_path / "a.zarr", np.zeros((8, 8, 9)))


def test_otsu_start_fills_class_1_on_the_chosen_slice(tmp_path: Path) -> None:
    image, truth = make_phantom((24, 64, 64), seed=1)
    store = AnnotationStore.create(tmp_path / "o.zarr", shape=image.shape, classes=NAMES)
    z = 7
    threshold = store.otsu_start(image, z=z)
    assert 60 < threshold < 140  # between air (~45) and papyrus (~150)
    labels = store.as_dask().compute()
    filled = labels[z] == 1
    assert filled.sum() > 200
    assert np.array_equal(filled, image[z] > threshold)
    assert not labels[np.arange(24) != z].any()  # no other slice touched
    # bright voxels are the papyrus sheets of the truth
    assert (truth[z][filled] == PAPYRUS).mean() > 0.9
    assert (truth[z][~filled] == AIR).mean() > 0.8

    # volume threshold from sampled blocks, with an upper cut-off, default middle slice
    import dask.array as da

    vol_t = volume_otsu(da.from_array(image, chunks=(8, 32, 32)), max_blocks=6)
    assert abs(vol_t - threshold) < 25
    t2 = store.otsu_start(image, threshold_from="volume", upper=170)
    middle = store[12]
    assert np.array_equal(middle == 1, (image[12] > t2) & (image[12] < 170))
    with pytest.raises(ScrollsegError, match="outside the volume"):
        store.otsu_start(image, z=99)


_SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from napari_scrollseg.engine.annotations import AnnotationStore

    store = AnnotationStore.open(sys.argv[1])
    gen = int(sys.argv[2])
    grid = [(i, j, k) for i in range(4) for j in range(2) for k in range(2)]
    while True:
        for idx in grid:
            box = tuple(slice(c * s, (c + 1) * s) for c, s in zip(idx, store.chunks))
            rng = np.random.default_rng([gen, *idx])
            block = rng.integers(1, 4, size=store.chunks).astype(np.uint8)
            block.flat[:8] = [(gen >> (2 * d)) & 3 for d in range(8)]
            store[box] = block
        store.save()
        print(gen, flush=True)
        gen += 1
    """
)


def _check_chunks(store: AnnotationStore) -> set[int]:
    """Every chunk holds a complete generation pattern; return the generations seen."""
    gens = set()
    for i, j, k in [(i, j, k) for i in range(4) for j in range(2) for k in range(2)]:
        box = tuple(slice(c * s, (c + 1) * s) for c, s in zip((i, j, k), store.chunks))
        block = store[box]
        gen = sum(int(v) << (2 * d) for d, v in enumerate(block.flat[:8]))
        rng = np.random.default_rng([gen, i, j, k])
        expected = rng.integers(1, 4, size=store.chunks).astype(np.uint8)
        expected.flat[:8] = block.flat[:8]
        assert np.array_equal(block, expected), f"chunk {(i, j, k)} is torn"
        gens.add(gen)
    return gens


def test_kill_9_during_save_leaves_old_or_new_chunks(tmp_path: Path) -> None:
    path = tmp_path / "killed.zarr"
    AnnotationStore.create(path, shape=(64, 64, 64), classes=NAMES, chunks=(16, 32, 32))
    rng = np.random.default_rng(0)
    start = 0
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            first = int(proc.stdout.readline())  # one full save done
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        finally:
            proc.kill()
            out, _ = proc.communicate()
        last = int(out.split()[-1]) if out.split() else first
        store = AnnotationStore.open(path)  # opens, and removes unfinished writes
        assert not list(path.rglob("*.partial"))
        gens = _check_chunks(store)
        # each chunk is from the last complete save or from the one in progress
        assert gens <= {last, last + 1}, (gens, last)
        start = last + 2
    assert kills == 4


# -- what the annotate widget calls -------------------------------------------------------
def _full_counts(store: AnnotationStore) -> tuple[dict, tuple]:
    labels = store[:]
    values, n = np.unique(labels, return_counts=True)
    voxels = {int(v): int(c) for v, c in zip(values, n) if v}
    slices = tuple(
        np.flatnonzero((labels != 0).any(axis=tuple(a for a in range(3) if a != ax))).tolist()
        for ax in range(3)
    )
    return voxels, slices


def test_counts_follow_each_paint_without_rescanning(tmp_path: Path) -> None:
    store = AnnotationStore.create(
        tmp_path / "c.zarr", shape=(20, 30, 40), classes=NAMES, chunks=(8, 16, 16)
    )
    store[3, 2:9, 5:30] = 2
    store.save()
    store = AnnotationStore.open(store.path)
    assert store.counts().voxels == {2: 7 * 25}  # first call counts the stored chunks
    rng = np.random.default_rng(0)
    calls = []
    original = store._recount
    store._recount = lambda: calls.append(1) or original()  # type: ignore[method-assign]
    for _ in range(30):
        z, y, x = rng.integers(0, (20, 30, 40))
        value = int(rng.choice([0, 1, 2, 3, 255]))
        store[z, max(0, y - 3) : y + 3, max(0, x - 4) : x + 4] = value
        got = store.counts()
        assert (got.voxels, got.slices) == _full_counts(store)
    assert calls == []  # counts came from the painted boxes alone
    assert store.class_counts() == store.counts().voxels


def test_class_edits_keep_ids_and_removal_clears_voxels(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    store = AnnotationStore.create(path, shape=(8, 16, 16), classes=NAMES, chunks=(4, 8, 8))
    store[1, 0:4, 0:4] = 2
    store[2, 0:2, 0:2] = 3
    store[5, 8:10, 8:10] = 255
    store.save()
    assert store.add_class("crack").id == 4
    store[6, 0, 0:3] = 4
    store.rename_class(2, "sheet")
    store.recolor_class(3, (1, 2, 3))
    assert store[1, 0, 0] == 2  # renaming never repaints
    with pytest.raises(ScrollsegError, match=r"three values 0\.\.255"):
        store.recolor_class(1, (300, 0, 0))
    with pytest.raises(ScrollsegError, match="unique"):
        store.rename_class(1, "ink")
    assert store.remove_class(2) == 16  # sheet: its 16 voxels become unlabeled
    assert store.classes.names() == ["air", "ink", "crack"]
    assert store.classes.classes[1].color == (1, 2, 3)
    assert store[1, 0, 0] == 0
    assert store[2, 0, 0] == 2  # ink moved down from 3 to 2
    assert store[6, 0, 2] == 3  # crack from 4 to 3
    assert store[5, 8, 8] == 255  # ignore stays
    store.save()
    reopened = AnnotationStore.open(path)
    assert reopened.classes.names() == ["air", "ink", "crack"]
    assert reopened.counts().voxels == {2: 4, 3: 3, 255: 4}
    # the NGFF label metadata (what napari-ome-zarr shows) follows the table
    attrs = json.loads((path / ".zattrs").read_text())
    names = {p["label-value"]: p["class"] for p in attrs["image-label"]["properties"]}
    assert names == {1: "air", 2: "ink", 3: "crack", 255: "ignore"}


def test_otsu_start_fills_only_unlabeled_voxels_above_and_below(tmp_path: Path) -> None:
    image, _ = make_phantom((24, 64, 64), seed=1)
    store = AnnotationStore.create(tmp_path / "o.zarr", shape=image.shape, classes=NAMES)
    store[5:7, 10:20, 10:20] = 3
    store[6, 30:40, 30:40] = 255
    t = store.otsu_start(image, z=5, z_stop=8, threshold_from="volume", label=2, below=1)
    labels = store[:]
    for z in (5, 6, 7):
        free = np.ones((64, 64), bool)
        if z in (5, 6):
            free[10:20, 10:20] = False
        if z == 6:
            free[30:40, 30:40] = False
        assert np.array_equal(labels[z][free] == 2, image[z][free] > t)
        assert np.array_equal(labels[z][free] == 1, image[z][free] <= t)
    assert (labels[5:7, 10:20, 10:20] == 3).all()  # painted voxels kept
    assert (labels[6, 30:40, 30:40] == 255).all()
    assert not labels[:5].any()
    assert not labels[8:].any()
    with pytest.raises(ScrollsegError, match="class 9 is not in the table"):
        store.otsu_start(image, label=9)


def test_multi_otsu_fills_three_bands(tmp_path: Path) -> None:
    from napari_scrollseg.engine.annotations import volume_thresholds

    rng = np.random.default_rng(0)
    image = rng.choice([30, 120, 220], size=(8, 32, 32)).astype(np.uint8)
    image = (image + rng.integers(-10, 10, image.shape)).astype(np.uint8)
    store = AnnotationStore.create(tmp_path / "m.zarr", shape=image.shape, classes=NAMES)
    t = store.threshold_fill(image, bands=(1, 2, 3), z=2, z_stop=4)
    assert len(t) == 2
    assert 39 <= t[0] < 110 <= t[1] < 210  # anywhere in the gaps between the grey levels
    labels = store[2:4]
    np.testing.assert_array_equal(labels, np.digitize(image[2:4], t, right=True) + 1)
    assert volume_thresholds(image, 3) == t
    with pytest.raises(ScrollsegError, match="at least one of two"):
        store.threshold_fill(image, bands=(None, None))


def test_bad_store_locations_say_what_to_do(tmp_path: Path) -> None:
    not_a_store = tmp_path / "notes.zarr"
    not_a_store.write_text("hello")
    with pytest.raises(ScrollsegError, match="not a scrollseg annotation store"):
        AnnotationStore.open(not_a_store)
    store = AnnotationStore.create(tmp_path / "s.zarr", shape=(4, 4, 4), classes=NAMES)
    (store.path / ".zattrs").write_text("{broken json")
    with pytest.raises(ScrollsegError, match="damaged"):
        AnnotationStore.open(store.path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ScrollsegError, match="not a writable folder"):
        AnnotationStore.create(a_file / "a.zarr", shape=(4, 4, 4), classes=NAMES)


def test_read_only_store_locations_say_what_to_do(tmp_path: Path, read_only_dir: Path) -> None:
    with pytest.raises(ScrollsegError, match="not a writable folder"):
        AnnotationStore.create(read_only_dir / "a.zarr", shape=(4, 4, 4), classes=NAMES)
    store = AnnotationStore.create(tmp_path / "s.zarr", shape=(4, 4, 4), classes=NAMES)
    (store.path / "0").chmod(0o555)
    try:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders: the open check needs another user")
        with pytest.raises(ScrollsegError, match="is read-only"):
            AnnotationStore.open(store.path)
    finally:
        (store.path / "0").chmod(0o755)


def test_common_classes_must_agree(tmp_path: Path) -> None:
    from napari_scrollseg.engine.annotations import common_classes

    a = AnnotationStore.create(tmp_path / "a.zarr", shape=(4, 4, 4), classes=NAMES)
    b = AnnotationStore.create(tmp_path / "b.zarr", shape=(4, 4, 4), classes=NAMES)
    b.recolor_class(1, (9, 9, 9))
    assert common_classes([a, b]).names() == NAMES
    b.rename_class(3, "crack")
    with pytest.raises(ScrollsegError, match="disagree on their classes"):
        common_classes([a, b])
    with pytest.raises(ScrollsegError, match="at least one"):
        common_classes([])


def test_default_store_path_is_beside_the_volume() -> None:
    from napari_scrollseg.engine.annotations import default_store_path

    assert default_store_path("/data/scroll1.zarr") == Path("/data/scroll1.annotations.zarr")
    assert default_store_path("/data/s.ome.zarr/") == Path("/data/s.annotations.zarr")
    assert default_store_path("/data/slices") == Path("/data/slices.annotations.zarr")
