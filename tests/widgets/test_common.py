"""The shared widget layer: engine generators off the GUI thread, Cancel, one error message."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from napari.utils.notifications import NotificationSeverity, notification_manager
from qtpy.QtCore import Qt

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.widgets._common import (
    ProgressRow,
    image_layers,
    pick_image_layer,
    qt_alive,
    session,
    start_worker,
)


@dataclass
class Step:
    done: int
    total: int


def counting(n: int, threads: list, closed: threading.Event, delay: float = 0.0):
    """A small engine-like generator: records its thread, yields done/total, returns n."""
    try:
        for i in range(n):
            threads.append(threading.get_ident())
            time.sleep(delay)
            yield Step(i + 1, n)
        return n
    finally:
        closed.set()


def failing(message: str):
    yield Step(1, 2)
    raise ScrollsegError(message)


def crashing(exc_type: type):
    yield Step(1, 2)
    raise exc_type("boom\nsecond line")


def _errors(since: int) -> list[str]:
    return [
        str(n.message)
        for n in notification_manager.records[since:]
        if n.severity == NotificationSeverity.ERROR
    ]


def test_generator_runs_off_thread_with_progress(qtbot):
    row = ProgressRow()
    qtbot.addWidget(row)
    threads: list[int] = []
    closed = threading.Event()
    seen, seen_threads, done = [], [], []

    def on_event(ev):
        seen.append(ev.done)
        seen_threads.append(threading.get_ident())

    start_worker(counting, 5, threads, closed, on_event=on_event, on_done=done.append, progress=row)
    qtbot.waitUntil(lambda: not row.running, timeout=10_000)
    qtbot.waitUntil(lambda: done == [5], timeout=5000)
    main = threading.get_ident()
    assert threads
    assert all(t != main for t in threads)  # the generator ran in a worker thread
    assert seen_threads
    assert all(t == main for t in seen_threads)  # events reach the GUI thread
    assert seen == [1, 2, 3, 4, 5]
    assert (row.bar.value(), row.bar.maximum()) == (5, 5)
    assert row.status.text() == "done"
    assert not row.cancel_button.isEnabled()
    assert closed.is_set()


def test_cancel_closes_the_generator(qtbot):
    row = ProgressRow()
    qtbot.addWidget(row)
    threads: list[int] = []
    closed = threading.Event()
    done = []
    start_worker(counting, 10_000, threads, closed, delay=0.01, on_done=done.append, progress=row)
    qtbot.waitUntil(lambda: len(threads) >= 3, timeout=5000)
    assert row.cancel_button.isEnabled()
    qtbot.mouseClick(row.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not row.running, timeout=10_000)
    assert closed.is_set()  # GeneratorExit reached the generator's finally
    assert len(threads) < 10_000
    assert done == []  # a cancelled run has no result
    assert row.status.text() == "cancelled"


@pytest.mark.parametrize(
    ("gen", "args", "expected"),
    [
        (failing, ("choose another dataset ID",), "choose another dataset ID"),
        (crashing, (ValueError,), "ValueError: boom"),
        (crashing, (RuntimeError,), "RuntimeError: boom"),  # superqt alone would only warn
    ],
)
def test_an_error_becomes_one_notification(qtbot, gen, args, expected):
    row = ProgressRow()
    qtbot.addWidget(row)
    before = len(notification_manager.records)
    caught = []
    start_worker(gen, *args, on_error=caught.append, progress=row)
    qtbot.waitUntil(lambda: not row.running, timeout=10_000)
    qtbot.waitUntil(lambda: len(caught) == 1, timeout=5000)
    assert _errors(before) == [expected]
    assert row.status.text() == "failed"


def test_a_worker_that_ends_before_the_gui_looks_still_reports_its_end(qtbot):
    """A failure at once (e.g. "not a dataset") ends the worker before the caller's next
    line: ``on_finished`` is connected before the start, so its end is not lost (a
    ``finished.connect`` after ``start_worker`` missed it and left a widget "running")."""
    import time

    ended, late = [], []
    worker = start_worker(failing, "at once", on_finished=lambda: ended.append(1))
    time.sleep(1.0)  # the GUI thread busy: the worker fails meanwhile (in ms)
    deadline = time.monotonic() + 10
    while worker.is_running and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # its `finished` is emitted right after `is_running` turns False
    worker.finished.connect(lambda: late.append(1))  # what the widgets did before
    qtbot.waitUntil(lambda: ended == [1], timeout=10_000)
    qtbot.wait(200)
    assert late == []  # connected after the end: never called


def blocking(release: threading.Event):
    """A long job (a training watched for hours): waits until released."""
    while not release.wait(0.05):
        yield None


def quick(value: int):
    yield value
    return value


def test_a_job_never_queues_behind_long_ones(qtbot):
    """Workers share Qt's global thread pool, sized to the CPU count: with every thread
    taken by long jobs, the next job (an export, a live request) still starts at once (it
    waited for a long job to end before; CI's 2-CPU machine timed out on an export)."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    saved = pool.maxThreadCount()
    release = threading.Event()
    pool.setMaxThreadCount(max(1, pool.activeThreadCount() + 1))
    try:
        long_jobs = [start_worker(blocking, release) for _ in range(2)]
        qtbot.waitUntil(lambda: all(w.is_running for w in long_jobs), timeout=10_000)
        done = []
        start_worker(quick, 7, on_done=done.append)
        qtbot.waitUntil(lambda: done == [7], timeout=10_000)
        assert all(w.is_running for w in long_jobs)  # still going meanwhile
    finally:
        release.set()
        qtbot.waitUntil(lambda: not any(w.is_running for w in long_jobs), timeout=10_000)
        pool.setMaxThreadCount(saved)


def test_progress_row_follows_the_last_worker(qtbot):
    """A worker attached while the previous one is still ending (the export's integrity
    check starts from the export's result, before the export's own end): the earlier
    end does not stop the row following the later worker (its Cancel stayed disabled,
    and the export widget took a click for "still running" and ignored it)."""
    row = ProgressRow()
    qtbot.addWidget(row)
    release = threading.Event()
    first = start_worker(quick, 1, progress=row)
    second = start_worker(blocking, release, progress=row)  # attached before first's end
    qtbot.waitUntil(lambda: not first.is_running, timeout=10_000)
    qtbot.wait(200)  # first's `finished` delivered
    assert row.running
    assert row.worker is second
    assert row.cancel_button.isEnabled()
    release.set()
    qtbot.waitUntil(lambda: not row.running, timeout=10_000)
    assert not row.cancel_button.isEnabled()


def test_session_is_shared_and_signals():
    s = session()
    assert session() is s
    changes = []
    s.changed.connect(changes.append)
    try:
        s.last_dataset = "/tmp/Dataset001_x"
        s.add_trained_model("/tmp/model")
        s.add_trained_model("/tmp/model")
        assert str(s.last_dataset) == "/tmp/Dataset001_x"
        assert [str(p) for p in s.trained_models] == ["/tmp/model"]
        assert changes == ["last_dataset", "trained_models", "trained_models"]
    finally:
        s.changed.disconnect(changes.append)


def test_image_layers_picks_3d_images(make_napari_viewer):
    viewer = make_napari_viewer()
    with pytest.raises(ScrollsegError, match="no 3D image layer"):
        pick_image_layer(viewer)
    viewer.add_image(np.zeros((8, 8), np.uint8), name="flat")
    vol = viewer.add_image(np.zeros((4, 8, 8), np.uint8), name="vol")
    viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="lab")
    assert image_layers(viewer) == [vol]
    assert pick_image_layer(viewer) is vol
    with pytest.raises(ScrollsegError, match="not a 3D"):
        pick_image_layer(viewer, "flat")


def test_a_closed_widget_no_longer_follows_the_session(make_napari_viewer, qtbot, tmp_path):
    """A closed train / live widget (its Qt object deleted, its Python object kept, as in
    a dock closed in napari) is not called by the next session change: before
    ``Session.follow`` the export widget's "exported" then raised "wrapped C/C++ object
    ... has been deleted" and the export never reported its end."""
    from napari_scrollseg.widgets.live import LiveWidget
    from napari_scrollseg.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    followers = len(session().changed)
    closed_train, closed_live = TrainWidget(viewer), LiveWidget(viewer)
    closed_train.deleteLater()
    closed_live.native.deleteLater()
    qtbot.waitUntil(lambda: not qt_alive(closed_train) and not qt_alive(closed_live.native))
    open_train = TrainWidget(viewer)
    dataset = tmp_path / "nnUNet_raw" / "Dataset001_x"

    session().last_dataset = dataset  # raised EmitLoopError before
    session().add_trained_model(tmp_path / "model")

    assert Path(str(open_train.dataset.value)) == dataset  # the open one still follows
    assert len(session().changed) == followers + 1  # the closed ones' relays dropped
