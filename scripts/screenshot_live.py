"""Screenshots of the live inference and full-run widgets in use (rerunnable).

Run under a display or Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_live.py

Writes ``docs/images/live-inference.png``, ``docs/images/live-preview.png`` and
``docs/images/full-run.png``: the phantom with the built-in model's live answer on the
view (CPU, no mirroring), then zoomed out past a small tile cap (the coarse preview on
pyramid level 1), then a full run over a box drawn as a Shapes rectangle, its output
opened as layers.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"


def wait(app, until, timeout: float = 900) -> None:
    t0 = time.perf_counter()
    while not until():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("gave up waiting")
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)


def main() -> None:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_scrollseg.engine.builtin import builtin_model
    from napari_scrollseg.engine.phantom import SPACING, write_phantom
    from napari_scrollseg.widgets._view import camera_of
    from napari_scrollseg.widgets.full_run import FullRunWidget
    from napari_scrollseg.widgets.live import LiveWidget

    work = Path(tempfile.mkdtemp(prefix="scrollseg-shots-"))
    phantom = write_phantom(work / "phantom.zarr")
    s = SPACING[0]
    viewer = napari.Viewer(title="napari-scrollseg: live inference")
    viewer.window.resize(1500, 950)
    viewer.open(phantom, plugin="napari-scrollseg")
    viewer.layers["truth"].visible = False
    app = QApplication.instance()

    live = LiveWidget(viewer)
    viewer.window.add_dock_widget(live, name="Live inference", area="right")
    live.model.value = str(builtin_model())
    live.device.value = "cpu"
    live.mirror.value = False
    live.max_tiles.value = 200
    loading = live.load_model()  # the model loads; the two result layers are added
    wait(app, lambda: live.finished is loading and live.layers_ready)
    viewer.dims.set_point(0, 15 * s)  # the slice with the most ink
    camera_of(viewer).center = (15 * s, 64 * s, 64 * s)
    camera_of(viewer).zoom = min(viewer.canvas.size) / (110 * s)
    req = live.predict_view()
    wait(app, lambda: live.finished is req)
    IMAGES.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(IMAGES / "live-inference.png"), canvas_only=False)
    # zoomed out past a small tile cap: the coarse preview on pyramid level 1
    live.max_tiles.value = 8
    viewer.dims.set_point(0, 20 * s)  # 18 tiles at level 0 (9 not cached yet): over the cap
    camera_of(viewer).center = (20 * s, 64 * s, 64 * s)
    camera_of(viewer).zoom = min(viewer.canvas.size) / (140 * s)
    req = live.predict_view()
    wait(app, lambda: live.finished is req)
    viewer.screenshot(str(IMAGES / "live-preview.png"), canvas_only=False)
    live.close_predictor()

    viewer.window.remove_dock_widget("all")
    for name in ("live probability", "live labels"):
        viewer.layers.remove(name)
    full = FullRunWidget(viewer)
    viewer.window.add_dock_widget(full, name="Full run", area="right")
    full.model.value = str(builtin_model())
    full.device.value = "cpu"
    full.mirror.value = False
    full.chunk.value = 32
    corners = np.array([[30, 0, 0], [30, 0, 64], [30, 64, 64], [30, 64, 0]]) * s
    viewer.add_shapes([corners], shape_type="rectangle", edge_color="yellow", face_color=[0] * 4)
    full.roi.value = "shapes: Shapes"
    full.output.value = work / "prediction.zarr"
    full.start()
    wait(app, lambda: full.worker is None and not full.opening)
    viewer.screenshot(str(IMAGES / "full-run.png"), canvas_only=False)
    print(f"wrote {IMAGES / 'live-inference.png'} and {IMAGES / 'full-run.png'}")
    viewer.close()


if __name__ == "__main__":
    main()
