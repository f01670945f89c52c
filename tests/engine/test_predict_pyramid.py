"""The pyramid built while a run's chunks land equals the pass over a finished level 0,
whatever the order and timing of the chunks, after a stop, and after kill -9."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_scrollseg.engine import omezarr
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.predict.pyramid import PyramidFront

SPATIAL = (70, 130, 100)  # three levels with edge chunks on every one
CHUNKS = (16, 32, 32)


def _output(root: Path) -> Path:
    """A prediction-like output: uint8 probabilities (czyx) and labels (zyx), level 0
    written, coarser levels empty."""
    rng = np.random.default_rng(3)
    out = root / "out.zarr"
    probs = omezarr.create_image(
        out,
        shape=(3, *SPATIAL),
        dtype="uint8",
        chunks=(3, *CHUNKS),
        spacing=(1, 1, 1),
        axes="czyx",
        n_levels=3,
    )
    labels = omezarr.create_labels(
        out,
        "prediction",
        shape=SPATIAL,
        dtype="uint8",
        chunks=CHUNKS,
        spacing=(1, 1, 1),
        axes="zyx",
        n_levels=3,
    )
    probs["0"][:] = rng.integers(0, 256, (3, *SPATIAL), dtype=np.uint8)
    labels["0"][:] = rng.integers(1, 4, SPATIAL, dtype=np.uint8)
    return out


def _images(out: Path) -> list[tuple[Path, str]]:
    return [(out, "mean"), (out / "labels" / "prediction", "mode")]


def _levels(out: Path) -> list[np.ndarray]:
    found = []
    for image, _ in _images(out):
        group = zarr.open_group(str(image), mode="r")
        found += [group[str(level)][:] for level in range(3)]
    return found


def _full_pass(out: Path, root: Path) -> list[np.ndarray]:
    """The levels :func:`omezarr.write_pyramid` gives on a copy of ``out``."""
    copy = root / "full.zarr"
    shutil.copytree(out, copy)
    for image, reduction in _images(copy):
        omezarr.write_pyramid(image, reduction=reduction, threads=1)
    return _levels(copy)


def _every_chunk() -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.product(*(range(-(-s // c)) for s, c in zip(SPATIAL, CHUNKS))))


@pytest.fixture
def jittered(monkeypatch):
    """Each coarser chunk sleeps 0-4 ms first: builds finish in a shuffled order."""
    real = omezarr.downsample_chunk
    rng = random.Random(11)

    def slow(*args, **kwargs):
        time.sleep(rng.random() * 0.004)
        return real(*args, **kwargs)

    monkeypatch.setattr(omezarr, "downsample_chunk", slow)


def test_chunks_fed_in_any_order_from_several_threads_give_the_full_pass(tmp_path, jittered):
    out = _output(tmp_path)
    expected = _full_pass(out, tmp_path)
    chunks = _every_chunk()
    random.Random(5).shuffle(chunks)
    front = PyramidFront(_images(out), threads=3)
    feeders = [
        threading.Thread(target=lambda part=chunks[i::4]: [front.chunk_done(c) for c in part])
        for i in range(4)
    ]
    for t in feeders:
        t.start()
    for t in feeders:
        t.join()
    front.finish()
    got = _levels(out)
    assert [a.shape for a in got] == [b.shape for b in expected]
    for level, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {level}")


def test_a_level_waits_for_every_chunk_under_it(tmp_path):
    out = _output(tmp_path)
    front = PyramidFront(_images(out), threads=2)
    first = [c for c in _every_chunk() if c[0] < 2 and c[1] < 2 and c[2] < 2]
    for c in first[:-1]:  # all but one of level 1's first chunk's sources
        front.chunk_done(c)
    time.sleep(0.2)
    level1 = zarr.open_array(str(out / "1"), mode="r")
    assert level1.nchunks_initialized == 0
    front.chunk_done(first[-1])
    deadline = time.monotonic() + 10
    while level1.nchunks_initialized == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert level1.nchunks_initialized == 1
    front.close()


def test_a_stopped_front_then_a_new_one_fed_everything_gives_the_full_pass(tmp_path, jittered):
    out = _output(tmp_path)
    expected = _full_pass(out, tmp_path)
    chunks = _every_chunk()
    front = PyramidFront(_images(out), threads=2)
    for c in chunks[: len(chunks) // 2]:
        front.chunk_done(c)
    front.close()  # a cancelled run: queued chunks never start
    again = PyramidFront(_images(out), threads=2)  # the rerun feeds every written chunk
    for c in chunks:
        again.chunk_done(c)
    again.finish()
    for level, (a, b) in enumerate(zip(_levels(out), expected)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {level}")


def test_a_chunk_that_fails_is_raised_by_finish(tmp_path):
    out = _output(tmp_path)
    (out / "0" / "0" / "0" / "0" / "0").write_bytes(b"not zstd")  # a damaged level-0 chunk
    front = PyramidFront(_images(out), threads=2)

    def run() -> None:  # the failure is raised by a later chunk_done, or else by finish
        for c in _every_chunk():
            front.chunk_done(c)
        front.finish()

    with pytest.raises(ScrollsegError, match=r"pyramid level 1 chunk \(0, 0, 0\)") as err:
        run()
    assert "run the prediction again to resume" in str(err.value)
    assert err.value.__cause__ is not None


def test_a_chunk_that_fails_stops_the_run_at_the_next_chunk_not_at_its_end(tmp_path):
    out = _output(tmp_path)
    (out / "0" / "0" / "0" / "0" / "0").write_bytes(b"not zstd")
    front = PyramidFront(_images(out), threads=2)
    chunks = _every_chunk()
    first = [c for c in chunks if all(i < 2 for i in c)]  # every chunk under (0, 0, 0)
    for c in first:
        front.chunk_done(c)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the failure lands on a pyramid thread
        with front._lock:
            if front._error is not None:
                break
        time.sleep(0.01)
    rest = [c for c in chunks if c not in first]
    with pytest.raises(ScrollsegError, match="pyramid level 1 chunk"):
        front.chunk_done(rest[0])
    front.close()


_KILLED = """
import sys, time
from pathlib import Path
from napari_scrollseg.engine import omezarr
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.predict.pyramid import PyramidFront
import itertools

out, beats = Path(sys.argv[1]), Path(sys.argv[2])
real = omezarr.downsample_chunk

def slow(*args, **kwargs):
    real(*args, **kwargs)
    with beats.open("a") as f:
        f.write("x")
    time.sleep(0.02)

omezarr.downsample_chunk = slow
front = PyramidFront([(out, "mean"), (out / "labels" / "prediction", "mode")], threads=2)
for c in itertools.product(*(range(-(-s // k)) for s, k in zip({spatial}, {chunks}))):
    front.chunk_done(c)
front.finish()
"""


def test_kill_9_while_the_pyramid_is_written_then_a_rerun_gives_the_full_pass(tmp_path):
    out = _output(tmp_path)
    expected = _full_pass(out, tmp_path)
    beats = tmp_path / "beats"
    script = _KILLED.format(spatial=SPATIAL, chunks=CHUNKS)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(out), str(beats)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if beats.exists() and len(beats.read_text()) >= 5:
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the pyramid finished before the kill"
    # every chunk on disk is whole: the levels open and read
    _levels(out)
    front = PyramidFront(_images(out), threads=2)
    for c in _every_chunk():
        front.chunk_done(c)
    front.finish()
    for level, (a, b) in enumerate(zip(_levels(out), expected)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {level}")
