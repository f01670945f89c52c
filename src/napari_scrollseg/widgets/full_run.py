"""Full-run dock widget: predict the whole scan (or a box of it) into an OME-Zarr.

Start runs off the GUI thread, with a progress bar, ETA and Cancel: the engine first
creates the output (:func:`~napari_scrollseg.engine.predict.prepare_output`: every array
and pyramid level, empty), the widget adds its layers (lazy, over the store), then
:func:`~napari_scrollseg.engine.predict.iter_predict_volume` fills it and the layers are
only refreshed as chunks land (no layer is added while the run goes). A cancelled run
started again with the same settings resumes (the engine skips the chunks already
written).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
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
from qtpy.QtCore import QTimer

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.widgets._common import (
    ProgressRow,
    image_layers,
    notify_error,
    notify_info,
    start_worker,
)
from napari_scrollseg.widgets._models import device_choices, model_choices, remember_model
from napari_scrollseg.widgets._view import view_box

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

WHOLE, VIEW = "whole volume", "current view box"
REFRESH_S = 2.0
SHOW_WAIT_S = 60.0  # the run goes on after this even if the viewer never showed it


@dataclass(frozen=True)
class OutputReady:
    """The run's output exists (empty, every pyramid level) and its layers' data are
    open: the widget shows them before the run goes on."""

    out: Path
    layers: list[tuple[Any, dict, str]]
    stage: str = "opening the output"


def run_full(
    model: str,
    volume: str,
    out: str,
    *,
    scheduler: str | None = None,
    cluster: str | None = None,
    shown: threading.Event | None = None,
    **options: Any,
) -> Iterator[Any]:
    """Prepare the output (``prepare_output``), yield :class:`OutputReady`, wait until the
    viewer shows it (``shown``, at most ``SHOW_WAIT_S``), then ``iter_predict_volume`` on
    the threaded scheduler (one model load for both), a scheduler address or a local
    cluster (the client closes with the run). Returns the output path."""
    from napari_scrollseg.engine.predict import Predictor, iter_predict_volume, prepare_output
    from napari_scrollseg.engine.predict.schedule import open_client

    local = not (scheduler or cluster)  # a cluster's workers load the model themselves
    session = Predictor(model, device=options.pop("device", None), cache=None) if local else None
    try:
        path = prepare_output(session or model, volume, out, **options)
        yield OutputReady(path, output_layers(str(path)))
        if shown is not None:
            shown.wait(SHOW_WAIT_S)
        with open_client(scheduler=scheduler or None, cluster=cluster or None) as client:
            return (
                yield from iter_predict_volume(
                    session or model, volume, out, client=client, **options
                )
            )
    finally:
        if session is not None:
            session.close()


def layer_location(layer: Any) -> str | None:
    """The path or URL a layer was read from (scrollseg's reader records it), or None."""
    source = (layer.metadata or {}).get("source") or getattr(layer.source, "path", None)
    return str(source) if source else None


def output_layers(out: str) -> list[tuple[Any, dict, str]]:
    """napari layer data of a prediction being written: the labels, and the last class's
    probability (e.g. ink), named ``<output stem>: <name>``. Opens zarr: not on the GUI
    thread."""
    from napari_scrollseg._reader import read_volume

    items = []
    for data, meta, kind in read_volume(out):
        names = meta.get("name")
        if isinstance(names, list):  # a probability per class: the last (e.g. ink)
            data = data[-1] if not isinstance(data, list) else [d[-1] for d in data]
            meta = {k: v for k, v in meta.items() if k != "channel_axis"}
            for key in ("visible", "blending", "gamma", "metadata"):  # per class: the last
                if isinstance(meta.get(key), list):
                    meta[key] = meta[key][-1]
            meta["name"], meta["colormap"] = names[-1], "inferno"
            meta["opacity"], meta["contrast_limits"] = 0.6, (0, 255)
        meta["name"] = f"{Path(out).stem}: {meta['name']}"
        # uncached: chunks written since are read again on refresh, and slicing these
        # layers never enters napari's global dask cache callback, which is not
        # thread-safe against the run's own dask computations
        meta["cache"] = False
        items.append((data, meta, kind))
    return items


class FullRunWidget(Container):
    """Run a model over the whole scan, resumably, and watch the output land."""

    def __init__(self, viewer: napari.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = viewer
        self.image = ComboBox(label="image", choices=self._image_names)
        self.model = ComboBox(label="model", choices=model_choices)
        self.model_path = FileEdit(
            label="model folder/zip", mode="r", filter="*.zip", nullable=True, value=None
        )
        self.roi = ComboBox(label="region", choices=self._roi_choices)
        self.mask = ComboBox(label="mask", choices=self._mask_choices)
        self.output = FileEdit(label="output .zarr", mode="w", filter="*.zarr", value="")
        self.step = FloatSpinBox(label="step", value=0.5, min=0.1, max=1.0, step=0.05)
        self.mirror = CheckBox(text="mirroring (TTA)", value=True)
        self.chunk = SpinBox(label="chunk", value=128, min=16, max=1024, step=16)
        self.device = ComboBox(label="device", choices=lambda _w: device_choices(), value="auto")
        self.scheduler = LineEdit(
            label="dask scheduler", value="", tooltip="tcp://host:8786; empty: this process"
        )
        self.cluster = ComboBox(label="or cluster", choices=["none", "local"], value="none")
        self.estimate_button = PushButton(text="Estimate")
        self.estimate_label = Label(value="")
        self.start_button = PushButton(text="Start")
        self.progress = ProgressRow(describe=self._describe)
        self.extend(
            [
                self.image,
                self.model,
                self.model_path,
                self.roi,
                self.mask,
                self.output,
                self.step,
                self.mirror,
                self.chunk,
                self.device,
                self.scheduler,
                self.cluster,
                self.estimate_button,
                self.estimate_label,
                self.start_button,
            ]
        )
        self.native.layout().addWidget(self.progress)
        self.worker: Any = None
        self.rate: float | None = None  # tiles/s of the last run
        self.result: Path | None = None
        self.last_event: Any = None
        self._opened: list[Any] = []
        self._opening = False  # the output is being prepared or its layers added
        self._shown = threading.Event()  # the output's layers are shown: the run goes on
        self._refreshed = 0.0
        self.estimate_button.changed.connect(self.estimate)
        self.start_button.changed.connect(self.start)
        self.model_path.changed.connect(self._model_path_chosen)
        viewer.layers.events.inserted.connect(self._layers_changed)
        viewer.layers.events.removed.connect(self._layers_changed)

    # -- choices -------------------------------------------------------------------------
    def _image_names(self, _widget: Any = None) -> list[str]:
        return [layer.name for layer in image_layers(self.viewer)]

    def _roi_choices(self, _widget: Any = None) -> list[str]:
        from napari.layers import Shapes

        shapes = [f"shapes: {x.name}" for x in self.viewer.layers if isinstance(x, Shapes)]
        return [WHOLE, VIEW, *shapes]

    def _mask_choices(self, _widget: Any = None) -> list[str]:
        from napari.layers import Image, Labels

        names = [
            x.name
            for x in self.viewer.layers
            if isinstance(x, Image | Labels) and layer_location(x) and x.name != self.image.value
        ]
        return ["none", *names]

    def _layers_changed(self, _event: Any = None) -> None:
        for w in (self.image, self.roi, self.mask):
            w.reset_choices()

    def _model_path_chosen(self, value: Any) -> None:
        if value and str(value).strip() and str(value) != ".":
            path = remember_model(value)
            self.model.reset_choices()
            self.model.value = path

    # -- reading the form ----------------------------------------------------------------
    def _layer(self) -> Any:
        if not self.image.value:
            raise ScrollsegError("no 3D image layer: open a volume first (File > Open)")
        return self.viewer.layers[self.image.value]

    def _source(self) -> str:
        layer = self._layer()
        source = layer_location(layer)
        if not source:
            raise ScrollsegError(
                f"layer {layer.name!r} is not backed by a file: a full run reads the volume "
                "from disk; save it first (e.g. as OME-Zarr) and open that file"
            )
        return source

    def region(self) -> list[tuple[int, int]] | None:
        """The ROI in voxels of the image: None (whole), the view box, or a shape's box."""
        layer = self._layer()
        shape = layer.data[0].shape if layer.multiscale else layer.data.shape
        shape = tuple(int(s) for s in shape[-3:])
        choice = self.roi.value
        if choice == WHOLE:
            return None
        if choice == VIEW:
            low, high, plane = view_box(self.viewer)
            lo = layer.world_to_data(np.asarray(low))
            hi = layer.world_to_data(np.asarray(high))
            spans = [(int(np.floor(min(a, b))), int(np.ceil(max(a, b)))) for a, b in zip(lo, hi)]
            if plane is not None:  # a 2D view: every slice under the visible field
                spans[plane] = (0, shape[plane])
        else:
            shapes = self.viewer.layers[choice.removeprefix("shapes: ")]
            if not len(shapes.data):
                raise ScrollsegError(f"shapes layer {shapes.name!r} is empty: draw a rectangle")
            pts = np.concatenate([shapes.data_to_world(d) for d in shapes.data])
            data = np.stack([layer.world_to_data(p) for p in pts])
            lo, hi = data.min(axis=0), data.max(axis=0)
            spans = [(int(np.floor(a)), int(np.ceil(b))) for a, b in zip(lo, hi)]
            if spans[0][1] - spans[0][0] <= 1:  # a rectangle drawn on one slice: all slices
                spans[0] = (0, shape[0])
        spans = [(max(a, 0), min(b, n)) for (a, b), n in zip(spans, shape)]
        if any(a >= b for a, b in spans):
            raise ScrollsegError(f"the region {spans} does not overlap the image {shape}")
        return spans

    def options(self) -> dict[str, Any]:
        """Keyword options of the engine call (model, volume and output apart)."""
        mask = None
        if self.mask.value and self.mask.value != "none":
            mask = layer_location(self.viewer.layers[self.mask.value])
        return {
            "roi": self.region(),
            "mask": mask,
            "step": float(self.step.value),
            "mirror": bool(self.mirror.value),
            "chunk": int(self.chunk.value),
            "device": None if self.device.value == "auto" else str(self.device.value),
        }

    def _output(self) -> str:
        out = str(self.output.value or "").strip()
        if not out or out == ".":
            raise ScrollsegError("choose an output path ending in .zarr")
        return out

    # -- actions -------------------------------------------------------------------------
    def estimate(self, *_: Any) -> None:
        """Tiles, passes, disk and time of the run, computed off the GUI thread."""
        from napari_scrollseg.engine.estimate import estimate_volume_run

        def job(model: str, volume: str, **kw: Any) -> Iterator[Any]:
            return estimate_volume_run(model, volume, **kw)
            yield  # a generator for start_worker

        try:
            opts = self.options()
            kw = {k: opts[k] for k in ("roi", "chunk", "step", "mirror")}
            start_worker(
                job,
                str(self.model.value),
                self._source(),
                rate=self.rate,
                on_done=lambda est: setattr(self.estimate_label, "value", est.describe()),
                **kw,
            )
        except ScrollsegError as exc:
            notify_error(exc)

    def start(self, *_: Any) -> Any:
        """Start (or resume) the run; returns the worker, or None when the form is bad."""
        if self.worker is not None:
            notify_info("a run is already going: cancel it first")
            return None
        try:
            if not self.model.value:
                raise ScrollsegError("choose a model (built-in, or a trained-model folder/zip)")
            model, source, out, opts = (
                str(self.model.value),
                self._source(),
                self._output(),
                self.options(),
            )
            cluster = None if self.cluster.value == "none" else str(self.cluster.value)
            scheduler = self.scheduler.value.strip() or None
        except ScrollsegError as exc:
            notify_error(exc)
            return None
        self.result = None
        self.last_event = None
        self._opened = []
        self._opening = True  # until the output's layers are shown
        self._shown = threading.Event()
        self.worker = start_worker(
            run_full,
            model,
            source,
            out,
            scheduler=scheduler,
            cluster=cluster,
            shown=self._shown,
            on_event=self._on_event,
            on_done=self._on_done,
            progress=self.progress,
            on_finished=self._finished,
            on_quit=self._shown.set,  # Cancel or napari's exit: stop waiting for the layers
            **opts,
        )
        self.start_button.enabled = False
        return self.worker

    @property
    def opening(self) -> bool:
        """Whether a started run's output is being prepared or its layers added (the run
        proper starts once they are shown)."""
        return self._opening

    def cancel(self) -> None:
        """Cancel the run (the output keeps the chunks written; Start resumes)."""
        self.progress.cancel()

    # -- progress ------------------------------------------------------------------------
    @staticmethod
    def _describe(ev: Any) -> str:
        if isinstance(ev, OutputReady):
            return f"{ev.stage}..."
        eta = f", ETA {ev.eta_s:.0f} s" if ev.eta_s is not None else ""
        resumed = f" ({ev.chunks_resumed} resumed)" if ev.chunks_resumed else ""
        return f"{ev.stage}: chunks {ev.chunks_done}/{ev.chunks_total}{resumed}{eta}"

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, OutputReady):  # before the run: no layer is added while it runs
            if self.worker is not None and not self.worker.abort_requested:  # not cancelled
                self._add_output(ev.layers)  # (a cancel already woke the run: on_quit)
            return
        self.last_event = ev
        self.progress.bar.setRange(0, max(ev.chunks_total, 1))
        self.progress.bar.setValue(ev.chunks_done)
        if ev.tiles_computed and ev.elapsed_s > 0:
            self.rate = ev.tiles_computed / ev.elapsed_s
        if self._opened and time.perf_counter() - self._refreshed > REFRESH_S:
            self._refresh_output()

    def _add_output(self, items: list[tuple[Any, dict, str]]) -> None:
        """Add (or, on a resumed run, re-point) the first output layer not yet shown, the
        rest on the next turns of the event loop (napari's add_layer: ~0.3 s each); then
        let the run go on."""
        from napari.layers import Layer

        if not items:
            self._opening = False
            self._refreshed = time.perf_counter()
            self._shown.set()
            return
        (data, meta, kind), rest = items[0], items[1:]
        try:
            if meta["name"] in self.viewer.layers:  # a resumed run: reuse the layer
                layer = self.viewer.layers[meta["name"]]
                layer.data = data
            else:
                layer = self.viewer.add_layer(Layer.create(data, meta, kind))
            self._opened.append(layer)
        except Exception as exc:  # the run goes on without this layer
            log.exception("could not show %s", meta["name"])
            notify_error(f"could not show {meta['name']!r} ({exc}); the run goes on")
        QTimer.singleShot(1, lambda: self._add_output(rest))

    def _refresh_output(self, layers: list[Any] | None = None) -> None:
        """Redraw the output layers, one per event-loop turn, so new chunks show (the
        layers are uncached: only the chunks on screen are read again)."""
        if layers is None:
            layers = list(self._opened)
            self._refreshed = time.perf_counter()
        if layers:
            if layers[0] in self.viewer.layers:
                layers[0].refresh()
            QTimer.singleShot(1, lambda: self._refresh_output(layers[1:]))

    def _on_done(self, out: Any) -> None:
        self.result = Path(out)
        if self._opened:  # the last chunks and the pyramid
            self._refresh_output()
        notify_info(f"prediction written to {out}")

    def _finished(self) -> None:
        self.worker = None
        self._opening = False
        self._shown.set()
        self.start_button.enabled = True
