"""The full-run widget in a real viewer (Xvfb): start, cancel, start again = the CLI's output.

The built-in model on the phantom without mirroring, over a box drawn as a Shapes
rectangle (every slice under it), chunks of 32.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_scrollseg.engine.builtin import builtin_model
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.phantom import SPACING
from napari_scrollseg.widgets.full_run import FullRunWidget
from tests.widgets._stall import ADD_LAYER_CPU_S, TARGET_S, StallMeter

PLUGIN = "napari-scrollseg"
S = SPACING[0]


@pytest.fixture
def full(make_napari_viewer, phantom_zarr: Path):
    import torch

    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    viewer.open(phantom_zarr, plugin=PLUGIN)
    widget = FullRunWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model.value = str(builtin_model())
    widget.device.value = "cpu"
    widget.mirror.value = False
    widget.chunk.value = 32
    yield viewer, widget
    if widget.worker is not None:
        widget.worker.quit()


def _read(out: Path) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(str(out), mode="r")
    return np.asarray(g["0"][:]), np.asarray(g["labels/prediction/0"][:])


def test_start_cancel_start_equals_scrollseg_predict(full, qtbot, tmp_path: Path) -> None:
    from napari_scrollseg.cli import main

    viewer, widget = full
    # a rectangle over y, x 0..64 drawn on one slice: the region is every slice under it
    corners = np.array([[10, 0, 0], [10, 0, 63.5], [10, 63.5, 63.5], [10, 63.5, 0]])
    viewer.add_shapes([corners * S], shape_type="rectangle")
    widget.roi.value = "shapes: Shapes"
    assert widget.region() == [(0, 64), (0, 64), (0, 64)]
    out = tmp_path / "widget.zarr"
    widget.output.value = out

    opening = StallMeter(viewer)  # Start: the output prepared, its two layers added
    click = time.perf_counter(), time.thread_time()
    worker = widget.start()
    click = [(b - a) * 1000 for a, b in zip(click, (time.perf_counter(), time.thread_time()))]
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.opening, timeout=300_000)
    opening.stop()
    # the output and its layers exist before the run writes anything
    assert {"widget: prediction", "widget: widget [ink]"} <= {x.name for x in viewer.layers}
    assert not list((out / ".scrollseg" / "done").iterdir())
    meter = StallMeter(viewer)  # the run: layers are only refreshed
    qtbot.waitUntil(
        lambda: widget.last_event is not None and widget.last_event.chunks_done >= 1,
        timeout=300_000,
    )
    widget.cancel()  # the Cancel button of the progress row
    qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
    done_first = len(list((out / ".scrollseg" / "done").iterdir()))
    assert 0 < done_first < 8, done_first  # cancelled part-way
    assert widget.result is None

    widget.start()  # the same settings: resumes (the layers are re-pointed, not added)
    qtbot.waitUntil(lambda: widget.worker is None and not widget.opening, timeout=300_000)
    qtbot.wait(100)  # the last refresh, one layer per turn
    meter.stop()
    print(f"\nfull run, the click: {click[0]:.0f} ms wall, {click[1]:.0f} ms CPU")
    print(f"full run, start: {opening.summary()}\nfull run: {meter.report()}")
    assert widget.result == out
    assert widget.last_event.chunks_resumed == done_first
    assert widget.last_event.stage == "done"

    ref = tmp_path / "cli.zarr"
    volume = viewer.layers["phantom"].metadata["source"]
    args = ["predict", str(builtin_model()), volume, str(ref), "--roi", "0:64,0:64,0:64"]
    assert main([*args, "--no-mirror", "--chunk", "32", "--device", "cpu"]) == 0
    probs, labels = _read(out)
    ref_probs, ref_labels = _read(ref)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(probs, ref_probs)
    # the output layers show the finished run
    shown = viewer.layers["widget: prediction"]
    np.testing.assert_array_equal(np.asarray(shown.data[0]), ref_labels)
    assert not meter.add_layer_gaps, meter.summary()  # no layer added during the run
    assert meter.longest_cpu < TARGET_S, meter.report()
    assert all(c < ADD_LAYER_CPU_S for _, c in opening.add_layer_gaps), opening.summary()


def test_estimate_and_bad_inputs(full, qtbot, tmp_path: Path) -> None:
    viewer, widget = full
    widget.estimate()
    qtbot.waitUntil(lambda: "tiles" in widget.estimate_label.value, timeout=120_000)
    assert "27 tiles" in widget.estimate_label.value  # 3 x 3 x 3 tiles of (32, 64, 64)
    # an output that exists and is not a scrollseg prediction: one message, nothing touched
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    widget.output.value = other
    widget.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.result is None
    assert (other / "keep.txt").read_text() == "mine"
    # a layer not backed by a file is told so
    viewer.add_image(np.zeros((8, 8, 8), np.uint8), name="scratch")
    widget.image.value = "scratch"
    with pytest.raises(ScrollsegError, match="not backed by a file"):
        widget._source()
    assert widget.start() is None  # refused before any thread starts
    assert widget.worker is None


def test_napari_exit_while_the_output_opens_does_not_hang(full, qtbot, tmp_path) -> None:
    """napari's exit quits every worker, then waits for them all: a run waiting for its
    layers (the viewer closed before showing them) stops at once (it waited up to
    ``SHOW_WAIT_S``, 60 s, before) and writes nothing."""
    from superqt.utils._qthreading import WorkerBase

    _, widget = full
    ready = []
    widget._add_output = ready.append  # the viewer closes: the layers are never shown
    widget.output.value = out = tmp_path / "closing.zarr"
    worker = widget.start()
    assert worker is not None
    qtbot.waitUntil(lambda: bool(ready), timeout=300_000)  # the output prepared, the run waiting
    t0 = time.perf_counter()
    WorkerBase.await_workers(msecs=30_000)  # what napari connects to QApplication.aboutToQuit
    waited = time.perf_counter() - t0
    assert waited < 15, waited
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert widget.result is None
    assert not list((out / ".scrollseg" / "done").iterdir())  # no chunk written


def test_remote_volume_that_stops_answering(
    make_napari_viewer, phantom_zarr, qtbot, tmp_path, monkeypatch
) -> None:
    """A run whose volume server stops answering mid-run: one clear message, the widget
    ready for another start, the viewer usable."""
    import torch
    from napari.utils.notifications import NotificationSeverity, notification_manager

    from tests.http_server import VolumeServer

    torch.set_num_threads(1)
    monkeypatch.setenv("SCROLLSEG_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("SCROLLSEG_HTTP_RETRIES", "1")
    server = VolumeServer(phantom_zarr.parent)
    try:
        viewer = make_napari_viewer()
        viewer.open(server.url(phantom_zarr.name), plugin=PLUGIN)
        widget = FullRunWidget(viewer)
        viewer.window.add_dock_widget(widget)
        widget.model.value = str(builtin_model())
        widget.device.value, widget.mirror.value, widget.chunk.value = "cpu", False, 32
        widget.output.value = tmp_path / "remote.zarr"
        n = len(notification_manager.records)
        meter = StallMeter(viewer)
        assert widget.start() is not None
        qtbot.waitUntil(lambda: widget.last_event is not None, timeout=120_000)
        server.stall()  # the remote volume stops answering mid-run
        qtbot.waitUntil(lambda: widget.worker is None, timeout=300_000)
        meter.stop()
        errors = [
            r.message
            for r in notification_manager.records[n:]
            if r.severity == NotificationSeverity.ERROR
        ]
        assert len(errors) == 1, errors
        assert server.url(phantom_zarr.name) in errors[0], errors
        assert "then run again" in errors[0], errors
        assert widget.result is None
        assert widget.start_button.enabled  # ready to start again (it resumes)
        assert meter.longest_cpu < TARGET_S, meter.report()
        viewer.dims.set_point(0, 0.0)  # the viewer still answers
    finally:
        server.kill()
