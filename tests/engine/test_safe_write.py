"""Overwrite only what scrollseg wrote; a kill leaves the old state or the new (issue 13, 2 and 5)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_scrollseg.cli import main
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.safe_write import (
    STALE_EMPTY_LOCK_S,
    check_not_locked,
    partial_dir,
    run_lock,
    swap_in,
    tidy,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_phantom_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.txt").write_text("years of work")
    assert main(["phantom", str(mine), "--shape", "8", "16", "16", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {mine} is not a phantom written by scrollseg")
    assert "\n" not in err
    assert (mine / "chapter1.txt").read_text() == "years of work"
    # a phantom scrollseg wrote is replaced
    out = tmp_path / "p.zarr"
    assert main(["phantom", str(out), "--shape", "8", "16", "16"]) == 0
    assert (
        main(["phantom", str(out), "--shape", "8", "16", "16", "--seed", "3", "--overwrite"]) == 0
    )
    assert json.loads((out / ".zattrs").read_text())["scrollseg"]["phantom"]["seed"] == 3
    assert _hidden(tmp_path) == []


def test_predict_overwrite_refuses_while_a_live_run_holds_the_lock(tmp_path):
    state = tmp_path / "out.zarr" / ".scrollseg"
    state.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (state / "lock").write_text(f"{socket.gethostname()} {live.pid}")
        with pytest.raises(ScrollsegError, match=rf"another scrollseg run \(pid {live.pid}\)"):
            check_not_locked(state)
        with (
            pytest.raises(ScrollsegError, match="being written by another scrollseg run"),
            run_lock(state),
        ):
            pass
    finally:
        live.kill()
        live.wait()
    check_not_locked(state)  # its holder is gone: stale
    with run_lock(state):
        assert (state / "lock").read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not (state / "lock").exists()


def test_empty_lock_left_by_a_kill_is_stale_after_a_while(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    lock = state / "lock"
    lock.write_text("")
    with pytest.raises(ScrollsegError, match="a run that is starting"), run_lock(state):
        pass
    old = time.time() - STALE_EMPTY_LOCK_S - 5
    os.utime(lock, (old, old))
    with run_lock(state):
        assert lock.read_text().endswith(str(os.getpid()))
    assert list(state.iterdir()) == []


def test_tidy_restores_the_old_state_and_drops_stale_partials(tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    target = tmp_path / "Dataset001_X"
    old = tmp_path / f".{target.name}.old-{host}-{dead}-0123abcd"
    (old / "imagesTr").mkdir(parents=True)
    stale = tmp_path / f".{target.name}.partial-{host}-{dead}-0123abcd"
    stale.mkdir()
    legacy = tmp_path / f".{target.name}.partial-0123abcd"  # the name older versions used
    legacy.mkdir()
    live = tmp_path / f".{target.name}.partial-{host}-{os.getppid()}-0123abcd"
    live.mkdir()
    tidy(target)  # killed between the two renames of swap_in: the old dataset comes back
    assert (target / "imagesTr").is_dir()
    assert _hidden(tmp_path) == [live.name]
    # a swap leaves the new state and nothing else
    tmp = partial_dir(target)
    (tmp / "new").write_text("x")
    swap_in(tmp, target)
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert _hidden(tmp_path) == [live.name]


def _start_writing(argv: list[str], watch: Path) -> subprocess.Popen:
    """Run the CLI and return once it has started writing in ``watch`` (or ended)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_scrollseg.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any(".partial-" in p.name for p in watch.iterdir()):
            break
        time.sleep(0.01)
    return proc


def _seconds_writing(argv: list[str], watch: Path) -> float:
    """How long an uninterrupted run goes on after it starts writing in ``watch``.

    Kill moments are drawn within this span, so they fall while the run writes on a slow
    machine and on a fast one alike.
    """
    proc = _start_writing(argv, watch)
    start = time.monotonic()
    assert proc.wait(timeout=120) == 0
    return time.monotonic() - start


def _run_and_kill(argv: list[str], watch: Path, delay: float) -> bool:
    """Run the CLI; once it has started writing in ``watch``, kill -9 it after ``delay`` s.

    Returns whether it was killed (False: it finished first).
    """
    proc = _start_writing(argv, watch)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


@pytest.mark.slow
def test_phantom_killed_at_random_moments_leaves_nothing_that_opens(tmp_path):
    from napari_scrollseg.engine.volumes import open_volume

    shape = ["32", "96", "96"]
    ref = tmp_path / "ref.zarr"
    assert main(["phantom", str(ref), "--shape", *shape]) == 0
    want = np.asarray(open_volume(ref).data)
    span = _seconds_writing(["phantom", str(tmp_path / "timed.zarr"), "--shape", *shape], tmp_path)
    rng = random.Random(13)
    killed = 0
    for i in range(3):
        out = tmp_path / f"p{i}.zarr"
        delay = rng.uniform(0, 0.8) * span
        killed += _run_and_kill(["phantom", str(out), "--shape", *shape], tmp_path, delay)
        if out.exists():  # finished before the kill: whole
            np.testing.assert_array_equal(np.asarray(open_volume(out).data), want)
        assert main(["phantom", str(out), "--shape", *shape, "--overwrite"]) == 0
        np.testing.assert_array_equal(np.asarray(open_volume(out).data), want)
    assert _hidden(tmp_path) == []
    assert killed >= 1


def _dataset_state(ds: Path) -> tuple[int, list[str]]:
    meta = json.loads((ds / "dataset.json").read_text())
    files = sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*.tif"))
    return meta["numTraining"], files


@pytest.mark.slow
def test_export_new_or_append_killed_at_random_moments_leaves_old_or_new(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 90), dtype=np.uint8)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:50:9, 20:70:5, 30:60:4] = 2
    labels[30, 40, 40] = 1
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    base = ["export", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif")]
    base += ["--classes", "air,papyrus", "--dataset-id", "1", "--name", "K"]
    ref = tmp_path / "ref"
    assert main([*base, "--out", str(ref)]) == 0
    first = _dataset_state(ref / "Dataset001_K")
    assert main([*base, "--out", str(ref), "--append"]) == 0
    new = _dataset_state(ref / "Dataset001_K")
    timed = tmp_path / "timed"
    timed.mkdir()
    span = _seconds_writing([*base, "--out", str(timed)], timed)
    pick = random.Random(5)
    killed = 0
    for i in range(2):  # a new export: nothing or the whole dataset
        raw = tmp_path / f"new{i}"
        raw.mkdir()
        killed += _run_and_kill([*base, "--out", str(raw)], raw, pick.uniform(0, 0.8) * span)
        ds = raw / "Dataset001_K"
        tidy(ds)
        if ds.exists():
            assert _dataset_state(ds) == first
        else:
            assert main([*base, "--out", str(raw)]) == 0
        assert _dataset_state(ds) == first
        assert _hidden(raw) == []
    for i in range(3):
        raw = tmp_path / f"raw{i}"
        assert main([*base, "--out", str(raw)]) == 0
        ds = raw / "Dataset001_K"
        old = _dataset_state(ds)
        argv = [*base, "--out", str(raw), "--append"]
        killed += _run_and_kill(argv, raw, pick.uniform(0, 0.8) * span)
        tidy(ds)  # what the next export does first
        assert _dataset_state(ds) in (old, new)
        if _dataset_state(ds) == old:
            assert main([*base, "--out", str(raw), "--append"]) == 0
        assert _dataset_state(ds) == new
        for f in new[1]:
            np.testing.assert_array_equal(
                tifffile.imread(ds / f), tifffile.imread(ref / ds.name / f)
            )
        assert _hidden(raw) == []
    assert killed >= 1
