"""Screenshots of the view widget on the phantom and its prediction (rerunnable).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_view.py

Writes docs/images/view-widget.png (2D: curved scan, papyrus/ink composite boosted),
docs/images/view-3d.png (the reader's 3D defaults) and docs/images/view-export.png
(the widget's "Save view as PNG" of the composite). The phantom and its prediction
by the built-in model are made once under --work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scrollseg-screenshots"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    from napari_scrollseg.engine.builtin import builtin_model
    from napari_scrollseg.engine.phantom import write_phantom
    from napari_scrollseg.engine.predict_volume import predict_volume

    scan = args.work / "phantom.zarr"
    if not scan.exists():
        write_phantom(scan, seed=0)
    pred = args.work / "prediction.zarr"
    if not (pred / "labels").exists():
        predict_volume(builtin_model(), scan, pred, device="cpu", mirror=False, overwrite=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_scrollseg.widgets.view import ViewWidget

    viewer = napari.Viewer(title="scrollseg: view")
    viewer.window._qt_window.resize(1500, 950)
    scan_layers = viewer.open(scan, plugin="napari-scrollseg")
    pred_layers = viewer.open(pred, plugin="napari-scrollseg")
    image = scan_layers[0]
    for layer in [*scan_layers[1:], *pred_layers]:
        layer.visible = False
    widget = ViewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="View", area="right")
    widget.scan_layer.value = image
    widget.curve.value = True
    widget.apply_scan.clicked()
    while widget.scan_worker is not None:  # the percentile sample is read in a thread
        QApplication.processEvents()
        time.sleep(0.02)
    probs = [layer for layer in pred_layers if layer._type_string == "image"]
    print("probability layers:", [layer.name for layer in probs])
    widget.maps.value = probs[1:]  # papyrus and ink (the phantom's ink is a few patches)
    widget.mode.value = "max"
    widget.boost.value = 1.5
    widget.colormap.value = "magma"
    widget.opacity.value = 0.6
    widget.apply_overlay.clicked()
    while widget.overlay_worker is not None:  # the maps' maxima are read in a thread
        QApplication.processEvents()
        time.sleep(0.02)
    # the slice with the most ink
    import numpy as np

    ink = probs[-1].data[0] if probs[-1].multiscale else probs[-1].data
    z = int(np.asarray((ink >= 128).sum(axis=(1, 2))).argmax())
    print("slice with the most ink:", z)
    viewer.dims.set_current_step(0, z)
    viewer.reset_view()
    viewer.scene.camera.zoom *= 1.3
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(args.out / "view-widget.png", canvas_only=False)
    widget.save_layer.value = viewer.layers["composite"]
    print("saved", widget.save(args.out / "view-export.png"))

    # 3D: the reader's defaults (attenuated MIP, air transparent in the truth labels)
    viewer.layers["composite"].visible = False
    image.visible = True
    truth = next((layer for layer in scan_layers if layer.name == "truth"), None)
    if truth is not None:
        truth.visible = True
        truth.opacity = 0.6
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    viewer.scene.camera.angles = (0, 35, 60)
    viewer.scene.camera.zoom *= 0.9
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(args.out / "view-3d.png", canvas_only=True)
    print("wrote", args.out / "view-widget.png", args.out / "view-3d.png")
    viewer.close()


if __name__ == "__main__":
    main()
