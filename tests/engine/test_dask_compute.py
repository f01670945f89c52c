"""Engine dask computations on a worker thread vs a global dask callback (napari's cache)
used on another thread at the same time: the interleavings are forced with events."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback

from napari_scrollseg.engine.normalization import nonzero_bbox

WAIT = 5.0  # seconds; only reached when an interleaving cannot happen


@pytest.fixture
def global_callbacks() -> Iterator[None]:
    """Put dask's process-global callback set back however a test leaves it."""
    saved = set(Callback.active)
    yield
    Callback.active = saved


def _waiting(first: threading.Event | None, then: threading.Event) -> Callable:
    """A block function that sets ``first`` (if given), then waits for ``then``."""

    def fn(block: np.ndarray) -> np.ndarray:
        if not block.size:  # dask's meta probe
            return block
        if first is not None:
            first.set()
        assert then.wait(WAIT), "the other thread never got there"
        return block

    return fn


def _engine_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _volume(fn: Callable) -> da.Array:
    vol = np.zeros((1, 4, 6, 6), np.uint8)
    vol[0, 1:3, 2:5, 1:4] = 7
    return da.from_array(vol, chunks=(1, 4, 6, 6)).map_blocks(fn, dtype=vol.dtype)


def test_engine_computes_on_a_worker_thread_leave_a_global_callback_alone(global_callbacks):
    seen: list[Any] = []

    class Recorder(Callback):  # a global callback, registered as napari's GUI thread would
        def _pretask(self, key, dsk, state):
            seen.append(key)

    recorder = Recorder()
    recorder.register()

    # the GUI thread's compute starts first, the engine's starts while it runs and ends after
    engine_in, gui_done = threading.Event(), threading.Event()
    volume = _volume(_waiting(engine_in, gui_done))
    started: list[tuple[threading.Thread, dict[str, Any]]] = []

    def gui_block(block: np.ndarray) -> np.ndarray:
        if not block.size:  # dask's meta probe
            return block
        started.append(_engine_thread(lambda: nonzero_bbox(volume)))
        assert engine_in.wait(WAIT), "the engine's compute never started"
        return block

    assert da.ones(3, chunks=3).map_blocks(gui_block, dtype=float).sum().compute() == 3
    gui_done.set()
    ((thread, out),) = started
    thread.join(WAIT)
    assert "error" not in out, out.get("error")
    assert out["value"] == (slice(1, 3), slice(2, 5), slice(1, 4))

    # the global callback is still registered and never ran on the engine's tasks
    assert recorder._callback in Callback.active
    seen.clear()
    box = nonzero_bbox(_volume(lambda b: b))
    assert box == (slice(1, 3), slice(2, 5), slice(1, 4))
    assert seen == []  # the engine's compute did not run the global callback
    assert da.ones(2, chunks=1).sum().compute(scheduler="sync") == 2
    assert seen  # while plain dask computes still do


def test_napari_dask_cache_on_the_gui_thread_during_an_engine_compute(global_callbacks):
    from napari.utils._dask_utils import configure_dask

    # napari's GUI thread slices a dask layer (entering its cache around the compute, as
    # napari does) while the engine computes on a worker thread, twice
    engine_in, gui_done = threading.Event(), threading.Event()
    layer = da.arange(64, chunks=8)
    slicing = configure_dask(layer)
    volume = _volume(_waiting(engine_in, gui_done))
    with slicing():
        thread, out = _engine_thread(lambda: nonzero_bbox(volume))
        assert engine_in.wait(WAIT)
        assert int(layer[8:24].sum().compute()) == sum(range(8, 24))
    with slicing():
        assert int(layer[24:40].sum().compute()) == sum(range(24, 40))
    gui_done.set()
    thread.join(WAIT)
    assert "error" not in out, out.get("error")  # was KeyError in the cache's _posttask
    assert out["value"] == (slice(1, 3), slice(2, 5), slice(1, 4))
    assert Callback.active == set()  # napari's cache is registered only while it slices


def test_engine_computes_skip_the_local_callbacks_argument_on_a_distributed_client():
    from distributed import Client

    from napari_scrollseg.engine.dask_compute import compute, thread_callbacks

    client = Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None)
    with client, thread_callbacks(Callback(pretask=lambda *a: None)):
        (total,) = compute(da.ones(10, chunks=5).sum())
    assert total == 10
    with dask.config.set(scheduler="sync"), thread_callbacks(Callback()):
        assert compute(da.ones(4, chunks=2).sum()) == (4,)


def test_a_thread_scheduler_is_this_threads_only():
    from napari_scrollseg.engine.dask_compute import compute, thread_scheduler

    def threads_used(arr: da.Array) -> set[int]:
        def ident(block: np.ndarray) -> np.ndarray:
            return np.full(block.shape, threading.get_ident())

        return set(np.unique(compute(arr.map_blocks(ident, dtype=np.int64))[0]).tolist())

    arr = da.zeros(8, chunks=1)
    inside, outside, done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def worker() -> None:  # overlaps the main thread's compute, as full-run blocks do
        with thread_scheduler("synchronous"):
            inside.set()
            assert outside.wait(WAIT)
            seen["worker"] = threads_used(arr)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(WAIT)
    seen["main"] = threads_used(arr)  # threaded, while the worker's default is synchronous
    outside.set()
    thread.join(WAIT)
    assert done.is_set()
    assert seen["worker"] == {thread.ident}
    assert threading.get_ident() not in seen["main"]  # ran on the thread pool
    assert dask.config.get("scheduler", None) is None  # nothing global changed


def test_every_dask_computation_goes_through_dask_compute() -> None:
    """No module but ``engine/dask_compute.py`` calls dask's ``compute`` / ``persist`` /
    ``store`` itself: those calls, given no ``callbacks=``, swap dask's process-global
    callback set, which napari's cache uses on the GUI thread at the same time."""
    import ast
    from pathlib import Path

    import napari_scrollseg

    root = Path(napari_scrollseg.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "engine" / "dask_compute.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("compute", "persist", "store")
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno} .{node.func.attr}(...)")
    assert found == [], "use napari_scrollseg.engine.dask_compute instead:\n" + "\n".join(found)


def test_a_local_compute_does_not_import_distributed() -> None:
    """dask looks for a distributed client by importing distributed (0.25-0.36 s with a
    warm disk cache, on whatever thread computes: it holds the GIL, napari's GUI stalls);
    none can exist before it is imported."""
    import subprocess
    import sys

    script = (
        "import sys, dask.array as da\n"
        "from napari_scrollseg.engine.dask_compute import compute\n"
        "from napari_scrollseg.engine.normalization import nonzero_bbox\n"
        "assert compute(da.ones(10, chunks=5).sum()) == (10,)\n"
        "vol = da.zeros((1, 4, 6, 6), chunks=2); vol[0, 1, 2, 3] = 1\n"
        "print(nonzero_bbox(vol), 'distributed' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[-1] == "False", out
