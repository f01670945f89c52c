"""A training left running (``train(detach=...)``, napari's "Leave it running") outlives
the process that started it and keeps writing its curves; the same fold is refused
while it runs; SIGTERM still stops it with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest

from napari_scrollseg.engine.demo import tiny_network
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.train import read_progress, running_worker, split_event, train
from napari_scrollseg.engine.train_follow import follow, running_trainings
from tests.engine.test_train_signals import SRC, _tiny_dataset

# the caller (a stand-in for napari): detach after the first epoch, then exit
CALLER = textwrap.dedent(
    """
    import sys, threading
    from napari_scrollseg.engine.demo import tiny_network
    from napari_scrollseg.engine.train import train
    detach = threading.Event()
    for ev in train(sys.argv[1], results_dir=sys.argv[2], folds=["all"], device="cpu",
                    epochs=int(sys.argv[3]), iterations=2, num_processes=1, da_processes=0,
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


def _leave_running(tmp_path: Path, epochs: int) -> tuple[Path, Path, Path, int]:
    """A training of ``epochs`` epochs started by a caller that detached it after its first
    epoch and exited: (raw dataset, results, model folder, training pid)."""
    raw = _tiny_dataset(tmp_path)
    results = tmp_path / "results"
    caller = subprocess.run(
        [sys.executable, "-c", CALLER, str(raw), str(results), str(epochs)],
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
    return raw, results, model, pid


def _epochs(events: list) -> list[int]:
    return [e.epoch for e in events if e.kind == "epoch"]


@pytest.mark.slow
def test_a_detached_training_outlives_its_caller_and_is_followed_then_stopped(
    tmp_path: Path,
) -> None:
    raw, results, model, pid = _leave_running(tmp_path, epochs=500)
    try:
        epochs = len(read_progress(model))
        deadline = time.monotonic() + 240
        while len(read_progress(model)) <= epochs and time.monotonic() < deadline:
            time.sleep(1)
        assert len(read_progress(model)) > epochs  # it goes on: epochs, curves, log
        assert (model / "progress.png").stat().st_mtime > time.time() - 240
        # the same fold is not started twice
        with pytest.raises(Exception, match=f"still being trained by process {pid}"):
            list(train(raw, results_dir=results, folds=["all"], plans_overrides=tiny_network()))
        (found,) = running_trainings(results)
        assert (found.pid, found.fold, found.epochs, found.iterations) == (pid, "all", 500, 2)
        assert (found.model_folder, found.configuration) == (model, "3d_fullres")
        # followed (napari opened again): the epochs so far, then new ones, until detached
        done_before = len(read_progress(model))
        detach = threading.Event()
        seen = []
        for ev in follow(raw, results, detach=detach, poll=0.1):
            seen.append(ev)
            if ev.kind == "epoch" and ev.epoch >= done_before:
                detach.set()
        assert seen[0].kind == "step"
        assert f"process {pid}" in seen[0].message
        assert _epochs(seen) == list(range(len(_epochs(seen))))  # each once, in order
        assert seen[-1].kind == "detached"
        assert running_worker(model / "fold_all") == pid
        assert all(e.epochs == 500 and e.pseudo_dice for e in seen if e.kind == "epoch")
        # followed again and stopped: SIGTERM, as `kill PID`; it saves a checkpoint
        stop = threading.Event()
        seen = []
        for ev in follow(raw, results, stop=stop, poll=0.1):
            seen.append(ev)
            stop.set()
        assert seen[-1].kind == "stopped", [str(e) for e in seen]
        assert "stopped at epoch" in seen[-1].message
        assert "checkpoint" in seen[-1].message
    finally:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert _gone(pid)
    assert (model / "fold_all" / "checkpoint_latest.pth").is_file()
    assert running_worker(model / "fold_all") is None
    with pytest.raises(ScrollsegError, match=f"no training of {raw.name} is running"):
        next(follow(raw, results))


@pytest.mark.slow
def test_a_detached_training_followed_to_its_end(tmp_path: Path) -> None:
    raw, results, model, _pid = _leave_running(tmp_path, epochs=4)
    seen = list(follow(raw, results, poll=0.1))
    assert _epochs(seen) == [0, 1, 2, 3]
    assert [e.kind for e in seen[-2:]] == ["fold_done", "done"]
    assert seen[-1].model_folder == model
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()


# a stand-in for a detached training process: its pid file, then events in its log, one
# of them written in two pieces, and the start of one more when it is killed
FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    fold_dir, log, ready = sys.argv[1], sys.argv[2], sys.argv[3]
    marker = "\\x1escrollseg-event "
    def epoch(e):
        record = {"kind": "epoch", "fold": 0, "epoch": e, "epochs": 5, "train_loss": 0.5,
                  "val_loss": 0.6, "pseudo_dice": {"air": 0.9}, "epoch_time": 1.0}
        return marker + json.dumps(record) + "\\n"
    with open(os.path.join(fold_dir, "training.pid"), "w") as f:
        json.dump({"pid": os.getpid(), "started": time.time(), "epochs": 5, "log": log}, f)
    with open(log, "a") as out:
        while not os.path.exists(ready + ".go"):
            time.sleep(0.01)
        out.write("nnU-Net prints a line\\n" + epoch(1)); out.flush()  # replayed already
        time.sleep(0.3)
        line = epoch(2)
        out.write(line[:30]); out.flush(); time.sleep(0.3)  # a line in two pieces
        out.write(line[30:]); out.flush()
        out.write(epoch(3)[:25]); out.flush()  # killed in the middle of this one
        open(ready, "w").close()
        time.sleep(120)
    """
)


@pytest.mark.parametrize("final", [False, True], ids=["mid-training", "final-checkpoint"])
def test_follow_reads_a_log_written_in_pieces_until_the_process_is_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture, final: bool
) -> None:
    """Killed in the middle of its training: said so. Killed after its final checkpoint
    (during validation, or its fold_done written before the log was first read): done."""
    raw = _tiny_dataset(tmp_path)
    results = tmp_path / "results"
    model = results / raw.name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "progress.csv").write_text(
        "fold,epoch,train_loss,val_loss,ema_pseudo_dice,lr,epoch_time,dice_air,dice_ink\n"
        "0,0,0.9,0.8,0.1,0.01,2.0,0.5,0.0\n0,1,0.7,0.6,0.2,0.01,2.0,0.6,0.1\n"
    )
    log, ready = tmp_path / "fold0.log", tmp_path / "ready"
    proc = subprocess.Popen(  # "_train_worker" in its command line, as a real one
        [
            sys.executable,
            "-c",
            FAKE_WORKER,
            str(model / "fold_0"),
            str(log),
            str(ready),
            "napari_scrollseg.engine._train_worker",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not running_trainings(results) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = []
        for ev in follow(raw, results, poll=0.05):
            seen.append(ev)
            if ev.kind == "step":  # replay first, then the process writes on
                Path(str(ready) + ".go").touch()
            if ev.kind == "epoch" and ev.epoch == 2:
                deadline = time.monotonic() + 30
                while not ready.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if final:
                    (model / "fold_0" / "checkpoint_final.pth").touch()
                proc.kill()
                proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert _epochs(seen) == [0, 1, 2]
    replayed = next(e for e in seen if e.kind == "epoch")
    assert (replayed.fold, replayed.epochs, replayed.pseudo_dice) == (0, 5, {"air": 0.5, "ink": 0})
    if final:
        assert (seen[-1].kind, seen[-1].model_folder) == ("done", model)
        return
    assert seen[-1].kind == "stopped"
    assert f"ended before its last epoch (process {proc.pid} killed?)" in seen[-1].message
    # the command line: nothing left to follow is one clear message
    from napari_scrollseg.cli import main

    assert main(["train", str(raw), "--out", str(results), "--follow"]) != 0
    assert f"no training of {raw.name} is running" in capsys.readouterr().err
