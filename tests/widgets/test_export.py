"""The export widget driven as a user would, in a real viewer (run under Xvfb)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dask.array as da
import numpy as np
from napari.utils.notifications import NotificationSeverity, notification_manager
from qtpy.QtCore import Qt, QTimer

from napari_scrollseg.engine.phantom import make_phantom
from napari_scrollseg.widgets._common import session
from napari_scrollseg.widgets.annotate import AnnotateWidget
from napari_scrollseg.widgets.export import ExportWidget

LEFT = Qt.MouseButton.LeftButton
SHAPE = (32, 64, 64)


def errors_since(n: int) -> list[str]:
    return [
        str(x.message)
        for x in notification_manager.records[n:]
        if x.severity == NotificationSeverity.ERROR
    ]


def _slow(block: np.ndarray) -> np.ndarray:
    time.sleep(0.02)
    return block


def annotated_pair(viewer, qtbot, tmp_path, name: str, *, paint: bool = True, slow: bool = False):
    """An image layer and a store painted through the Annotate widget."""
    image, _ = make_phantom(SHAPE, seed=len(viewer.layers))
    data = da.from_array(image, chunks=(1, 64, 64))  # one slab per slice
    if slow:
        data = data.map_blocks(_slow, dtype=data.dtype)
    viewer.add_image(data, name=name, scale=(2.0, 1.0, 1.0))
    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image_combo.setCurrentText(name)
    widget.path_edit.setText(str(tmp_path / f"{name}.annotations.zarr"))
    qtbot.mouseClick(widget.new_button, LEFT)
    layer = widget.layer
    if paint:
        layer.brush_size = 7
        layer.paint((10, 20, 20), 1)
        layer.paint((12, 40, 40), 2)
        layer.paint((12, 44, 44), 3)
        layer.paint((14, 30, 30), widget.store.ignore_value)
    return widget


def export_widget(viewer, out: Path, *, dataset_id: int = 11, name: str = "Test") -> ExportWidget:
    widget = ExportWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.out_edit.setText(str(out))
    widget.id_spin.setValue(dataset_id)
    widget.name_edit.setText(name)
    widget.margin_spin.setValue(4)
    widget.verify_check.setChecked(False)  # nnU-Net's check takes ~30 s: one test runs it
    return widget


def wait_idle(qtbot, widget: ExportWidget, timeout: int = 120_000) -> None:
    qtbot.waitUntil(lambda: widget.export_button.isEnabled(), timeout=timeout)


def test_export_gives_a_dataset_nnunet_accepts(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    annotated_pair(viewer, qtbot, tmp_path, "scan")
    widget = export_widget(viewer, tmp_path / "raw")
    qtbot.mouseClick(widget.add_pair_button, LEFT)
    assert widget.pair_table.rowCount() == 1
    assert widget.classes_label.text() == "air, papyrus, ink"
    widget.verify_check.setChecked(True)
    seen = []
    session().changed.connect(seen.append)
    # GUI stalls: a 10 ms timer keeps ticking while the export runs off thread
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.mouseClick(widget.export_button, LEFT)
    assert "1 case(s)" in widget.warning_label.text()  # the 5-fold warning, before exporting
    wait_idle(qtbot, widget)
    timer.stop()
    session().changed.disconnect(seen.append)
    gaps = np.diff(ticks)
    print(
        f"\nGUI timer during export+verify: {len(ticks)} ticks, longest gap {gaps.max() * 1000:.0f} ms"
    )
    assert widget.verdict.text() == "Dataset011_Test: nnU-Net's integrity check passed"
    dataset = tmp_path / "raw" / "Dataset011_Test"
    assert session().last_dataset == dataset
    assert "last_dataset" in seen
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "papyrus": 1, "ink": 2, "ignore": 3}
    assert meta["numTraining"] == 1
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [
        "Test_000.json",
        "Test_000.tif",
    ]
    import tifffile

    labels = tifffile.imread(dataset / "labelsTr" / "Test_000.tif")
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    # crop: class voxels on slices 10..12 (2D strokes) plus margin 4 per side
    assert labels.shape[0] == (12 - 10 + 1) + 2 * 4


def test_cancel_leaves_nothing_a_rerun_trusts(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    annotated_pair(viewer, qtbot, tmp_path, "slow", slow=True)
    out = tmp_path / "raw"
    widget = export_widget(viewer, out)
    qtbot.mouseClick(widget.add_pair_button, LEFT)
    qtbot.mouseClick(widget.export_button, LEFT)
    qtbot.waitUntil(lambda: widget.progress.bar.value() >= 2, timeout=30_000)
    qtbot.mouseClick(widget.progress.cancel_button, LEFT)
    wait_idle(qtbot, widget)
    assert widget.verdict.text() == "export cancelled: nothing written"
    assert widget.progress.status.text() == "cancelled"
    assert list(out.iterdir()) == []  # no dataset, no partial folder
    assert session().last_dataset != out / "Dataset011_Test"
    # the rerun exports the whole case
    qtbot.mouseClick(widget.export_button, LEFT)
    wait_idle(qtbot, widget)
    assert widget.verdict.text().startswith("wrote")
    assert [p.name for p in out.iterdir()] == ["Dataset011_Test"]
    dataset = out / "Dataset011_Test"
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 1
    import tifffile

    image = tifffile.imread(dataset / "imagesTr" / "Test_000_0000.tif")
    assert image.shape == tifffile.imread(dataset / "labelsTr" / "Test_000.tif").shape


# -- bad input: one clear message, nothing written -----------------------------------------
def _export_error(qtbot, widget: ExportWidget) -> str:
    n = len(notification_manager.records)
    qtbot.mouseClick(widget.export_button, LEFT)
    wait_idle(qtbot, widget)
    qtbot.waitUntil(lambda: len(errors_since(n)) >= 1, timeout=10_000)
    (msg,) = errors_since(n)
    return msg


def test_export_with_no_annotated_voxels(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    annotated_pair(viewer, qtbot, tmp_path, "empty", paint=False)
    widget = export_widget(viewer, tmp_path / "raw")
    qtbot.mouseClick(widget.add_pair_button, LEFT)
    assert "no annotated voxel" in _export_error(qtbot, widget)
    assert not (tmp_path / "raw" / "Dataset011_Test").exists()
    assert widget.verdict.text().startswith("export failed")


def test_classes_that_disagree_across_pairs(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    annotated_pair(viewer, qtbot, tmp_path, "one")
    widget = export_widget(viewer, tmp_path / "raw")
    qtbot.mouseClick(widget.add_pair_button, LEFT)
    second = annotated_pair(viewer, qtbot, tmp_path, "two")
    second.rename_class(3, "crack")
    qtbot.mouseClick(widget.add_pair_button, LEFT)
    assert widget.pair_table.rowCount() == 2
    assert "disagree on their classes" in widget.classes_label.text()
    assert "disagree on their classes" in _export_error(qtbot, widget)
    assert not (tmp_path / "raw").exists()


def test_dataset_id_taken_without_append(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    annotated_pair(viewer, qtbot, tmp_path, "scan")
    (tmp_path / "raw" / "Dataset011_Other").mkdir(parents=True)
    widget = export_widget(viewer, tmp_path / "raw")
    qtbot.mouseClick(widget.add_pair_button, LEFT)
    assert "dataset ID 11 is already used by Dataset011_Other" in _export_error(qtbot, widget)
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["Dataset011_Other"]


def test_output_folder_not_writable(make_napari_viewer, qtbot, tmp_path, read_only_dir):
    viewer = make_napari_viewer()
    annotated_pair(viewer, qtbot, tmp_path, "scan")
    widget = export_widget(viewer, read_only_dir)
    qtbot.mouseClick(widget.add_pair_button, LEFT)
    assert "is not writable; choose another nnU-Net raw folder" in _export_error(qtbot, widget)


def test_append_adds_cases(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    annotated_pair(viewer, qtbot, tmp_path, "scan")
    widget = export_widget(viewer, tmp_path / "raw")
    qtbot.mouseClick(widget.add_pair_button, LEFT)
    qtbot.mouseClick(widget.export_button, LEFT)
    wait_idle(qtbot, widget)
    assert "already exists; append" in _export_error(qtbot, widget)
    widget.append_check.setChecked(True)
    qtbot.mouseClick(widget.export_button, LEFT)
    assert "2 case(s)" in widget.warning_label.text()
    wait_idle(qtbot, widget)
    assert widget.verdict.text().startswith("wrote")
    dataset = tmp_path / "raw" / "Dataset011_Test"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    assert sorted(p.name for p in (dataset / "imagesTr").glob("*.tif")) == [
        "Test_000_0000.tif",
        "Test_001_0000.tif",
    ]
