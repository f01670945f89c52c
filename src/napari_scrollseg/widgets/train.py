"""The train dock widget: nnU-Net training of an exported dataset, with live curves.

One engine call, :func:`napari_scrollseg.engine.train.train`, runs in a background
thread (:func:`~napari_scrollseg.widgets._common.start_worker`) and nnU-Net itself in
the engine's subprocess, so the GUI stays responsive and torch never loads here.
Each ``epoch`` event adds a point to the curves (train/val loss, pseudo Dice per
class, epoch time) and updates the ETA; each finished fold shows its validation
Dice and adds the model to :func:`~napari_scrollseg.widgets._common.session`'s
``trained_models`` (the live-inference widget lists them). Cancel stops the
subprocess after its current iteration (a checkpoint is saved; Resume continues from it);
closing napari while training asks whether to stop it or leave it running without
napari (the engine's ``detach``: the training process goes on alone and keeps writing
its checkpoints, ``progress.png`` and ``progress.csv`` to the model folder).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, LineEdit, PushButton, SpinBox
from qtpy.QtCore import QEvent, QObject, Qt, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QLabel, QMessageBox, QVBoxLayout, QWidget

from napari_scrollseg.engine.demo import tiny_network
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.train import TrainEvent, train
from napari_scrollseg.widgets._common import (
    ProgressRow,
    notify_error,
    notify_info,
    notify_warning,
    session,
    start_worker,
)

if TYPE_CHECKING:
    import napari

    from napari_scrollseg.engine.train_follow import RunningTraining

CONFIGURATIONS = ("3d_fullres", "2d", "3d_lowres")
DEVICES = ("auto", "cpu", "cuda", "mps")
NICE = 10  # the training runs at a lower CPU priority than napari: the GUI stays fluid


def parse_folds(text: str) -> list[int | str]:
    """``"0"``, ``"0, 1 2"`` or ``"all"`` as a list of folds."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise ScrollsegError("give the folds to train: e.g. 0, or 0 1 2 3 4, or all")
    folds: list[int | str] = []
    for p in parts:
        if p.lower() == "all":
            folds.append("all")
        elif p.isdigit():
            folds.append(int(p))
        else:
            raise ScrollsegError(f"folds must be numbers or 'all', got {p!r}")
    return folds


class _CloseGuard(QObject):
    """Asks before napari's window closes while a training runs: stop it, leave it
    running without napari, or do not close."""

    def __init__(self, widget: TrainWidget) -> None:
        super().__init__(widget)
        self.widget = widget

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Close and self.widget.running:
            answer = self.widget.ask_on_close()
            if answer == "stop":
                self.widget.stop(wait=True)
                return False
            if answer == "leave":
                self.widget.leave_running(wait=True)
                return False
            event.ignore()
            return True
        return False


class TrainWidget(QWidget):
    """Train nnU-Net on an exported dataset; curves per epoch; Cancel and Resume."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        import napari.qt.threading  # noqa: F401  (here, not on the first click: slow import)

        self.viewer = viewer
        last = session().last_dataset
        self.dataset = FileEdit(label="dataset", mode="d", value=last or "")
        self.results = FileEdit(label="results folder", mode="d", value="")
        self.configuration = ComboBox(
            label="configuration", choices=list(CONFIGURATIONS), value="3d_fullres"
        )
        self.folds = LineEdit(label="folds", value="0")
        self.device = ComboBox(label="device", choices=list(DEVICES), value="auto")
        self.epochs = SpinBox(label="epochs", value=100, min=1, max=100_000)
        self.iterations = SpinBox(label="iterations / epoch", value=250, min=1, max=100_000)
        self.small = CheckBox(text="small network for CPU", value=False)
        self.validate = CheckBox(text="validate each fold (Dice per class)", value=True)
        self.pretrained = FileEdit(
            label="fine-tune from",
            mode="r",
            filter="*.pth",
            nullable=True,
            value=None,
            tooltip="a checkpoint to start from (nnU-Net's -pretrained_weights); empty: scratch",
        )
        self.learning_rate = LineEdit(
            label="learning rate",
            value="",
            tooltip="empty: nnU-Net's 0.01; e.g. 0.001 to fine-tune",
        )
        self.seed = LineEdit(
            label="seed",
            value="",
            tooltip=(
                "a whole number seeds the training: repeatable with the small CPU network "
                "(augmentation in the training process); empty: unseeded, as nnU-Net"
            ),
        )
        self.train_button = PushButton(text="Train")
        self.resume_button = PushButton(text="Resume")
        self.follow_button = PushButton(
            text="Follow",
            tooltip="show a training left running when napari closed: its curves and "
            "progress; Cancel stops it (a checkpoint is saved)",
        )
        self.form = Container(
            widgets=[
                self.dataset,
                self.results,
                self.configuration,
                self.folds,
                self.device,
                self.epochs,
                self.iterations,
                self.small,
                self.validate,
                self.pretrained,
                self.learning_rate,
                self.seed,
                Container(
                    widgets=[self.train_button, self.resume_button, self.follow_button],
                    layout="horizontal",
                    labels=False,
                ),
            ]
        )
        self.progress = ProgressRow(self, describe=self._describe)
        self.progress.cancel_button.clicked.disconnect()  # here: stop first, then quit
        self.progress.cancel_button.clicked.connect(self._cancel_clicked)
        self.dice_label = QLabel("", self)
        self.dice_label.setWordWrap(True)
        self.curves = TrainCurves(self)
        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addWidget(self.progress)
        layout.addWidget(self.curves.canvas, 1)
        layout.addWidget(self.dice_label)
        self.train_button.changed.connect(lambda _=None: self.start(resume=False))
        self.resume_button.changed.connect(lambda _=None: self.start(resume=True))
        self.follow_button.changed.connect(lambda _=None: self.follow_running())
        self.worker: Any = None
        self._stop_event: threading.Event | None = None
        self._detach_event: threading.Event | None = None
        self.model_folder: Path | None = None
        self.last_event: TrainEvent | None = None
        self.event_times: list[tuple[float, str]] = []  # (perf_counter, kind)
        self._offered: int | None = None  # the training left running we told of
        self._n_folds = 1  # folds the running engine call trains (progress, ETA)
        self.dataset.changed.connect(self._default_results)
        self.dataset.changed.connect(self._offer_follow)
        self.results.changed.connect(self._offer_follow)
        session().follow(self, self._on_session)
        self._default_results()
        self._offer_follow()
        self._close_guard = _CloseGuard(self)
        window = getattr(getattr(viewer, "window", None), "_qt_window", None)
        if window is not None:
            window.installEventFilter(self._close_guard)

    # -- form ------------------------------------------------------------------------------
    def _on_session(self, what: str) -> None:
        if what == "last_dataset" and session().last_dataset is not None and not self.running:
            self.dataset.value = session().last_dataset

    def _default_results(self, _value: Any = None) -> None:
        """Results next to the raw datasets folder, unless the user chose a folder."""
        dataset = Path(str(self.dataset.value))
        if str(self.dataset.value) in ("", ".") or str(self.results.value) not in ("", "."):
            return
        self.results.value = dataset.parent.parent / "nnUNet_results"

    def options(self) -> dict[str, Any]:
        """The keyword arguments for :func:`~napari_scrollseg.engine.train.train`."""
        dataset = str(self.dataset.value)
        results = str(self.results.value)
        if dataset in ("", "."):
            raise ScrollsegError(
                "choose a dataset folder (Dataset<ID>_<Name>), or export one with the export widget"
            )
        if results in ("", "."):
            raise ScrollsegError("choose a results folder for the trained model")
        small = bool(self.small.value)
        return {
            "dataset_dir": Path(dataset),
            "results_dir": Path(results),
            "configuration": self.configuration.value,
            "folds": parse_folds(self.folds.value),
            "device": None if self.device.value == "auto" else self.device.value,
            "epochs": int(self.epochs.value),
            "iterations": int(self.iterations.value),
            "validate": bool(self.validate.value),
            "plans_overrides": tiny_network() if small else None,
            "num_processes": 1 if small else 2,
            "da_processes": 0 if small else None,
            "nice": NICE,
            "pretrained_weights": self._pretrained(),
            "learning_rate": self._learning_rate(),
            "seed": self._seed(),
        }

    def _pretrained(self) -> Path | None:
        value = self.pretrained.value
        return None if value is None or str(value) in ("", ".") else Path(value)

    def _learning_rate(self) -> float | None:
        text = str(self.learning_rate.value).strip()
        if not text:
            return None
        try:
            rate = float(text)
        except ValueError:
            rate = 0.0
        if not rate > 0:
            raise ScrollsegError(
                f"learning rate must be a number above 0 (e.g. 0.001), got {text!r}"
            )
        return rate

    def _seed(self) -> int | None:
        text = str(self.seed.value).strip()
        if not text:
            return None
        if not text.isdigit():
            raise ScrollsegError(f"seed must be a whole number (e.g. 0), got {text!r}")
        return int(text)

    # -- running ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether a training started here is still going."""
        return self.worker is not None

    def start(self, resume: bool = False) -> Any:
        """Start (or resume) the training with the form's values; returns the worker."""
        options = self._ready_options()
        if options is None:
            return None
        dataset = options.pop("dataset_dir")
        self.curves.clear(resume=resume)
        self._n_folds = len(options["folds"])
        return self._launch(train, dataset, resume=resume, **options)

    def follow_running(self) -> Any:
        """Follow this dataset's training left running when napari closed (the engine's
        :func:`~napari_scrollseg.engine.train_follow.follow`); returns the worker."""
        from napari_scrollseg.engine.train_follow import follow, running_trainings

        options = self._ready_options()
        if options is None:
            return None
        found = running_trainings(options["results_dir"], options["dataset_dir"].name)
        if found:
            self._show_settings(found[0])
        self.curves.clear()
        self._n_folds = 1  # a training left running finishes its one fold
        return self._launch(follow, options["dataset_dir"], options["results_dir"])

    def _show_settings(self, run: RunningTraining) -> None:
        """The form takes the followed training's settings: Resume, after a Cancel,
        continues that training (its fold, configuration, network, epochs)."""
        self.folds.value = str(run.fold)
        if run.configuration in CONFIGURATIONS:
            self.configuration.value = run.configuration
        self.small.value = run.plans.endswith("Scrollseg")  # the widget's only overrides
        if run.epochs:
            self.epochs.value = run.epochs
        if run.iterations:
            self.iterations.value = run.iterations

    def _ready_options(self) -> dict[str, Any] | None:
        """The form's options, or None (said to the user) when they are bad or a training
        runs here already."""
        if self.running:
            notify_info("a training is already running: cancel it first")
            return None
        try:
            return self.options()
        except ScrollsegError as exc:
            notify_error(exc)
            return None

    def _launch(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the engine call ``fn`` (train or follow) in the background, with Cancel
        (``stop``) and "Leave it running" (``detach``) wired to it."""
        self._stop_event = threading.Event()
        self._detach_event = threading.Event()
        self.dice_label.setText("")
        self.last_event = None
        self._set_running(True)
        self.worker = start_worker(
            fn,
            *args,
            stop=self._stop_event,
            detach=self._detach_event,
            **kwargs,
            on_event=self._on_event,
            progress=self.progress,
            on_finished=self._finished,
        )
        return self.worker

    def _offer_follow(self, _value: Any = None, tell: bool = True) -> None:
        """Say so (``tell``) when this dataset has a training left running (Follow shows
        it); the Follow button's label says it too."""
        from napari_scrollseg.engine.train_follow import running_trainings

        dataset, results = str(self.dataset.value), str(self.results.value)
        if self.running or "." in (dataset, results) or "" in (dataset, results):
            return
        found = running_trainings(results, Path(dataset).name)
        self.follow_button.text = "Follow (running)" if found else "Follow"
        offered, self._offered = self._offered, found[0].pid if found else None
        if tell and found and offered != found[0].pid:  # once per training
            run = found[0]
            notify_info(
                f"fold {run.fold} of {Path(dataset).name} is still being trained (process "
                f"{run.pid}, left running): Follow shows its progress"
            )

    def _cancel_clicked(self) -> None:
        """Stop the training: ``stop`` is set before the worker is quit, so that the engine
        call sees it even when it is closed at a yield (follow then stops the process)."""
        if self._stop_event is not None:
            self._stop_event.set()
        self.progress.cancel()

    def stop(self, wait: bool = False, timeout: float = 180.0) -> None:
        """Stop the training (its subprocess saves a checkpoint and exits)."""
        if self._stop_event is not None:
            self._stop_event.set()
        if self.worker is not None:
            self.worker.quit()
            if wait:
                self._wait(timeout)

    def leave_running(self, wait: bool = False, timeout: float = 60.0) -> None:
        """Let the training process go on without napari (the engine's ``detach``)."""
        if self._detach_event is not None:
            self._detach_event.set()
        if wait:
            self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        from qtpy.QtCore import QCoreApplication, QElapsedTimer

        timer = QElapsedTimer()
        timer.start()
        while self.worker is not None and timer.elapsed() < timeout * 1000:
            QCoreApplication.processEvents()
            threading.Event().wait(0.02)

    def ask_on_close(self) -> str:
        """``"stop"``, ``"leave"`` (training goes on without napari) or ``"cancel"``."""
        box = QMessageBox(self)
        box.setObjectName("scrollseg-training-running")
        box.setWindowTitle("Training is running")
        box.setText(
            "A training is running. Stop it (a checkpoint is saved: Resume continues from "
            "it), or leave it running without napari (it keeps writing its checkpoints and "
            "curves to the results folder)?"
        )
        stop = box.addButton("Stop training", QMessageBox.ButtonRole.DestructiveRole)
        leave = box.addButton("Leave it running", QMessageBox.ButtonRole.AcceptRole)
        box.addButton("Cancel", QMessageBox.ButtonRole.RejectRole)
        box.exec()
        clicked = box.clickedButton()
        return "stop" if clicked is stop else "leave" if clicked is leave else "cancel"

    def _set_running(self, running: bool) -> None:
        for button in (self.train_button, self.resume_button, self.follow_button):
            button.enabled = not running

    def _finished(self) -> None:
        self.worker = None
        self._set_running(False)
        self._offer_follow(tell=False)  # the Follow button's label: is one still running?

    def _on_event(self, event: TrainEvent) -> None:
        self.event_times.append((time.perf_counter(), event.kind))
        self.last_event = event
        if event.model_folder is not None:
            self.model_folder = Path(event.model_folder)
        if event.kind == "epoch":
            self.curves.add(event)
            done, total = self.curves.progress(event, self._n_folds)
            self.progress.bar.setRange(0, total)
            self.progress.bar.setValue(done)
        elif event.kind == "fold_done":
            if event.dice:
                text = ", ".join(f"{k} {v:.3f}" for k, v in event.dice.items())
                self.dice_label.setText(
                    self.dice_label.text() + f"fold {event.fold} validation Dice: {text}\n"
                )
            if event.model_folder is not None:
                session().add_trained_model(event.model_folder)
            if event.warning:  # also kept in the widget: a later toast hides this one
                self.dice_label.setText(self.dice_label.text() + f"warning: {event.warning}\n")
                notify_warning(event.warning)
        elif event.kind == "done":
            if event.model_folder is not None:
                session().add_trained_model(event.model_folder)
            notify_info(str(event))
        elif event.kind in ("stopped", "detached"):
            notify_info(event.message)

    def _describe(self, event: TrainEvent) -> str:
        if event.kind == "epoch":
            eta = self.curves.eta(event, self._n_folds)
            return f"{event}; ETA {_duration(eta)}"
        return str(event)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _ImageLabel(QLabel):
    """A label that shows one image scaled to its size, aspect kept."""

    def __init__(self, text: str, parent: QWidget | None = None) -> None:
        super().__init__(text, parent)
        self.image = QImage()
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)

    def set_image(self, image: QImage) -> None:
        self.image = image
        self._rescale()

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        self._rescale()

    def _rescale(self) -> None:
        if not self.image.isNull():
            self.setPixmap(
                QPixmap.fromImage(self.image).scaled(
                    self.size(),
                    Qt.AspectRatioMode.KeepAspectRatio,
                    Qt.TransformationMode.SmoothTransformation,
                )
            )


class TrainCurves(QObject):
    """The live plot: loss, pseudo Dice per class and epoch time per epoch.

    The training process draws ``progress.png`` after each epoch
    (:func:`~napari_scrollseg.engine.train.write_curves`); here a one-thread pool
    loads the finished image and the GUI thread only shows it. matplotlib never runs
    in napari's process: drawing there held the GIL for about a second per epoch and
    stalled the GUI thread by up to 270 ms on a busy 2-core machine. ``canvas`` is the
    widget; ``events`` the epochs seen (for the progress bar and ETA).
    """

    loaded = Signal(QImage, str)

    def __init__(self, parent: QWidget | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(parent)
        self.canvas = _ImageLabel("the curves appear after the first epoch", parent)
        self.canvas.setMinimumSize(300, 270)
        self.loaded.connect(self._show)
        self.events: list[TrainEvent] = []
        self.shown: Path | None = None  # where they came from
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-curves")
        self._lock = threading.Lock()
        self._pending: Path | None = None
        self._future: Any = None

    def clear(self, resume: bool = False) -> None:
        if not resume:
            self.events = []

    def add(self, event: TrainEvent) -> None:
        """Add one ``epoch`` event (an epoch redone after a resume replaces the old one)
        and show its curves."""
        self.events = [e for e in self.events if (e.fold, e.epoch) != (event.fold, event.epoch)] + [
            event
        ]
        if event.curves is not None:
            self.load(event.curves)

    def load(self, path: str | Path) -> None:
        """Show the curves image at ``path`` (read off the GUI thread)."""
        with self._lock:
            idle = self._pending is None
            self._pending = Path(path)
            if idle:
                self._future = self._pool.submit(self._load_pending)

    def points(self) -> int:
        """How many epochs were reported."""
        return len(self.events)

    def wait(self) -> None:
        """Wait until the last image asked for is loaded (its signal may still be queued)."""
        while True:
            with self._lock:
                future = self._future
            if future is None:
                return
            future.result()
            with self._lock:
                if self._future is future and self._pending is None:
                    return

    def progress(self, event: TrainEvent, n_folds: int) -> tuple[int, int]:
        folds_done = len({e.fold for e in self.events} - {event.fold})
        total = max(1, (event.epochs or 1) * max(n_folds, 1))
        return min(total, folds_done * (event.epochs or 1) + event.epoch + 1), total

    def eta(self, event: TrainEvent, n_folds: int) -> float | None:
        times = [e.epoch_time for e in self.events[-10:] if e.epoch_time]
        if not times or event.epochs is None or event.epoch is None:
            return None
        done, total = self.progress(event, n_folds)
        return (total - done) * sum(times) / len(times)

    # -- loading (background thread) --------------------------------------------------------
    def _load_pending(self) -> None:
        while True:
            with self._lock:
                path, self._pending = self._pending, None
            if path is None:
                return
            image = QImage(str(path))
            if not image.isNull():
                self.loaded.emit(image, str(path))

    def _show(self, image: QImage, path: str) -> None:
        self.shown = Path(path)
        self.canvas.set_image(image)
