"""Live inference dock widget: one click (or Shift-P) predicts the region on screen.

The widget only wires the viewer to :class:`~napari_scrollseg.engine.live.LivePredictor`:
it reads the view from napari's camera and canvas (2D: the visible field at the current
slice; 3D: the volume under the field of view), submits it, and shows each block that
lands in two result layers (a probability image of the chosen class and the argmax
labels) placed over the scan; the GUI thread does one layer operation per event-loop
turn and nothing heavier. The two layers are added (empty) once the model has loaded
("Load model", or the first request), so requests only re-point them. Zoomed out on a
pyramid past the tile cap, the engine answers with a coarse preview on a coarser level
(the status says so). Follow mode re-predicts when the view has rested for 300 ms.
Building the widget imports no torch; the model loads on the predictor's worker thread.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from qtpy.QtCore import QObject, QTimer, Signal

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.widgets._common import image_layers, notify_error, notify_info, session
from napari_scrollseg.widgets._models import device_choices, model_choices, remember_model
from napari_scrollseg.widgets._view import camera_of, view_box

if TYPE_CHECKING:
    import napari

    from napari_scrollseg.engine.live import LiveEvent, LivePredictor, LiveRequest

log = logging.getLogger(__name__)

KEY = "Shift-P"
FOLLOW_MS = 300
PROB_LAYER = "live probability"
LABELS_LAYER = "live labels"


def _repoint(viewer: Any, layer: Any, data: Any, scale: Any, translate: Any) -> None:
    """Give ``layer`` new data, scale and translate with one redraw instead of three.

    Each of the three makes napari re-check the viewer's dims (~17-35 ms of GUI time
    here): an unchanged scale or translate is not set again, and the dims are re-checked
    once, only when the layer's new extent leaves the viewer's current range (a result
    over the scan never does: then the re-check would change nothing).
    """
    import numpy as np

    block = getattr(layer, "_block_refresh", contextlib.nullcontext)  # napari's own batching
    recheck = getattr(viewer, "_on_layers_change", None)  # napari's dims update
    with contextlib.ExitStack() as stack:
        stack.enter_context(block())
        if recheck is not None:
            for emitter in (layer.events.scale, layer.events.translate, layer.events.data):
                stack.enter_context(emitter.blocker(recheck))
        if not np.allclose(layer.scale[-len(scale) :], scale):
            layer.scale = scale
        if not np.allclose(layer.translate[-len(translate) :], translate):
            layer.translate = translate
        layer.data = data
    if recheck is not None and not _inside(layer, viewer.dims.range):
        recheck()
    layer.refresh()


def _inside(layer: Any, ranges: Any) -> bool:
    """Whether the layer's world extent and step leave the viewer's dims ranges as they
    are (inside them, no finer step)."""
    extent = layer.extent
    lows, highs, steps = extent.world[0], extent.world[1], extent.step
    n = len(lows)
    if n > len(ranges):
        return False
    return all(
        r.start <= lo and hi <= r.stop and step >= r.step * (1 - 1e-9)
        for lo, hi, step, r in zip(lows, highs, steps, ranges[-n:])
    )


#: what loading a model imports, warmed when the widget opens
WARM_MODULES = (
    "napari_scrollseg.engine.predict",
    "napari_scrollseg.engine.live",
    "torch",
    "nnunetv2.utilities.plans_handling.plans_handler",
)


def _warm_imports() -> None:
    """Import the engine's live machinery, then torch and nnU-Net's plans handling (libtorch
    loaded with the GIL released: ``preload_torch``), off the GUI thread, once. The first
    Load / Predict then spends no time importing (3-4 s here), and napari meets torch's
    import-time GIL holds while the user is still choosing a model."""
    from napari_scrollseg.engine.model import preload_torch

    preload_torch()
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # the model's own load will report it
            log.debug("warming %s failed", name, exc_info=True)


class _Relay(QObject):
    """Carries engine events from the predictor's worker thread to the GUI thread."""

    event = Signal(object)


class LiveWidget(Container):
    """Predict the view with a warm model; results land in two layers over the scan."""

    def __init__(self, viewer: napari.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = viewer
        self.image = ComboBox(label="image", choices=self._image_names)
        self.model = ComboBox(label="model", choices=model_choices)
        self.model_path = FileEdit(
            label="model folder/zip", mode="r", filter="*.zip", nullable=True, value=None
        )
        self.folds = LineEdit(label="folds", value="", tooltip="e.g. 0,1; empty: every fold")
        self.device = ComboBox(label="device", choices=lambda _w: device_choices(), value="auto")
        self.step = FloatSpinBox(label="step", value=0.5, min=0.1, max=1.0, step=0.05)
        self.mirror = CheckBox(text="mirroring (TTA)", value=True)
        self.precision = ComboBox(label="precision", choices=["auto", "half", "float"])
        self.max_tiles = SpinBox(
            label="max tiles",
            value=0,
            min=0,
            max=100_000,
            tooltip="tiles per request; 0: about one second at the last measured rate",
        )
        self._class_names: list[str] = []
        self.show_class = ComboBox(label="probability of", choices=lambda _w: self._class_names)
        self.follow = CheckBox(text="follow the view (re-predict after 300 ms)", value=False)
        self.load_button = PushButton(text="Load model")
        self.predict_button = PushButton(text=f"Predict view ({KEY})")
        self.status = Label(value="")
        self.timing = Label(value="")
        for label in (self.status, self.timing):
            label.native.setWordWrap(True)  # a long line must not widen the dock
        self.extend(
            [
                self.image,
                self.model,
                self.model_path,
                self.folds,
                self.device,
                self.step,
                self.mirror,
                self.precision,
                self.max_tiles,
                self.show_class,
                self.follow,
                self.load_button,
                self.predict_button,
                self.status,
                self.timing,
            ]
        )
        self.predictor: LivePredictor | None = None
        self._key: tuple | None = None
        self._cache: Any = None
        self._request: LiveRequest | None = None
        self._loading: LiveRequest | None = None  # a load_model() on the worker
        self.finished: LiveRequest | None = None  # the last request shown to the end
        self._placed: dict[str, tuple[int, str]] = {}  # layer -> (request id, class) shown
        self._updating = False
        self._t_submit = 0.0
        self._display_s = 0.0
        self._relay = _Relay()
        self._relay.event.connect(self._on_event)
        self._refresh = QTimer()
        self._refresh.setSingleShot(True)
        self._refresh.setInterval(30)
        self._refresh.timeout.connect(self._refresh_layers)
        self._follow_timer = QTimer()
        self._follow_timer.setSingleShot(True)
        self._follow_timer.setInterval(FOLLOW_MS)
        self._follow_timer.timeout.connect(self.predict_view)

        self.predict_button.changed.connect(self.predict_view)
        self.load_button.changed.connect(self.load_model)
        self.model_path.changed.connect(self._model_path_chosen)
        self.model.changed.connect(self._model_changed)
        self.show_class.changed.connect(self._class_changed)
        viewer.layers.events.inserted.connect(self._layers_changed)
        viewer.layers.events.removed.connect(self._layers_changed)
        camera_of(viewer).events.center.connect(self._view_changed)
        camera_of(viewer).events.zoom.connect(self._view_changed)
        viewer.dims.events.point.connect(self._view_changed)
        session().follow(self.native, self._session_changed)
        viewer.bind_key(KEY, lambda _v: self.predict_view(), overwrite=True)
        self._model_changed()
        # the first request must not import the engine (GUI thread) nor torch (worker)
        threading.Thread(target=_warm_imports, name="scrollseg-warm", daemon=True).start()

    # -- choices -------------------------------------------------------------------------
    def _image_names(self, _widget: Any = None) -> list[str]:
        return [layer.name for layer in image_layers(self.viewer)]

    def _layers_changed(self, _event: Any = None) -> None:
        self.image.reset_choices()

    def _session_changed(self, what: str) -> None:
        if what == "trained_models":
            self.model.reset_choices()

    def _model_path_chosen(self, value: Any) -> None:
        if not value or not str(value).strip() or str(value) == ".":
            return
        path = remember_model(value)
        self.model.reset_choices()
        self.model.value = path

    def _model_changed(self, _value: Any = None) -> None:
        """Class names from the model's dataset.json (read without loading the model)."""
        import json

        names: list[str] = []
        path = Path(self.model.value) if self.model.value else None
        if path is not None and (path / "dataset.json").is_file():
            try:
                labels = json.loads((path / "dataset.json").read_text())["labels"]
                names = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])]
                names = [n for n in names if n != "ignore"]
            except (OSError, ValueError, KeyError, TypeError):
                names = []
        self._class_names = names or ["class 1"]
        self.show_class.reset_choices()
        self.show_class.value = self._class_names[-1]

    # -- the predictor -------------------------------------------------------------------
    def options(self):
        """The :class:`LiveOptions` the widget's settings say (raises ScrollsegError)."""
        from napari_scrollseg.engine.config import parse_folds
        from napari_scrollseg.engine.live import LiveOptions

        cap: int | None = int(self.max_tiles.value)
        if not cap:  # about a second at the last measured rate
            rate = self.predictor.rate if self.predictor is not None else None
            cap = max(8, round(rate)) if rate else 64
        return LiveOptions(
            folds=parse_folds(self.folds.value.strip() or None),
            device=None if self.device.value == "auto" else self.device.value,
            step=float(self.step.value),
            mirror=bool(self.mirror.value),
            precision=str(self.precision.value),
            max_tiles=cap,
        )

    def _volume(self, layer: Any) -> Any:
        """The layer's data as an engine Volume (its pyramid, spacing and origin)."""
        import dask.array as da

        from napari_scrollseg.engine.volumes import Volume

        levels = layer.data if layer.multiscale else [layer.data]
        arrays = tuple(a if isinstance(a, da.Array) else da.asarray(a) for a in levels)
        return Volume(
            levels=arrays,
            spacing=tuple(float(s) for s in layer.scale[-3:]),
            origin=tuple(float(t) for t in layer.translate[-3:]),
            axes="zyx",
            source=str((layer.metadata or {}).get("source", layer.name)),
            kind="layer",
        )

    def _ensure_predictor(self) -> LivePredictor:
        from napari_scrollseg.engine.live import LivePredictor
        from napari_scrollseg.engine.predict import TileCache

        if not self.image.value:
            raise ScrollsegError("no 3D image layer: open a volume first (File > Open)")
        if not self.model.value:
            raise ScrollsegError("choose a model (built-in, or a trained-model folder or zip)")
        layer = self.viewer.layers[self.image.value]
        options = self.options()
        key = (id(layer.data), str(self.model.value), replace(options, max_tiles=None))
        if self.predictor is not None and key == self._key:
            self.predictor.options = options  # only the cap changed
            return self.predictor
        rate = self.predictor.rate if self.predictor is not None else None
        self.close_predictor()
        if self._cache is None:
            self._cache = TileCache(1 << 30)
        self.predictor = LivePredictor(
            self.model.value,
            self._volume(layer),
            options,
            cache=self._cache,
            on_event=self._relay.event.emit,
        )
        self.predictor.rate = rate
        self._key = key
        return self.predictor

    def close_predictor(self) -> None:
        """Stop the predictor's worker (the next request makes a new one)."""
        if self.predictor is not None:
            self.predictor.on_event = None
            self.predictor.close()
            self.predictor = None
            self._key = None

    # -- requests ------------------------------------------------------------------------
    def load_model(self, *_: Any) -> LiveRequest | None:
        """Load the model on the worker; once loaded, add the two result layers (empty).

        napari's ``add_layer`` costs ~0.25 s of GUI time per layer (vispy visual, overlays,
        Qt controls): done here, as ilastik shows its prediction layers once a classifier
        exists, so that a request only re-points layers (well under 100 ms a turn).
        """
        try:
            predictor = self._ensure_predictor()
        except ScrollsegError as exc:
            notify_error(exc)
            self.status.value = str(exc)[:120]
            return None
        self._loading = predictor.submit_load()
        self.status.value = "loading the model..."
        return self._loading

    @property
    def layers_ready(self) -> bool:
        """Whether both result layers exist (a request then adds none)."""
        return PROB_LAYER in self.viewer.layers and LABELS_LAYER in self.viewer.layers

    def _loaded(self, req: LiveRequest) -> None:
        """The model is loaded: make the result layers (1 voxel, empty) if missing."""
        import numpy as np

        self.finished = req
        if req.error is not None:
            self.status.value = "failed"
            notify_error(req.error)
            return
        self.status.value = "model loaded: predict the view"
        self.device.reset_choices()
        if self.layers_ready or self.predictor is None or self.predictor.model is None:
            return
        model = self.predictor.model
        req.box = tuple(slice(0, 1) for _ in req.scale)
        req.probs = np.zeros((model.n_classes, 1, 1, 1), np.float32)
        req.labels = np.zeros((1, 1, 1), np.uint8)
        self._show(req)

    def predict_view(self, *_: Any) -> LiveRequest | None:
        """Submit what the canvas shows; results land in the layers as blocks finish."""
        try:
            predictor = self._ensure_predictor()
            low, high, plane = view_box(self.viewer)
            self._request = predictor.submit_world(low, high, plane)
        except ScrollsegError as exc:
            notify_error(exc)
            self.status.value = str(exc)[:120]
            return None
        self._loading = None  # a queued load is dropped by the request (which loads)
        self._t_submit = time.perf_counter()
        self._display_s = 0.0
        self.status.value = "predicting..." if predictor.model else "loading the model..."
        return self._request

    def _view_changed(self, _event: Any = None) -> None:
        if self._updating:
            return
        req = self._request
        if req is not None and not req.done and self.predictor is not None:
            low, high, plane = view_box(self.viewer)
            self.predictor.view_moved(world=(low, high, plane))
        if self.follow.value:
            self._follow_timer.start()  # restarts: fires once the view rests

    # -- results -------------------------------------------------------------------------
    def _on_event(self, event: LiveEvent) -> None:
        req = event.request
        if req is self._loading and event.final:
            self._loaded(req)
            return
        if req is not self._request:
            return  # a stale request's block
        t0 = time.perf_counter()
        if event.error is not None:
            self.status.value = "failed"
            self.finished = req
            notify_error(event.error)
            return
        if event.block is not None:
            self._show_block(req, event)
        elif event.final:
            if req.blocks_done and not getattr(req, "_shown", False) and self.predictor:
                QTimer.singleShot(0, lambda: self._on_event(event))  # layers still coming
                return
            if not getattr(req, "_complete", False):  # blocks landed after the placing
                self._refresh_layers()
            self._finished(req)
            self.finished = req
        self._display_s += time.perf_counter() - t0

    def _show(self, req: LiveRequest) -> None:
        """Point the result layers at ``req``'s box, one layer per event-loop turn.

        Adding a napari layer costs ~0.3 s of GUI time (its vispy visual, overlays and Qt
        controls; once per widget) and re-pointing one ~40 ms (napari re-checks the dims):
        one per turn keeps the GUI answering in between.
        """
        if req not in (self._request, self._loading) or req.probs is None:
            return
        if getattr(req, "_shown", False):
            return
        if self.predictor is None or self.predictor.model is None:
            return  # closed meanwhile
        if not hasattr(req, "_complete"):  # every block had landed before the placing
            req._complete = req.done  # type: ignore[attr-defined]
        if self._place(req):
            req._shown = True  # type: ignore[attr-defined]
            if not req._complete:  # type: ignore[attr-defined]
                self._refresh.start()  # blocks may have landed between the two layers
        else:  # a real timer, so the pending paint and input events run first
            QTimer.singleShot(1, lambda: self._show(req))

    def _place(self, req: LiveRequest) -> bool:
        """Add or re-point the first result layer not yet showing ``req``; True when
        both show it."""
        low = tuple(t + s * b.start for t, s, b in zip(req.translate, req.scale, req.box))
        model = self.predictor.model  # type: ignore[union-attr]
        names = [model.label_names[k] for k in sorted(model.label_names)]
        shown = self.show_class.value if self.show_class.value in names else names[-1]
        prob = req.probs[names.index(shown)]  # type: ignore[index]
        self._updating = True  # moving layers is not the user moving the view
        try:
            for name, data in ((PROB_LAYER, prob), (LABELS_LAYER, req.labels)):
                if self._placed.get(name) == (req.id, shown) and name in self.viewer.layers:
                    continue
                self._placed[name] = (req.id, shown)
                if name in self.viewer.layers:
                    layer = self.viewer.layers[name]
                    _repoint(self.viewer, layer, data, req.scale, low)
                elif name == PROB_LAYER:
                    layer = self._add(
                        self.viewer.add_image,
                        prob,
                        name=PROB_LAYER,
                        scale=req.scale,
                        translate=low,
                        colormap="inferno",
                        blending="additive",
                        opacity=0.6,
                        contrast_limits=(0.0, 1.0),
                    )
                else:
                    layer = self._add(
                        self.viewer.add_labels,
                        req.labels,
                        name=LABELS_LAYER,
                        scale=req.scale,
                        translate=low,
                        opacity=0.5,
                    )
                    self._style_labels(layer, model)
                if name == PROB_LAYER:
                    layer.metadata["class"] = shown
                return False
            return True
        finally:
            self._updating = False

    def _add(self, add: Any, data: Any, **kwargs: Any) -> Any:
        point = self.viewer.dims.point
        layer = add(data, **kwargs)
        self.viewer.dims.point = point  # adding a layer must not move the slice
        return layer

    def _style_labels(self, layer: Any, model: Any) -> None:
        """The annotation's class names and colours (labels hold class ids 1..K), class 1
        (the background) transparent, as a prediction opened from a file."""
        from napari.utils.colormaps import DirectLabelColormap

        from napari_scrollseg._reader import see_through_background
        from napari_scrollseg.engine.annotations import ClassTable

        table = ClassTable.from_dataset_json(model.dataset_json)
        colors = see_through_background(table.as_napari_colors(ignore=None))  # as the reader
        layer.colormap = DirectLabelColormap(color_dict=colors)
        layer.features = {
            "index": [0, *table.ids()],
            "class": ["unlabeled", *(c.name for c in table.classes)],
        }

    def _show_block(self, req: LiveRequest, event: LiveEvent) -> None:
        if not getattr(req, "_shown", False):
            self._show(req)
        elif not self._refresh.isActive():
            self._refresh.start()

    def _refresh_layers(self) -> None:
        """Redraw the blocks landed since the last redraw (the arrays are filled in place)."""
        for name in (PROB_LAYER, LABELS_LAYER):
            if name in self.viewer.layers:
                self.viewer.layers[name].refresh(extent=False, highlight=False)

    def _class_changed(self, _value: Any = None) -> None:
        req = self._request
        if req is not None and req.probs is not None and getattr(req, "_shown", False):
            req._shown = False  # type: ignore[attr-defined]
            self._show(req)

    def _finished(self, req: LiveRequest) -> None:
        total = time.perf_counter() - self._t_submit
        note = self.predictor.normalization_note if self.predictor is not None else None
        state = "cancelled" if req.cancelled else "done"
        if req.capped:
            rate = self.predictor.rate if self.predictor else None
            rest = req.tiles_dropped
            eta = f" (~{rest / rate:.1f} s at {rate:.1f} tiles/s)" if rate else ""
            state = (
                f"capped: {req.blocks_done}/{req.blocks_total} blocks; {rest} tiles more"
                f"{eta}: zoom in or raise max tiles"
            )
            notify_info(f"live prediction {state}")
        if not req.exact:
            state = (
                f"coarse preview on pyramid level {req.level} (voxel "
                f"{' x '.join(f'{s:g}' for s in req.scale)}):\nzoom in for the exact answer\n"
                + state
            )
        self.status.value = state + (f"\n{note}" if note else "")
        self.timing.value = (
            f"read {req.read_s:.2f} s | compute {req.compute_s:.2f} s | "
            f"display {self._display_s:.3f} s | total {total:.2f} s\n"
            f"tiles run {req.tiles_run}, from cache {req.tiles_cached} of {req.tiles}"
        )
        self.device.reset_choices()
