"""Follow a training left running: ``train(detach=...)``, napari's "Leave it running".

A detached training process writes its output and its progress events to its fold's
log (``RESULTS/logs/...``), and ``fold_X/training.pid`` says which process it is, where
its log is and how many epochs it runs. :func:`follow` finds it again (e.g. in napari
opened the next day), replays the epochs so far from ``fold_X/progress.csv``, then
reads the events the process appends to its log until it ends, as :func:`train` yields
them: ``epoch`` per epoch, ``fold_done`` and ``done`` when it finishes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from napari_scrollseg.engine._train_worker import PID_FILE
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.train import (
    TrainEvent,
    _dataset,
    _fold_events,
    dice_summary,
    read_progress,
    running_record,
    running_worker,
    split_event,
)


@dataclass(frozen=True)
class RunningTraining:
    """A training process found in a results folder (its fold's ``training.pid``)."""

    model_folder: Path
    fold: int | str  # 0, 1, ... or "all", as train's folds
    pid: int
    log: Path | None  # None: started by a version that did not record it
    epochs: int | None
    iterations: int | None  # per epoch
    started: float

    @property
    def plans(self) -> str:
        """The plans identifier (``nnUNetTrainer__<plans>__<configuration>``)."""
        return self.model_folder.name.split("__")[1]

    @property
    def configuration(self) -> str:
        return self.model_folder.name.split("__")[-1]


def running_trainings(
    results_dir: str | os.PathLike, dataset: str | None = None
) -> list[RunningTraining]:
    """The trainings still running in ``results_dir`` (of ``dataset``, a ``Dataset###_Name``
    folder name, when given), the most recently started first."""
    found = []
    pattern = f"{dataset or 'Dataset*'}/*/fold_*/{PID_FILE}"
    for pid_file in Path(results_dir).expanduser().glob(pattern):
        record = running_record(pid_file.parent)
        if record is None:
            continue
        log = record.get("log")
        found.append(
            RunningTraining(
                model_folder=pid_file.parent.parent,
                fold=_fold(pid_file.parent.name.removeprefix("fold_")),
                pid=record["pid"],
                log=Path(log) if log else None,
                epochs=record.get("epochs"),
                iterations=record.get("iterations"),
                started=float(record.get("started", 0.0)),
            )
        )
    return sorted(found, key=lambda r: r.started, reverse=True)


def _fold(name: str) -> int | str:
    return int(name) if name.isdigit() else name


def follow(
    dataset_dir: str | os.PathLike,
    results_dir: str | os.PathLike,
    *,
    stop: threading.Event | None = None,
    detach: threading.Event | None = None,
    poll: float = 0.5,
    grace: float = 180.0,
) -> Iterator[TrainEvent]:
    """Follow the training of ``dataset_dir`` left running in ``results_dir``.

    Yields a ``step`` event, one ``epoch`` event per epoch done so far (from
    ``progress.csv``), then the process's own events as :func:`train` yields them,
    ``fold_done`` and ``done`` when it finishes. ``stop`` set: the process is asked to
    stop (SIGTERM, as ``kill PID``: it saves a checkpoint) and a last ``stopped`` event
    follows once it has. ``detach`` set: following ends with a ``detached`` event, the
    training goes on. A process that ends without finishing (killed outside) gives a
    ``stopped`` event that says so. Closing the generator early ends the following only,
    or, with ``stop`` set, asks the process to stop too (napari's Cancel).
    """
    ds = _dataset(dataset_dir)
    results = Path(results_dir).expanduser().resolve()
    found = running_trainings(results, ds.name)
    if not found:
        raise ScrollsegError(
            f"no training of {ds.name} is running in {results}: Follow shows one left "
            "running when napari closed; Train or Resume starts one"
        )
    run = found[0]
    if run.log is None:
        raise ScrollsegError(
            f"fold {run.fold} is trained by process {run.pid}, started by an older version "
            f"that did not record its log: its curves are in {run.model_folder / 'progress.png'}"
        )
    offset = run.log.stat().st_size if run.log.exists() else 0  # before the replay: no gap
    state = _Following(run, stop, detach, poll, grace)
    try:
        yield from _follow(state, offset)
    except GeneratorExit:  # closed early (napari's Cancel): stop the training if asked to
        if stop is not None and stop.is_set() and "sigterm" not in state.seen:
            _terminate(run.pid)
        raise


@dataclass
class _Following:
    run: RunningTraining
    stop: threading.Event | None
    detach: threading.Event | None
    poll: float
    grace: float
    seen: dict[str, dict] = field(default_factory=dict)  # the last event of each kind


def _terminate(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)  # it saves a checkpoint and exits


def _follow(state: _Following, offset: int) -> Iterator[TrainEvent]:
    run, seen = state.run, state.seen
    yield TrainEvent(
        "step",
        fold=run.fold,
        model_folder=run.model_folder,
        message=f"following fold {run.fold}, trained by process {run.pid} (left running); "
        f"log: {run.log}",
    )
    last = -1
    for row in read_progress(run.model_folder):
        if row["fold"] == str(run.fold):
            last = row["epoch"]
            yield _epoch_event(row, run)
    events = _log_events(state, offset)
    for event in _fold_events(events, run.fold, run.model_folder, run.log):
        if event.kind == "epoch" and event.epoch is not None and event.epoch <= last:
            continue  # already replayed from progress.csv
        yield event
        if event.kind == "detached":
            return
    finished = (run.model_folder / f"fold_{run.fold}" / "checkpoint_final.pth").is_file()
    if "fold_done" in seen or (finished and "cancelled" not in seen):
        # no fold_done: it ended during validation, or just before the log was first read
        dice = dice_summary(run.model_folder).get("per_class", {})
        yield TrainEvent("done", model_folder=run.model_folder, dice=dice)
        return
    if "cancelled" in seen:  # SIGTERM, from here or from `kill PID`
        ev = seen["cancelled"]
        why = f"stopped at epoch {ev['epoch'] + 1} ({ev['checkpoint']} saved)"
    else:
        why = f"ended before its last epoch (process {run.pid} killed?)"
    yield TrainEvent(
        "stopped",
        fold=run.fold,
        model_folder=run.model_folder,
        message=f"training of fold {run.fold} {why}; resume to continue from its latest "
        f"checkpoint (log: {run.log})",
    )


def _epoch_event(row: dict, run: RunningTraining) -> TrainEvent:
    curves = run.model_folder / "progress.png"
    return TrainEvent(
        "epoch",
        fold=run.fold,
        epoch=int(row["epoch"]),
        epochs=run.epochs,
        train_loss=row["train_loss"],
        val_loss=row["val_loss"],
        pseudo_dice={k.removeprefix("dice_"): v for k, v in row.items() if k.startswith("dice_")},
        epoch_time=row.get("epoch_time"),
        model_folder=run.model_folder,
        curves=curves if curves.exists() else None,
    )


def _log_events(state: _Following, offset: int) -> Iterator[dict]:
    """The events the process appends to its log after ``offset``, until it is gone;
    ``{"kind": "detached"}`` when ``detach`` is set. The last event of each kind is kept
    in ``seen`` (``sigterm`` once it was sent); ``cancelled`` (the process stopped on
    SIGTERM) and any event after ``stop`` is set are kept, not yielded."""
    run, stop, detach, seen = state.run, state.stop, state.detach, state.seen
    assert run.log is not None
    stopping: float | None = None
    pending = b""
    while True:
        if detach is not None and detach.is_set():
            yield {"kind": "detached", "pid": run.pid}
            return
        if stop is not None and stop.is_set() and stopping is None:
            stopping = time.monotonic()
            seen["sigterm"] = {}
            _terminate(run.pid)
        alive = running_worker(run.model_folder / f"fold_{run.fold}") == run.pid
        with suppress(FileNotFoundError), open(run.log, "rb") as f:  # not written yet
            f.seek(offset)  # read after the liveness check: nothing written before is missed
            pending += f.read()
            offset = f.tell()
        *lines, pending = pending.split(b"\n")
        for line in lines:
            try:
                _, event = split_event(line.decode(errors="replace"))
            except ValueError:  # an event line cut short (the process was killed)
                continue
            if event is None:
                continue
            seen[event["kind"]] = dict(event)
            if event["kind"] != "cancelled" and stopping is None:
                yield event  # once stopping, only the last event (as train's) is yielded
        if not alive:
            return
        if stopping is not None and time.monotonic() - stopping > state.grace:
            raise ScrollsegError(
                f"fold {run.fold}'s training (process {run.pid}) did not stop within "
                f"{state.grace:.0f} s of SIGTERM; kill -9 {run.pid} ends it (no checkpoint then)"
            )
        time.sleep(state.poll)
