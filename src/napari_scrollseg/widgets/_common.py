"""What every scrollseg dock widget shares.

- :func:`start_worker` runs an engine generator (``iter_export_dataset``, ...) off the GUI
  thread with napari's ``create_worker`` / ``thread_worker`` machinery; yielded events
  reach ``on_event`` in the GUI thread, a :class:`ProgressRow` follows events that carry
  ``done`` / ``total``, a failure becomes ONE napari notification, and ``worker.quit()``
  (the row's Cancel) closes the generator in its own thread, so the engine's ``finally``
  blocks clean up.
- :func:`notify_error` / :func:`notify_info` / :func:`notify_warning`: the one way widgets
  report to the user.
- :func:`session`: the small shared state (last dataset exported, models trained) through
  which widgets talk without importing each other.
- :func:`image_layers` / :func:`pick_image_layer` / :func:`level0`: 3D image layers.

Building these imports no torch; the engine's heavy parts load in the worker.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psygnal import Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget
from superqt.utils import GeneratorWorker as _SuperqtGeneratorWorker

from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    import napari
    from napari.layers import Image
    from qtpy.QtCore import QObject

log = logging.getLogger(__name__)

__all__ = [
    "EngineWorker",
    "ProgressRow",
    "Session",
    "image_layers",
    "layer_source",
    "level0",
    "notify_error",
    "notify_info",
    "notify_warning",
    "pick_image_layer",
    "qt_alive",
    "session",
    "start_worker",
]


# -- notifications ----------------------------------------------------------------------
def notify_error(exc: BaseException | str) -> str:
    """Show one napari error notification for ``exc``; return the message shown.

    A :class:`ScrollsegError` is shown as its message (it already says what to do); any
    other exception as ``<Type>: <message>`` (its traceback goes to the log).
    """
    from napari.utils.notifications import show_error

    if isinstance(exc, str):
        message = exc
    elif isinstance(exc, ScrollsegError):
        message = str(exc)
    else:
        log.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
        text = str(exc).strip().splitlines()
        message = f"{type(exc).__name__}: {text[0] if text else 'unexpected error'}"
        if len(message) > 300:
            message = message[:297] + "..."
    show_error(message)
    return message


def notify_info(message: str) -> None:
    """Show one napari info notification."""
    from napari.utils.notifications import show_info

    show_info(message)


def notify_warning(message: str) -> None:
    """Show one napari warning notification."""
    from napari.utils.notifications import show_warning

    show_warning(message)


# -- running engine generators ----------------------------------------------------------
class EngineWorker(_SuperqtGeneratorWorker):
    """A generator worker that closes its generator when it stops (Cancel included).

    Subclasses superqt's worker, not napari's, whose errors also go to napari's own
    traceback notification: :func:`start_worker` shows exactly one message instead.
    Errors raised by the generator (``RuntimeError`` included, which superqt's loop
    would only warn about) reach ``errored``. Pausing is not supported.
    """

    on_quit: Callable[[], None] | None = None  # wakes what the generator waits on

    def quit(self) -> None:
        """Ask the generator to stop at its next yield, and wake it if it waits
        (``on_quit``): napari's exit quits every worker, then waits for them all."""
        super().quit()
        if self.on_quit is not None:
            self.on_quit()

    def work(self) -> Any:
        try:
            while not self.abort_requested:
                try:
                    event = self._gen.send(self._next_value())
                except StopIteration as stop:
                    return stop.value
                try:
                    self.yielded.emit(event)
                except RuntimeError as exc:  # the worker's Qt object is gone (app closing)
                    return exc  # superqt's convention: run() only warns
            self._gen.close()  # before `aborted`: listeners see the engine's cleanup done
            self.aborted.emit()
            return None
        finally:
            # in the worker thread: GeneratorExit reaches the engine's `finally` blocks
            self._gen.close()


def start_worker(
    generator_function: Callable[..., Generator[Any, Any, Any]],
    *args: Any,
    on_event: Callable[[Any], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    on_quit: Callable[[], None] | None = None,
    progress: ProgressRow | None = None,
    **kwargs: Any,
) -> EngineWorker:
    """Run ``generator_function(*args, **kwargs)`` in a thread and start it.

    Parameters
    ----------
    generator_function
        An engine generator function; it yields progress events and returns a result.
    on_event
        Called in the GUI thread with each yielded event.
    on_done
        Called in the GUI thread with the generator's return value (not after Cancel).
    on_error
        Called in the GUI thread with the exception, after the notification is shown.
    on_finished
        Called in the GUI thread when the worker has stopped, in every case (done,
        failed or cancelled).
    on_quit
        Called (in the quitting thread) when the worker is asked to stop: it should wake
        the generator if it blocks between two yields (e.g. set the event it waits on).
    progress
        A :class:`ProgressRow` to follow the worker (bar, status, Cancel).

    Returns
    -------
    EngineWorker
        Already started; ``worker.quit()`` cancels it (the generator is closed at its
        next yield), ``worker.finished`` fires in every case. Pass callbacks here rather
        than connecting them afterwards: a short run may finish before a later
        ``connect`` (its signals would be lost).
    """
    from napari.qt.threading import create_worker

    worker = create_worker(
        generator_function,
        *args,
        _start_thread=False,
        _worker_class=EngineWorker,
        _ignore_errors=True,
        **kwargs,
    )

    def failed(exc: BaseException) -> None:
        notify_error(exc)
        if on_error is not None:
            on_error(exc)

    worker.on_quit = on_quit
    worker.errored.connect(failed)
    if on_event is not None:
        worker.yielded.connect(on_event)
    if on_done is not None:
        worker.returned.connect(on_done)
    if progress is not None:
        progress.attach(worker)
    if on_finished is not None:
        worker.finished.connect(on_finished)
    _make_room()
    worker.start()
    return worker


def _make_room() -> None:
    """Let the next worker start at once: napari's workers share Qt's global thread pool,
    sized to the CPU count (2 on a small laptop), and a job the user starts (an export,
    a live request) must not queue behind long ones (a training watched for hours, a full
    run)."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    if pool.activeThreadCount() >= pool.maxThreadCount():
        pool.setMaxThreadCount(pool.activeThreadCount() + 1)


def event_fraction(event: Any) -> tuple[int, int] | None:
    """``(done, total)`` of a progress event (attributes or mapping keys), else None."""
    get = event.get if isinstance(event, dict) else lambda k: getattr(event, k, None)
    done, total = get("done"), get("total")
    if isinstance(done, int | float) and isinstance(total, int | float) and total > 0:
        return int(done), int(total)
    return None


class ProgressRow(QWidget):
    """A progress bar, a status label and a Cancel button that follow one worker.

    ``describe(event) -> str`` (optional) turns an event into the status text.
    """

    def __init__(
        self, parent: QWidget | None = None, describe: Callable[[Any], str] | None = None
    ) -> None:
        super().__init__(parent)
        self.describe = describe
        self.bar = QProgressBar(self)
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar, 2)
        layout.addWidget(self.status, 3)
        layout.addWidget(self.cancel_button)
        self.worker: EngineWorker | None = None

    @property
    def running(self) -> bool:
        """Whether the attached worker has not finished yet."""
        return self.worker is not None

    def attach(self, worker: EngineWorker) -> None:
        """Follow ``worker``: busy bar at start, events move the bar, Cancel quits it."""
        self.worker = worker
        self.bar.setRange(0, 0)  # busy until the first event with done/total
        self.status.setText("starting...")
        self.cancel_button.setEnabled(True)
        worker.yielded.connect(self.show_event)
        worker.errored.connect(lambda exc: self.status.setText("failed"))
        worker.aborted.connect(lambda: self.status.setText("cancelled"))
        worker.returned.connect(self._done)
        worker.finished.connect(functools.partial(self._finished, worker))

    def show_event(self, event: Any) -> None:
        """Move the bar and status to ``event``."""
        fraction = event_fraction(event)
        if fraction is not None:
            done, total = fraction
            self.bar.setRange(0, total)
            self.bar.setValue(min(done, total))
        if self.describe is not None:
            self.status.setText(self.describe(event))
        elif fraction is not None:
            self.status.setText(f"{fraction[0]}/{fraction[1]}")

    def _done(self, result: Any) -> None:
        self.bar.setRange(0, max(1, self.bar.maximum()))
        self.bar.setValue(self.bar.maximum())
        self.status.setText("done")

    def cancel(self) -> None:
        """Ask the worker to stop (the engine generator is closed at its next yield)."""
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("cancelling...")
            self.cancel_button.setEnabled(False)

    def _finished(self, worker: EngineWorker) -> None:
        if worker is not self.worker:  # an earlier worker, ended after the next one started
            return
        self.worker = None
        self.cancel_button.setEnabled(False)
        if self.bar.maximum() == 0:
            self.bar.setRange(0, 1)
            self.bar.setValue(0)


# -- shared session ---------------------------------------------------------------------
class Session:
    """State widgets share: the last dataset exported and the models trained.

    ``changed`` is emitted with the name of what changed (``"last_dataset"`` or
    ``"trained_models"``).
    """

    changed = Signal(str)

    def __init__(self) -> None:
        self._last_dataset: Path | None = None
        self._trained_models: list[Path] = []

    @property
    def last_dataset(self) -> Path | None:
        """The ``Dataset<ID>_<Name>`` folder exported last, or None."""
        return self._last_dataset

    @last_dataset.setter
    def last_dataset(self, path: str | Path | None) -> None:
        self._last_dataset = None if path is None else Path(path)
        self.changed.emit("last_dataset")

    @property
    def trained_models(self) -> list[Path]:
        """Model folders trained in this session, oldest first (a copy)."""
        return list(self._trained_models)

    def add_trained_model(self, path: str | Path) -> None:
        """Record a trained model folder (once)."""
        path = Path(path)
        if path not in self._trained_models:
            self._trained_models.append(path)
        self.changed.emit("trained_models")

    def follow(self, widget: QObject, callback: Callable[[str], None]) -> None:
        """Call ``callback(what)`` on each change while ``widget`` lives.

        A widget closed in napari has its Qt object deleted while its Python object may
        live on; a plain ``changed.connect`` would then call into the deleted widget
        (``RuntimeError: wrapped C/C++ object ... has been deleted``) from whichever
        widget changes the session next. The relay holds neither strongly and drops
        itself when the widget is destroyed.
        """
        widget_ref = weakref.ref(widget)
        callback_ref = (
            weakref.WeakMethod(callback) if inspect.ismethod(callback) else (lambda: callback)
        )

        def relay(what: str) -> None:
            owner, target = widget_ref(), callback_ref()
            if owner is None or target is None or not qt_alive(owner):
                self.changed.disconnect(relay)
                return
            target(what)

        self.changed.connect(relay)
        widget.destroyed.connect(lambda *_: self.changed.disconnect(relay, missing_ok=True))


_SESSION: Session | None = None


def session() -> Session:
    """The one :class:`Session` of this Python process."""
    global _SESSION
    if _SESSION is None:
        _SESSION = Session()
    return _SESSION


def qt_alive(obj: QObject) -> bool:
    """False once the C++ side of a Qt object has been deleted."""
    try:
        obj.objectName()
    except RuntimeError:
        return False
    return True


# -- layers -----------------------------------------------------------------------------
def level0(layer: Image) -> Any:
    """The full-resolution array of an image layer (level 0 when multiscale)."""
    return layer.data[0] if layer.multiscale else layer.data


def image_layers(viewer: napari.Viewer) -> list[Image]:
    """The viewer's 3D (z, y, x) image layers, grey-level (not RGB), top layer first."""
    from napari.layers import Image

    return [
        layer
        for layer in reversed(viewer.layers)
        if isinstance(layer, Image) and not layer.rgb and level0(layer).ndim == 3
    ]


def pick_image_layer(viewer: napari.Viewer, name: str | None = None) -> Image:
    """The image layer called ``name`` (must be 3D), else the selected or top 3D image.

    Raises
    ------
    ScrollsegError
        When there is no such layer or it is not a 3D grey-level image.
    """
    from napari.layers import Image

    if name is not None:
        if name not in viewer.layers:
            raise ScrollsegError(f"there is no layer called {name!r}; open a volume first")
        layer = viewer.layers[name]
        if not isinstance(layer, Image) or layer.rgb or level0(layer).ndim != 3:
            shape = tuple(getattr(level0(layer), "shape", ()))
            raise ScrollsegError(
                f"layer {name!r} is not a 3D (z, y, x) grey-level image (shape {shape}); "
                "annotate a 3D volume (open it with File > Open or `scrollseg phantom`)"
            )
        return layer
    candidates = image_layers(viewer)
    if not candidates:
        raise ScrollsegError("no 3D image layer: open a volume first (File > Open)")
    active = viewer.layers.selection.active
    return active if active in candidates else candidates[0]


def layer_source(layer: Any) -> Path | None:
    """The file or folder a layer was read from (scrollseg metadata or napari's source)."""
    meta = getattr(layer, "metadata", None) or {}
    source = meta.get("source") if isinstance(meta, dict) else None
    if source is None:
        source = getattr(getattr(layer, "source", None), "path", None)
    if not source or "://" in str(source):
        return None
    return Path(source)
