"""Screenshots of the annotate and export widgets in use on the phantom (rerunnable).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_annotate.py

Writes the phantom under --work (as `scrollseg phantom` does), opens it, creates its
annotation store from the Annotate widget, fills one slice from Otsu (papyrus above,
air below), paints ink and ignore strokes, and exports the pair from the Export widget
with nnU-Net's integrity check. Writes docs/images/annotate-widget.png and
docs/images/export-widget.png.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait(app, done, timeout: float = 300) -> None:
    end = time.perf_counter() + timeout
    while not done() and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scrollseg-screenshots-annotate"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    from napari_scrollseg.engine.phantom import INK, write_phantom

    volume = write_phantom(args.work / "phantom.zarr")

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_scrollseg.widgets.annotate import IGNORE, AnnotateWidget
    from napari_scrollseg.widgets.export import ExportWidget

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(title="scrollseg: annotate and export")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open(volume, plugin="napari-scrollseg")
    viewer.layers["truth"].visible = False
    annotate = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(annotate, name="Annotate", area="right")
    annotate.new_button.click()
    z = 32
    viewer.dims.set_point(0, viewer.layers["phantom"].data_to_world([z, 0, 0])[0])
    annotate.above_combo.setCurrentIndex(2)  # papyrus: the bright band
    annotate.below_combo.setCurrentIndex(1)  # air: the dark band
    annotate.z_from.setValue(z)
    annotate.z_to.setValue(z)
    annotate.otsu_button.click()
    _wait(app, lambda: annotate.otsu_button.isEnabled())
    # an ink stroke where the truth has ink (Otsu left those voxels to papyrus/air, so
    # erase a patch first, then paint), and an ignore stroke on another slice
    truth = viewer.layers["truth"].data[0]
    ys, xs = (truth[z].compute() == INK).nonzero()
    layer = annotate.layer
    layer.brush_size = 6
    annotate.select_brush(0)
    for y, x in list(zip(ys, xs))[:: max(1, len(ys) // 12)]:
        layer.paint((z, y, x), 0)
    annotate.select_brush(INK)
    for y, x in list(zip(ys, xs))[:: max(1, len(ys) // 40)]:
        layer.paint((z, y, x), INK)
    annotate.select_brush(IGNORE)
    layer.paint((z, 20, 100), layer.selected_label)
    layer.paint((z, 24, 104), layer.selected_label)
    annotate.select_brush(INK)
    annotate.save()
    viewer.layers.selection.active = layer
    for _ in range(30):
        app.processEvents()
    viewer.screenshot(args.out / "annotate-widget.png", canvas_only=False)
    print("wrote", args.out / "annotate-widget.png")

    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export, name="Export dataset", area="right", tabify=True)
    export.out_edit.setText(str(args.work / "nnUNet_raw"))
    export.id_spin.setValue(901)
    export.name_edit.setText("Phantom")
    export.margin_spin.setValue(8)
    export.add_pair_button.click()
    export.export_button.click()
    _wait(app, lambda: export.export_button.isEnabled())
    print("export:", export.verdict.text())
    for _ in range(30):
        app.processEvents()
    viewer.screenshot(args.out / "export-widget.png", canvas_only=False)
    print("wrote", args.out / "export-widget.png")
    viewer.close()


if __name__ == "__main__":
    main()
