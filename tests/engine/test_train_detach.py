"""A training left running (``train(detach=...)``, napari's "Leave it running") outlives
the process that started it and keeps writing its curves; the same fold is refused
while it runs; SIGTERM still stops it with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from napari_scrollseg.engine.demo import tiny_network
from napari_scrollseg.engine.train import read_progress, running_worker, split_event, train
from tests.engine.test_train_signals import SRC, _tiny_dataset

# the caller (a stand-in for napari): detach after the first epoch, then exit
CALLER = textwrap.dedent(
    """
    import sys, threading
    from napari_scrollseg.engine.demo import tiny_network
    from napari_scrollseg.engine.train import train
    detach = threading.Event()
    for ev in train(sys.argv[1], results_dir=sys.argv[2], folds=["all"], device="cpu",
                    epochs=500, iterations=2, num_processes=1, da_processes=0,
                    validate=False, plans_overrides=tiny_network(), detach=detach):
        print(ev.kind, ev.message, flush=True)
        if ev.kind == "epoch":
            detach.set()
    """
)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # ended, not yet reaped by its (dead) parent's adopter


# a worker whose detach request lands in the middle of a line it prints (as nnU-Net's
# "<timestamp>: <message>" lines): the request's event must still reach the caller
MID_LINE = textwrap.dedent(
    """
    import os, signal, sys
    from napari_scrollseg.engine import _train_worker
    signal.signal(_train_worker.DETACH_SIGNAL, _train_worker._detach)
    sys.stdout.write("2026-11-30 09:10:06.718208: ")
    sys.stdout.flush()
    os.kill(os.getpid(), _train_worker.DETACH_SIGNAL)
    print("Epoch 3")
    """
)


def test_a_detach_request_in_the_middle_of_a_printed_line_still_reaches_the_caller(
    tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    env = {**os.environ, "PYTHONPATH": SRC, "SCROLLSEG_WORKER_LOG": str(log)}
    out = subprocess.run(
        [sys.executable, "-c", MID_LINE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    events = [e for _, e in map(split_event, out.stdout.split("\n")) if e]
    assert [e["kind"] for e in events] == ["detached"]
    assert "Epoch 3" in log.read_text()  # what it printed after went to its log
    # the line as a worker wrote it before the fix: the event after the interrupted text
    text, event = split_event('2026-11-30 09:10:06: \x1escrollseg-event {"kind": "detached"}\n')
    assert (text, event) == ("2026-11-30 09:10:06: ", {"kind": "detached"})


@pytest.mark.slow
def test_a_detached_training_outlives_its_caller(tmp_path: Path) -> None:
    raw = _tiny_dataset(tmp_path)
    results = tmp_path / "results"
    caller = subprocess.run(
        [sys.executable, "-c", CALLER, str(raw), str(results)],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert caller.returncode == 0, caller.stderr[-2000:]
    assert "detached training of fold all goes on in process" in caller.stdout, caller.stdout
    model = next((results / raw.name).glob("nnUNetTrainer__*"))
    pid = running_worker(model / "fold_all")
    assert pid is not None  # the caller is gone, its training is not
    try:
        epochs = len(read_progress(model))
        deadline = time.monotonic() + 240
        while len(read_progress(model)) <= epochs and time.monotonic() < deadline:
            time.sleep(1)
        assert len(read_progress(model)) > epochs  # it goes on: epochs, curves, log
        assert (model / "progress.png").stat().st_mtime > time.time() - 240
        log = next((results / "logs").glob("*fold*all.log")).read_text()
        assert "scrollseg-event" not in log  # its output went to the log, events to nobody
        # the same fold is not started twice
        with pytest.raises(Exception, match=f"still being trained by process {pid}"):
            list(train(raw, results_dir=results, folds=["all"], plans_overrides=tiny_network()))
    finally:
        os.kill(pid, signal.SIGTERM)  # as `kill PID`: it saves a checkpoint and stops
        deadline = time.monotonic() + 120
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert _gone(pid)
    assert (model / "fold_all" / "checkpoint_latest.pth").is_file()
    assert running_worker(model / "fold_all") is None
