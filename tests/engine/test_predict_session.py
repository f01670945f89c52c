"""The prediction session: one warm model, its lock, tile cache and forward-pass count."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.predict import Predictor, iter_predict_region, predict_region
from tests.engine.conftest import blocky_volume

BOX = ((2, 12), (0, 30), (0, 27))


@contextlib.contextmanager
def _dask_tasks() -> Iterator[Any]:
    """A dask callback counting the tasks this thread's engine computes run (``.n``)."""
    from dask.callbacks import Callback

    from napari_scrollseg.engine.dask_compute import thread_callbacks

    class Count(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def _pretask(self, key, dsk, state):
            self.n += 1

    count = Count()
    with thread_callbacks(count):
        yield count


def test_region_request_closed_after_its_first_batch_stops(tiny_model_3d):
    volume = blocky_volume((14, 30, 27), seed=21)
    with Predictor(tiny_model_3d, folds=(0,), device="cpu") as session:
        n_tiles = len(session.grid(volume).tiles_intersecting(tuple(slice(*b) for b in BOX)))
        assert n_tiles > 4  # more than one batch of 2
        gen = iter_predict_region(session, volume, BOX, batch_size=2, mirror=False)
        first = next(gen)
        assert (first.tiles_done, first.tiles_total, first.tiles_cached) == (2, n_tiles, 0)
        assert first.probs is None
        assert not first.done
        gen.close()  # the view moved: the request is cancelled
        assert session.forward_passes == 2  # no batch ran after the close
        assert len(session.cache) == 2  # what ran is kept for the next request
        # the next request runs only the tiles not run yet, and gives the whole answer
        events = list(session.iter_predict_region(volume, BOX, batch_size=2, mirror=False))
        assert session.forward_passes == n_tiles
        last = events[-1]
        assert last.done
        assert last.tiles_cached == 2
        done = [e.tiles_done for e in events[:-1]]  # one event per batch of 2
        assert done[-1] == n_tiles - 2
        assert len(done) == -(-(n_tiles - 2) // 2)
        np.testing.assert_allclose(
            last.probs,
            predict_region(session.model, volume, BOX, mirror=False)[0],
            atol=1e-6,
        )
    assert session.closed
    with pytest.raises(ScrollsegError, match="session is closed"):
        session.predict_region(volume, BOX)


def test_volume_statistics_are_cached_with_the_session(tiny_model_3d_zscore):
    from napari_scrollseg.engine.model import nonzero_bbox

    volume = blocky_volume((14, 30, 27), seed=22, zero_border=2).astype(np.float32)

    session = Predictor(tiny_model_3d_zscore, folds=(0,), device="cpu", cache=None)
    with _dask_tasks() as cold:
        session.predict_region(volume, BOX, mirror=False)
    with _dask_tasks() as warm:
        session.predict_region(volume, BOX, mirror=False)
    assert warm.n < cold.n  # no second pass for the nonzero box and the statistics
    assert session.bbox(volume) == nonzero_bbox(volume)
    assert session.cache is None
    session.close()
    session.close()  # idempotent


def test_predictor_given_to_predict_volume_refuses_its_own_options(tiny_model_3d, tmp_path):
    from napari_scrollseg.engine.predict_volume import predict_volume

    session = Predictor(tiny_model_3d, folds=(0,), device="cpu")
    with pytest.raises(ScrollsegError, match="to the Predictor"):
        predict_volume(session, blocky_volume((8, 16, 16)), tmp_path / "p.zarr", folds="1")
    assert not session.closed  # the caller's session stays open


def test_volume_run_yields_before_its_whole_volume_passes(tiny_model_3d, tmp_path):
    from napari_scrollseg.engine.omezarr import write_image
    from napari_scrollseg.engine.predict import iter_predict_volume

    vol = tmp_path / "v.zarr"
    image = blocky_volume((12, 30, 27), seed=23, zero_border=2)
    write_image(vol, image, spacing=(1.0, 1.0, 1.0), chunks=(8, 8, 8))
    out = tmp_path / "out.zarr"

    session = Predictor(tiny_model_3d, folds=(0,), device="cpu")
    with _dask_tasks() as count:
        gen = iter_predict_volume(session, vol, out, chunk=16)
        first = next(gen)
        gen.close()  # cancelled at the first event
    assert first.stage == "prepare"
    assert first.fraction == 0
    assert count.n == 0  # no pass over the volume ran, nothing was written
    assert not out.exists()
    assert session.forward_passes == 0
    events = list(iter_predict_volume(session, vol, out, chunk=16))
    assert events[0].stage == "prepare"
    assert events[-1].stage == "done"
    assert session.forward_passes == events[-1].tiles_computed > 0
    assert not session.closed  # the caller's session stays open


def test_a_whole_volume_pass_stops_when_its_generator_is_closed():
    import threading

    import dask.array as da

    from napari_scrollseg.engine.dask_compute import compute
    from napari_scrollseg.engine.predict.schedule import iter_in_thread
    from napari_scrollseg.engine.progress import drive

    ran = []
    started = threading.Event()

    def slow(block: np.ndarray) -> np.ndarray:
        ran.append(1)
        started.set()
        threading.Event().wait(0.02)
        return block

    arr = da.zeros((200, 4), chunks=(1, 4)).map_blocks(slow, dtype=float)
    gen = iter_in_thread(lambda: float(compute(arr.sum(), scheduler="sync")[0]), every=0.01)
    assert next(gen) is None  # still running
    started.wait(5)
    gen.close()
    n = len(ran)
    assert 0 < n < 200  # stopped at the next task
    threading.Event().wait(0.1)
    assert len(ran) == n

    # run to the end, the generator's value is the function's
    def value() -> int:
        return (yield from iter_in_thread(lambda: 42, every=0.01))

    assert drive(value()) == 42
