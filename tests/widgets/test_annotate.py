"""The annotate widget driven as a user would, in a real viewer (run under Xvfb)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QMessageBox

from napari_scrollseg.engine.annotations import AnnotationStore
from napari_scrollseg.engine.phantom import AIR, PAPYRUS
from napari_scrollseg.widgets.annotate import IGNORE, AnnotateWidget

PLUGIN = "napari-scrollseg"
LEFT = Qt.MouseButton.LeftButton


def errors_since(n: int) -> list[str]:
    return [
        str(x.message)
        for x in notification_manager.records[n:]
        if x.severity == NotificationSeverity.ERROR
    ]


@pytest.fixture
def phantom_copy(phantom_zarr, tmp_path) -> Path:
    """A private copy of the phantom (its default store goes beside it)."""
    path = tmp_path / "phantom.zarr"
    shutil.copytree(phantom_zarr, path)
    return path


def open_widget(viewer, qtbot, volume: Path) -> AnnotateWidget:
    viewer.open(volume, plugin=PLUGIN)
    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return widget


def _chunk_files(store_path: Path) -> set[str]:
    root = store_path / "0"
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_paint_autosave_close_and_resume(make_napari_viewer, qtbot, phantom_copy):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, phantom_copy)
    assert widget.image_combo.currentText() == "phantom"
    store_path = phantom_copy.with_name("phantom.annotations.zarr")
    assert Path(widget.path_edit.text()) == store_path  # default: beside the volume
    qtbot.mouseClick(widget.new_button, LEFT)
    layer = widget.layer
    assert layer is not None
    assert isinstance(layer.data, AnnotationStore)
    image = viewer.layers["phantom"]
    np.testing.assert_allclose(layer.scale, image.scale)
    assert _chunk_files(store_path) == set()  # creating writes no chunk

    # stroke 1 with class 2, through the layer's own paint API, then autosave
    widget.autosave_spin.setValue(1)
    widget.select_brush(2)
    layer.brush_size = 5
    layer.paint((10, 40, 40), layer.selected_label)
    assert widget.save_status.text() == "unsaved changes"
    qtbot.waitUntil(lambda: widget.save_status.text().startswith("saved"), timeout=5000)
    assert _chunk_files(store_path) == {"0/0/0"}  # only the touched chunk
    assert "papyrus: 21" in widget.counts_label.text()

    # a rename and stroke 2 with ignore, then quit without waiting for the autosave
    widget.autosave_spin.setValue(3600)
    widget.table.item(0, 1).setText("matrix")
    widget.select_brush(IGNORE)
    layer.paint((20, 100, 100), layer.selected_label)
    assert widget.save_status.text() == "unsaved changes"
    viewer.close()

    viewer2 = make_napari_viewer()
    widget2 = open_widget(viewer2, qtbot, phantom_copy)
    assert Path(widget2.path_edit.text()) == store_path
    assert "Open resumes it" in widget2.store_status.text()
    qtbot.mouseClick(widget2.open_button, LEFT)
    store = widget2.store
    assert store.classes.names() == ["matrix", "papyrus", "ink"]
    assert store[10, 40, 40] == 2
    assert store[20, 100, 100] == 255
    assert store.counts().voxels == {2: 21, 255: 21}
    assert widget2.table.item(0, 1).text() == "matrix"
    items = [widget2.slice_list.item(i).text() for i in range(widget2.slice_list.count())]
    assert items == ["z = 10", "z = 20"]
    # clicking an annotated slice jumps there
    widget2.slice_list.itemClicked.emit(widget2.slice_list.item(1))
    assert round(widget2.layer.world_to_data(viewer2.dims.point)[0]) == 20


def test_class_table_edits_drive_colours_names_and_brushes(
    make_napari_viewer, qtbot, phantom_copy, monkeypatch, tmp_path
):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, phantom_copy)
    qtbot.mouseClick(widget.new_button, LEFT)
    layer = widget.layer
    widget.add_edit.setText("crack")
    qtbot.mouseClick(widget.add_button, LEFT)
    assert widget.table.rowCount() == 4
    assert widget.table.item(3, 1).text() == "crack"
    widget.recolor_class(4, (10, 200, 30))
    np.testing.assert_allclose(
        layer.colormap.map(np.array([4]))[0][:3], [10 / 255, 200 / 255, 30 / 255], atol=1e-6
    )
    widget.table.item(2, 1).setText("ink-sheet")
    assert layer.get_status((0, 0, 0))["value"].endswith("class: unlabeled")
    assert list(layer.features["class"]) == [
        "unlabeled",
        "air",
        "papyrus",
        "ink-sheet",
        "crack",
        "ignore",
    ]
    assert [b.text() for b in widget.brushes.buttons()] == [
        "air",
        "papyrus",
        "ink-sheet",
        "crack",
        "ignore",
        "eraser",
    ]

    # keyboard through napari's keybinding dispatch: 1..9, I, E
    keys = viewer.window._qt_viewer._key_map_handler
    viewer.layers.selection.active = layer
    keys.press_key("4")
    assert layer.selected_label == 4
    keys.press_key("I")
    assert layer.selected_label == 255
    keys.press_key("E")
    assert layer.selected_label == 0
    keys.press_key("3")
    layer.paint((5, 10, 10), layer.selected_label)
    assert widget.store[5, 10, 10] == 3
    layer.undo()  # napari's undo goes through the store
    assert widget.store[5, 10, 10] == 0
    layer.redo()
    assert widget.store[5, 10, 10] == 3

    # removing a painted class asks first; No keeps it, Yes clears its voxels
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    assert not widget.remove_class(3)
    assert widget.store[5, 10, 10] == 3
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    widget.table.setCurrentCell(2, 1)
    qtbot.mouseClick(widget.remove_button, LEFT)
    assert widget.store.classes.names() == ["air", "papyrus", "crack"]
    assert widget.store[5, 10, 10] == 0
    np.testing.assert_allclose(
        layer.colormap.map(np.array([3]))[0][:3], [10 / 255, 200 / 255, 30 / 255], atol=1e-6
    )

    # class table JSON round trip (the seeds' {name: {id, colour}} form)
    out = tmp_path / "classes.json"
    widget.export_classes(out)
    assert json.loads(out.read_text())["crack"] == {"id": 3, "color": [10, 200, 30]}
    seed_table = tmp_path / "seed.json"
    seed_table.write_text(
        json.dumps(
            {
                "ToPredict": {"id": 0},
                "matrix": {"id": 1, "color": [1, 2, 3]},
                "root": {"id": 2, "color": [4, 5, 6]},
                "pore": {"id": 3, "color": [7, 8, 9]},
            }
        )
    )
    widget.import_classes(seed_table)
    assert widget.store.classes.names() == ["matrix", "root", "pore"]
    assert widget.table.item(1, 1).text() == "root"


def test_otsu_start_fills_only_unlabeled_voxels(make_napari_viewer, qtbot, phantom_copy):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, phantom_copy)
    qtbot.mouseClick(widget.new_button, LEFT)
    layer = widget.layer
    widget.select_brush(3)
    layer.brush_size = 9
    layer.paint((30, 64, 64), 3)  # ink stroke, must survive
    before = widget.store[30].copy()
    widget.above_combo.setCurrentIndex(PAPYRUS)  # class 2 above the threshold
    widget.below_combo.setCurrentIndex(AIR)  # class 1 below
    widget.z_from.setValue(30)
    widget.z_to.setValue(31)
    qtbot.mouseClick(widget.otsu_button, LEFT)
    qtbot.waitUntil(lambda: not widget.otsu_progress.running, timeout=20_000)
    qtbot.waitUntil(lambda: widget.otsu_button.isEnabled(), timeout=5000)
    labels = widget.store[:]
    image = np.asarray(viewer.layers["phantom"].data[0])
    painted = before == 3
    assert painted.sum() > 20
    assert (labels[30][painted] == 3).all()  # painted voxels never overwritten
    for z in (30, 31):
        free = ~painted if z == 30 else np.ones_like(painted)
        got = labels[z][free]
        assert set(np.unique(got)) == {1, 2}
        bright = image[z][free][got == 2].min()
        dark = image[z][free][got == 1].max()
        assert bright > dark  # one threshold splits them
    assert not labels[:30].any()
    assert not labels[32:].any()
    assert "z = 31" in [widget.slice_list.item(i).text() for i in range(widget.slice_list.count())]

    # multi-Otsu: a class in the middle band makes three bands
    widget.middle_combo.setCurrentIndex(PAPYRUS)
    widget.above_combo.setCurrentIndex(3)  # ink brightest
    widget.z_from.setValue(40)
    widget.z_to.setValue(40)
    qtbot.mouseClick(widget.otsu_button, LEFT)
    qtbot.waitUntil(lambda: widget.otsu_button.isEnabled(), timeout=20_000)
    z40 = widget.store[40]
    assert set(np.unique(z40)) == {1, 2, 3}
    means = [image[40][z40 == c].mean() for c in (1, 2, 3)]
    assert means == sorted(means)  # dark, middle, bright bands in order


# -- bad input: one clear message, nothing half-done ---------------------------------------
def test_store_of_another_shape_is_refused(make_napari_viewer, qtbot, phantom_copy, tmp_path):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, phantom_copy)
    other = AnnotationStore.create(tmp_path / "other.zarr", shape=(8, 8, 8), classes=["a", "b"])
    widget.path_edit.setText(str(other.path))
    n = len(notification_manager.records)
    qtbot.mouseClick(widget.open_button, LEFT)
    (msg,) = errors_since(n)
    assert "has shape (8, 8, 8) but image 'phantom' has (64, 128, 128)" in msg
    assert widget.store is None
    assert [layer.name for layer in viewer.layers] == ["phantom", "truth"]


@pytest.mark.parametrize("kind", ["file", "corrupt"])
def test_a_store_that_is_not_one_is_refused(
    make_napari_viewer, qtbot, phantom_copy, tmp_path, kind
):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, phantom_copy)
    path = tmp_path / "bad.zarr"
    if kind == "file":
        path.write_text("not a store")
    else:
        AnnotationStore.create(path, shape=(64, 128, 128), classes=["a", "b"])
        (path / ".zattrs").write_text("{truncated")
    widget.path_edit.setText(str(path))
    n = len(notification_manager.records)
    qtbot.mouseClick(widget.open_button, LEFT)
    (msg,) = errors_since(n)
    assert "is not a scrollseg annotation store" in msg
    assert widget.store is None
    assert len(viewer.layers) == 2


def test_read_only_store_location_is_refused(
    make_napari_viewer, qtbot, phantom_copy, read_only_dir
):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, phantom_copy)
    widget.path_edit.setText(str(read_only_dir / "a.annotations.zarr"))
    n = len(notification_manager.records)
    qtbot.mouseClick(widget.new_button, LEFT)
    (msg,) = errors_since(n)
    assert "is not a writable folder; choose another path" in msg
    assert widget.store is None
    assert not (read_only_dir / "a.annotations.zarr").exists()


def test_a_2d_image_is_refused(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint8), name="photo")
    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.image_combo.count() == 0  # 2D images are not offered
    widget.path_edit.setText(str(tmp_path / "x.zarr"))
    n = len(notification_manager.records)
    qtbot.mouseClick(widget.new_button, LEFT)
    (msg,) = errors_since(n)
    assert "no 3D image layer" in msg
    assert not (tmp_path / "x.zarr").exists()


def test_removing_the_layer_or_switching_store_saves(
    make_napari_viewer, qtbot, phantom_copy, tmp_path
):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, phantom_copy)
    qtbot.mouseClick(widget.new_button, LEFT)
    first = widget.store.path
    widget.layer.paint((3, 10, 10), 2)
    widget.path_edit.setText(str(tmp_path / "second.zarr"))
    qtbot.mouseClick(widget.new_button, LEFT)  # switching stores saves the first one
    assert AnnotationStore.open(first)[3, 10, 10] == 2
    assert [layer.name for layer in viewer.layers].count("phantom annotations") == 1
    widget.layer.paint((4, 20, 20), 3)
    viewer.layers.remove(widget.layer)  # removing the layer saves too
    assert widget.store is None
    assert AnnotationStore.open(tmp_path / "second.zarr")[4, 20, 20] == 3
    assert widget.table.rowCount() == 0
