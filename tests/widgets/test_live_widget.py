"""The live inference widget in a real viewer (Xvfb), driven as a user would.

The built-in model on the phantom, without mirroring (seconds per request on a CPU).
Tests measure the gaps between ticks of a 10 ms QTimer (tests/widgets/_stall.py) and
print them: the wall time (on a loaded 2-core box the timer alone is late by 100+ ms, so
it is reported, not asserted) and the GUI thread's own CPU time in each gap, which must
stay under the issue's 100 ms. The gaps in which napari adds the two result layers
(once per widget: napari's add_layer builds a vispy visual, overlays and Qt controls) are
kept apart, printed and bounded separately (ADD_LAYER_CPU_S).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_scrollseg.engine.builtin import builtin_model
from napari_scrollseg.engine.phantom import SPACING
from napari_scrollseg.widgets._view import camera_of
from napari_scrollseg.widgets.live import LABELS_LAYER, PROB_LAYER, LiveWidget
from tests.widgets._stall import ADD_LAYER_CPU_S, TARGET_S, StallMeter

PLUGIN = "napari-scrollseg"
S = SPACING[0]


@pytest.fixture
def live(make_napari_viewer, phantom_zarr: Path, qtbot):
    import torch

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    viewer.open(phantom_zarr, plugin=PLUGIN)
    widget = LiveWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image.value = "phantom"
    widget.model.value = str(builtin_model())
    widget.device.value = "cpu"
    widget.mirror.value = False
    widget.max_tiles.value = 1000
    yield viewer, widget
    widget.close_predictor()


def look_at(viewer, z: int, y: float, x: float, extent_voxels: float) -> None:
    """A 2D view of slice ``z`` centred on voxel (y, x), ``extent_voxels`` across."""
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, z * S)
    camera_of(viewer).center = (z * S, y * S, x * S)
    camera_of(viewer).zoom = max(viewer.canvas.size) / (extent_voxels * S)


def run(qtbot, widget, timeout_s: float = 300):
    req = widget.predict_view()
    assert req is not None
    qtbot.waitUntil(lambda: widget.finished is req, timeout=timeout_s * 1000)
    return req


def test_predict_view_equals_the_full_run_and_never_stalls(live, qtbot, tmp_path) -> None:
    from napari_scrollseg.engine.predict import predict_volume

    viewer, widget = live
    look_at(viewer, 50, 60, 70, 40)
    load = StallMeter(viewer)
    loading = widget.load_model()  # loads the model, then adds the two (empty) result layers
    qtbot.waitUntil(lambda: widget.finished is loading and widget.layers_ready, timeout=300_000)
    qtbot.wait(100)
    load.stop()
    assert loading.error is None
    cold = StallMeter(viewer)
    run(qtbot, widget)  # cold: the first forward passes, the layers re-pointed
    cold.stop()
    look_at(viewer, 20, 60, 70, 40)
    meter = StallMeter(viewer)
    req = run(qtbot, widget)  # new tiles, the layers re-pointed at the new box
    qtbot.wait(100)
    meter.stop()
    for what, m in (("model load", load), ("request, cold", cold), ("request, warm", meter)):
        print(f"\nlive {what}: {m.report()}; own {m.own * 1000:.0f} ms")
    assert req.error is None
    assert req.box[0] == slice(20, 21)  # the slice on screen
    h, w = (b.stop - b.start for b in req.box[1:])
    shown = np.asarray(viewer.canvas.size) / camera_of(viewer).zoom / S  # voxels on screen
    assert abs(h - shown[0]) <= 2
    assert abs(w - shown[1]) <= 2
    prob, labels = viewer.layers[PROB_LAYER], viewer.layers[LABELS_LAYER]
    # placed over the scan: the layer's voxel (0, 0, 0) is the box's first voxel
    np.testing.assert_allclose(prob.scale, SPACING)
    np.testing.assert_allclose(labels.translate, [b.start * S for b in req.box])
    assert prob.data.shape == labels.data.shape == (1, h, w)
    # equal to the full run on the same voxels
    out = tmp_path / "full.zarr"
    roi = [(b.start, b.stop) for b in req.box]
    predict_volume(builtin_model(), viewer.layers["phantom"].metadata["source"], out,
                   roi=roi, mirror=False, device="cpu", bar=False)  # fmt: skip
    g = zarr.open_group(str(out), mode="r")
    ink = list(widget.show_class.choices).index(widget.show_class.value)
    assert np.abs(np.asarray(prob.data) - g["0"][ink] / 255).max() <= 1 / 255
    assert (np.asarray(labels.data) == g["labels/prediction/0"][:]).mean() == 1.0
    # the annotation's classes by name; the background (class 1, air) see-through, as a
    # prediction opened from a file, so the scan shows under the other classes
    assert list(labels.features["class"]) == ["unlabeled", "air", "papyrus", "ink"]
    rgba = np.asarray(labels.colormap.map(np.array([1, 2, 3])))
    assert rgba[0, 3] == 0
    assert (rgba[1:, 3] > 0).all()
    assert "tiles run" in widget.timing.value
    # the layers are added when the model loads, one per event-loop turn; requests add none
    assert len(load.add_layer_gaps) == 2, load.summary()
    assert max(c for _, c in load.add_layer_gaps) < ADD_LAYER_CPU_S, load.report()
    assert load.longest_cpu < TARGET_S, load.report()
    assert not cold.add_layer_gaps, cold.summary()
    assert cold.longest_cpu < TARGET_S, cold.report()
    assert not meter.add_layer_gaps  # the layers are re-pointed, not re-added
    assert meter.longest_cpu < TARGET_S, meter.report()


def test_pan_away_and_back_runs_no_new_forward_pass(live, qtbot) -> None:
    viewer, widget = live
    look_at(viewer, 20, 15, 15, 28)  # a corner: tiles starting at 0 only
    first = run(qtbot, widget)
    look_at(viewer, 20, 113, 113, 28)  # the opposite corner: other tiles
    away = run(qtbot, widget)
    assert away.tiles_run > 0
    before = widget.predictor.forward_passes
    look_at(viewer, 20, 15, 15, 28)
    back = run(qtbot, widget)
    assert widget.predictor.forward_passes == before  # the session's counter
    assert back.tiles_run == 0
    assert back.tiles_cached == back.tiles == first.tiles
    assert f"from cache {back.tiles}" in widget.timing.value


def test_moving_the_view_mid_request_cancels_the_rest(live, qtbot) -> None:
    viewer, widget = live
    look_at(viewer, 50, 64, 64, 130)  # the whole slice: 9 tiles, 4 blocks
    meter = StallMeter(viewer)
    req = widget.predict_view()
    qtbot.waitUntil(lambda: req.blocks_done >= 1, timeout=300_000)
    look_at(viewer, 50, 20, 20, 20)  # pan to a corner: the other blocks left the view
    qtbot.waitUntil(lambda: req.done, timeout=300_000)
    meter.stop()
    print(f"\ncancelled live request: {meter.summary()}")
    assert meter.longest_cpu < TARGET_S, meter.report()
    assert req.tiles_run < req.tiles
    assert req.blocks_done < req.blocks_total


def test_bad_model_gives_one_message_and_the_viewer_stays_usable(live, qtbot, tmp_path) -> None:
    viewer, widget = live
    bad = tmp_path / "model.zip"
    bad.write_bytes(b"not a zip")
    widget.model_path.value = bad
    assert widget.model.value == str(bad)
    look_at(viewer, 20, 60, 60, 40)
    req = run(qtbot, widget)
    assert req.error is not None
    assert "not a zip" in str(req.error)
    assert widget.status.value == "failed"
    # the viewer still works: the built-in model predicts the same view
    widget.model.value = str(builtin_model())
    assert run(qtbot, widget).error is None


def test_remote_volume_that_stops_answering(make_napari_viewer, phantom_zarr, qtbot, monkeypatch):
    """One clear message, the viewer stays usable, and predicts once the server is back."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    from tests.http_server import VolumeServer

    monkeypatch.setenv("SCROLLSEG_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("SCROLLSEG_HTTP_RETRIES", "1")
    server, widget = VolumeServer(phantom_zarr.parent), None
    try:
        viewer = make_napari_viewer()
        viewer.open(server.url(phantom_zarr.name), plugin=PLUGIN)
        widget = LiveWidget(viewer)
        viewer.window.add_dock_widget(widget)
        widget.image.value = viewer.layers[0].name
        widget.model.value = str(builtin_model())
        widget.device.value = "cpu"
        widget.mirror.value = False
        look_at(viewer, 30, 60, 60, 30)
        qtbot.wait(200)  # napari reads the slice on screen
        server.stall()  # the remote volume stops answering
        n = len(notification_manager.records)
        meter = StallMeter(viewer)
        req = run(qtbot, widget, timeout_s=120)
        meter.stop()
        errors = [
            r.message
            for r in notification_manager.records[n:]
            if r.severity == NotificationSeverity.ERROR
        ]
        assert req.error is not None
        assert errors == [str(req.error)], errors  # one message
        assert "no answer within 1 s" in errors[0], errors
        assert server.url(phantom_zarr.name) in errors[0], errors
        assert widget.status.value == "failed"
        assert meter.longest_cpu < TARGET_S, meter.report()  # the wait was off the GUI thread
        server.resume()
        assert run(qtbot, widget).error is None  # usable: the same view predicts
        assert LABELS_LAYER in viewer.layers
    finally:
        if widget is not None:
            widget.close_predictor()
        server.kill()


def test_3d_view_requests_the_visible_box(live, qtbot) -> None:
    """Zoomed in on the centre of a 3D view: the box under the field of view, every voxel
    along the view direction; zoomed out: the whole volume."""
    from napari_scrollseg.widgets._view import view_box

    viewer, widget = live
    viewer.dims.ndisplay = 3
    camera = camera_of(viewer)
    camera.center = (32 * S, 64 * S, 64 * S)
    camera.zoom = min(viewer.canvas.size) / (20 * S)  # 20 voxels across the short side
    low, high, plane = view_box(viewer)
    assert plane is None
    shape = np.array([64, 128, 128])
    along = int(np.argmax(np.abs(camera.view_direction)))  # the axis the camera looks down
    across = [a for a in range(3) if a != along]
    size = (np.asarray(high) - np.asarray(low)) / S
    assert size[along] >= shape[along] - 1  # the whole depth
    assert all(20 <= size[a] < shape[a] / 2 for a in across), size  # the field of view
    assert all(lo <= c <= hi for lo, c, hi in zip(low, camera.center, high))
    req = widget.predict_view()
    qtbot.waitUntil(lambda: req.done, timeout=300_000)
    assert req.error is None
    assert req.box[along] == slice(0, shape[along])
    assert all(20 <= req.box[a].stop - req.box[a].start < shape[a] / 2 for a in across)
    camera.zoom = min(viewer.canvas.size) / (400 * S)  # zoomed out: all of it
    low, high, _ = view_box(viewer)
    np.testing.assert_allclose((np.asarray(high) - np.asarray(low)) / S, shape)


def test_zoomed_out_on_a_pyramid_shows_a_coarse_preview(live, qtbot) -> None:
    """The phantom is an OME-Zarr pyramid (64 x 128 x 128 and 32 x 64 x 64). Zoomed out
    past the tile cap, the widget shows the engine's preview on level 1, placed at that
    level's scale and origin and labelled as a preview; zoomed in, the exact level 0."""
    viewer, widget = live
    assert viewer.layers["phantom"].multiscale
    widget.max_tiles.value = 8
    look_at(viewer, 20, 64, 64, 260)  # the whole slice: 18 tiles at level 0, 1 at level 1
    whole = run(qtbot, widget)
    assert whole.error is None
    assert (whole.level, whole.exact, whole.tiles) == (1, False, 1)
    prob, labels = viewer.layers[PROB_LAYER], viewer.layers[LABELS_LAYER]
    np.testing.assert_allclose(prob.scale, [2 * S] * 3)
    # a level-1 voxel pools level-0 voxels 2i and 2i+1: its centre is S/2 further on
    np.testing.assert_allclose(labels.translate, [S / 2 + b.start * 2 * S for b in whole.box])
    assert whole.box[0] == slice(10, 11)  # level-0 slice 20
    assert labels.data.shape == (1, 64, 64)
    assert "coarse preview on pyramid level 1" in widget.status.value
    look_at(viewer, 20, 48, 48, 24)  # zoomed in: 8 tiles at level 0 fit the cap
    zoomed = run(qtbot, widget)
    assert zoomed.error is None
    assert (zoomed.level, zoomed.exact, zoomed.tiles) == (0, True, 8)
    np.testing.assert_allclose(prob.scale, SPACING)
    np.testing.assert_allclose(prob.translate, [b.start * S for b in zoomed.box])
    assert "coarse" not in widget.status.value
