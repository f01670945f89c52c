"""The view dock widget: contrast for scans, composite/boost/invert/flip for predictions.

Every transform is :mod:`napari_scrollseg.engine.contrast`; this module only wires it
to napari layers, lazily and level by level, so napari computes only the chunks on
screen (multiscale layers stay multiscale):

- **Scan**: the seed's contrast curve replaces the layer's data by ``lut[img]`` (a
  dask map over chunks; the original arrays are kept in ``metadata["scrollseg_raw"]``),
  the percentile window and gamma set the layer's ``contrast_limits`` and ``gamma``,
  which napari applies exactly as ``clip((x - lo) / (hi - lo), 0, 1) ** gamma``.
- **Overlay**: the selected probability layers become one layer ``composite`` holding
  :func:`~napari_scrollseg.engine.contrast.overlay_levels` (mean or max, flip, boost,
  invert), with a colormap and opacity; it follows the controls as they move.
- **Save view as PNG**: the region on screen of one layer, at full resolution of the
  level displayed, through the same display transform, as an 8-bit PNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    PushButton,
    Select,
)

from napari_scrollseg.engine import contrast
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.widgets._common import notify_error, notify_info

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

COMPOSITE = "composite"
RAW_KEY = "scrollseg_raw"  # a scan layer's arrays before the contrast curve
COLORMAPS = ("magma", "inferno", "viridis", "gray", "red", "green", "cyan")


def _levels(layer: Image) -> list[Any]:
    return list(layer.data) if layer.multiscale else [layer.data]


def _set_levels(layer: Image, levels: list[Any]) -> None:
    layer.data = levels if layer.multiscale else levels[0]


def raw_levels(layer: Image) -> list[Any]:
    """A scan layer's arrays as opened (before the contrast curve), finest first."""
    return list(layer.metadata.get(RAW_KEY) or _levels(layer))


def display_values(layer: Image, level: int | None = None) -> Any:
    """What napari draws for an image layer at ``level`` (default: the level on screen),
    as float32 in [0, 1]: its data through its contrast limits and gamma (lazy)."""
    levels = _levels(layer)
    level = layer.data_level if level is None and layer.multiscale else (level or 0)
    return contrast.scan_values(
        levels[level], window=tuple(layer.contrast_limits), gamma=float(layer.gamma)
    )


def _camera_and_canvas_size(viewer: napari.Viewer) -> tuple[Any, np.ndarray]:
    scene = getattr(viewer, "scene", None)  # napari >= 0.9
    if scene is not None and hasattr(getattr(viewer, "canvas", None), "size"):
        return scene.camera, np.asarray(viewer.canvas.size, float)
    return viewer.camera, np.asarray(viewer._canvas_size, float)


def visible_region(viewer: napari.Viewer, layer: Image, level: int) -> tuple[slice | int, ...]:
    """Index of the 2D region of ``layer`` on screen, in the coordinates of ``level``.

    Raises
    ------
    ScrollsegError
        In 3D display (a PNG of the view is a 2D slice) or when the layer is off screen.
    """
    if viewer.dims.ndisplay != 2:
        raise ScrollsegError("switch the viewer to 2D to save the view as a PNG")
    shape = _levels(layer)[level].shape
    factors = (
        np.asarray(layer.downsample_factors[level]) if layer.multiscale else np.ones(len(shape))
    )
    displayed = list(viewer.dims.displayed)
    ndim_world = viewer.dims.ndim
    offset = ndim_world - layer.ndim
    point = np.asarray(layer.world_to_data(viewer.dims.point[offset:])) / factors
    # the canvas in world coordinates: centre +- half the canvas size / zoom
    camera, size = _camera_and_canvas_size(viewer)  # size: (height, width) in screen pixels
    half = size / (2 * camera.zoom)
    centre = np.asarray(camera.center[-2:], float)
    corners_world = np.array(viewer.dims.point, float)[None].repeat(2, 0)
    corners_world[0, displayed] = centre - half
    corners_world[1, displayed] = centre + half
    corners = np.array([layer.world_to_data(c[offset:]) for c in corners_world]) / factors
    index: list[slice | int] = []
    for axis in range(layer.ndim):
        if axis + offset in displayed:
            lo = int(np.clip(np.floor(corners[:, axis].min()), 0, shape[axis]))
            hi = int(np.clip(np.ceil(corners[:, axis].max()), 0, shape[axis]))
            if hi <= lo:
                raise ScrollsegError(f"layer {layer.name!r} is not on screen: nothing to save")
            index.append(slice(lo, hi))
        else:
            index.append(int(np.clip(np.round(point[axis]), 0, shape[axis] - 1)))
    return tuple(index)


def save_view_png(
    viewer: napari.Viewer, layer: Image, path: str | Path, level: int | None = None
) -> Path:
    """Save the region of ``layer`` on screen, at full resolution of ``level`` (default:
    the level displayed), as napari shows it (contrast limits, gamma), as an 8-bit PNG."""
    if level is None:
        level = layer.data_level if layer.multiscale else 0
    region = visible_region(viewer, layer, level)
    return contrast.save_png(display_values(layer, level), path, region)


class ViewWidget(Container):
    """Scan contrast, prediction composite/boost/invert/flip, and save the view as PNG."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = viewer
        self._divisors: dict[int, float] = {}
        self.scan_worker: Any = None  # reading the percentile sample, while it runs
        self.overlay_worker: Any = None  # reading the maps' maxima, while it runs
        # scan
        self.scan_layer = ComboBox(label="scan layer", choices=self._image_choices)
        self.curve = CheckBox(text="contrast curve (0,0) (128,64) (255,255)", value=False)
        self.low = FloatSpinBox(label="low %", value=0.5, min=0, max=100, step=0.1)
        self.high = FloatSpinBox(label="high %", value=99.5, min=0, max=100, step=0.1)
        self.gamma = FloatSlider(label="gamma", value=1.0, min=0.2, max=2.0, step=0.05)
        self.apply_scan = PushButton(text="Apply to scan")
        self.apply_scan.changed.connect(self._on_apply_scan)
        # prediction overlay
        self.maps = Select(label="probability layers", choices=self._image_choices)
        self.mode = ComboBox(label="composite", choices=["mean", "max"], value="mean")
        self.flip_h = CheckBox(text="horizontal flip", value=False)
        self.flip_v = CheckBox(text="vertical flip", value=False)
        self.boost = FloatSlider(label="boost", value=1.0, min=1.0, max=10.0, step=0.1)
        self.invert = CheckBox(text="invert", value=False)
        self.colormap = ComboBox(label="colormap", choices=list(COLORMAPS), value="magma")
        self.opacity = FloatSlider(label="opacity", value=0.7, min=0.0, max=1.0, step=0.05)
        self.apply_overlay = PushButton(text="Composite")
        self.apply_overlay.changed.connect(self._on_apply_overlay)
        for control in (self.mode, self.flip_h, self.flip_v, self.boost, self.invert):
            control.changed.connect(self._follow_overlay)
        self.colormap.changed.connect(self._style_overlay)
        self.opacity.changed.connect(self._style_overlay)
        # save
        self.save_layer = ComboBox(label="save layer", choices=self._image_choices)
        self.save_path = FileEdit(label="PNG", mode="w", filter="*.png", value="view.png")
        self.save_button = PushButton(text="Save view as PNG")
        self.save_button.changed.connect(self._on_save)
        self.status = Label(value="")
        self.extend(
            [
                Label(value="<b>Scan</b>"),
                self.scan_layer,
                self.curve,
                self.low,
                self.high,
                self.gamma,
                self.apply_scan,
                Label(value="<b>Prediction</b>"),
                self.maps,
                self.mode,
                self.flip_h,
                self.flip_v,
                self.boost,
                self.invert,
                self.colormap,
                self.opacity,
                self.apply_overlay,
                Label(value="<b>Save</b>"),
                self.save_layer,
                self.save_path,
                self.save_button,
                self.status,
            ]
        )
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._reset_choices)

    # -- layer choices ---------------------------------------------------------------------
    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _reset_choices(self, _event: Any = None) -> None:
        for widget in (self.scan_layer, self.maps, self.save_layer):
            widget.reset_choices()

    # -- scan ------------------------------------------------------------------------------
    def apply_scan_contrast(self, layer: Image | None = None) -> Any:
        """Apply the curve, percentile window and gamma to the scan layer (one engine call
        each: :func:`~napari_scrollseg.engine.contrast.apply_curve` per level and
        :func:`~napari_scrollseg.engine.contrast.percentile_window`).

        The percentile sample is read in a thread (a remote or slow volume never stalls
        the GUI); the layer changes when it is done. Returns that (started) worker.
        """
        from napari.qt.threading import create_worker

        layer = layer or self.scan_layer.value
        if layer is None:
            raise ScrollsegError("no image layer: open a scan first (File > Open)")
        raw = raw_levels(layer)
        curve = bool(self.curve.value)
        if curve:
            contrast.curve_lut(raw[0].dtype)  # says what to do for float scans
        gamma = float(self.gamma.value)
        worker = create_worker(
            contrast.percentile_window,
            raw,
            (float(self.low.value), float(self.high.value)),
            curve=curve,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.returned.connect(lambda window: self._set_scan(layer, raw, curve, window, gamma))
        worker.errored.connect(notify_error)
        worker.finished.connect(self._scan_done)
        self.apply_scan.enabled = False
        self.status.value = f"{layer.name}: reading a sample for the percentiles..."
        self.scan_worker = worker
        worker.start()
        return worker

    def _scan_done(self) -> None:
        self.scan_worker = None
        self.apply_scan.enabled = True

    def _set_scan(
        self, layer: Image, raw: list[Any], curve: bool, window: tuple[float, float], gamma: float
    ) -> None:
        layer.metadata[RAW_KEY] = raw
        _set_levels(layer, [contrast.apply_curve(a) for a in raw] if curve else raw)
        layer.contrast_limits_range = (
            (0.0, float(np.iinfo(raw[0].dtype).max)) if raw[0].dtype.kind in "ui" else window
        )
        layer.contrast_limits = window
        layer.gamma = gamma
        self.status.value = (
            f"{layer.name}: {'curve, ' if curve else ''}window {window[0]:.4g}..{window[1]:.4g}, "
            f"gamma {layer.gamma:.2f}"
        )

    def _on_apply_scan(self, _value: Any = None) -> None:
        try:
            self.apply_scan_contrast()
        except ScrollsegError as exc:
            notify_error(exc)

    # -- overlay ---------------------------------------------------------------------------
    def composite(self, layers: list[Image] | None = None) -> Any:
        """Make (or update) the ``composite`` layer from the chosen probability layers.

        Each map's maximum (:func:`~napari_scrollseg.engine.contrast.map_max`, a bounded
        sample) is read once, in a thread; then the layer is made. Returns that worker
        (the layer comes when it is done), or the layer when no read was needed.
        """
        from napari.qt.threading import create_worker

        layers = list(self.maps.value if layers is None else layers)
        layers = [layer for layer in layers if layer.name != COMPOSITE]
        if not layers:
            raise ScrollsegError("choose one or more probability layers for the composite")
        missing = [layer for layer in layers if id(layer) not in self._divisors]
        if not missing:
            return self._make_composite(layers)

        def read() -> list[float]:
            return [contrast.map_max(_levels(layer)) for layer in missing]

        def done(maxima: list[float]) -> None:
            self._divisors.update({id(la): m for la, m in zip(missing, maxima, strict=True)})
            self._make_composite(layers)

        worker = create_worker(read, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(done)
        worker.errored.connect(notify_error)
        worker.finished.connect(self._overlay_done)
        self.status.value = "reading the maps' maxima..."
        self.overlay_worker = worker
        worker.start()
        return worker

    def _overlay_done(self) -> None:
        self.overlay_worker = None

    def _make_composite(self, layers: list[Image]) -> Image:
        pyramids = [_levels(layer) for layer in layers]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", contrast.ResizedWarning)
            levels = contrast.overlay_levels(
                pyramids,
                mode=self.mode.value,
                flip_h=bool(self.flip_h.value),
                flip_v=bool(self.flip_v.value),
                boost=float(self.boost.value),
                invert=bool(self.invert.value),
                divisors=[self._divisors[id(layer)] for layer in layers],
            )
        for w in caught:
            notify_info(f"composite: {w.message}")
        first = layers[0]
        data = levels if len(levels) > 1 else levels[0]
        if COMPOSITE in self.viewer.layers:
            out = self.viewer.layers[COMPOSITE]
            out.data = data
        else:
            out = self.viewer.add_image(
                data,
                name=COMPOSITE,
                multiscale=len(levels) > 1,
                scale=first.scale,
                translate=first.translate,
                contrast_limits=(0.0, 1.0),
                blending="additive",
                metadata={"sources": [layer.name for layer in layers]},
            )
        out.metadata["sources"] = [layer.name for layer in layers]
        self._style_overlay()
        self.status.value = (
            f"composite ({self.mode.value}) of {', '.join(layer.name for layer in layers)}: "
            f"boost {float(self.boost.value):.1f}"
            + (", flipped" if self.flip_h.value or self.flip_v.value else "")
            + (", inverted" if self.invert.value else "")
        )
        return out

    def _on_apply_overlay(self, _value: Any = None) -> None:
        try:
            self.composite()
        except ScrollsegError as exc:
            notify_error(exc)

    def _follow_overlay(self, _value: Any = None) -> None:
        if COMPOSITE in self.viewer.layers and self.maps.value:
            self._on_apply_overlay()

    def _style_overlay(self, _value: Any = None) -> None:
        if COMPOSITE in self.viewer.layers:
            out = self.viewer.layers[COMPOSITE]
            out.colormap = self.colormap.value
            out.opacity = float(self.opacity.value)

    # -- save ------------------------------------------------------------------------------
    def save(self, path: str | Path | None = None, layer: Image | None = None) -> Path:
        """Save the chosen layer's region on screen as a PNG (see :func:`save_view_png`)."""
        layer = layer or self.save_layer.value
        if layer is None:
            raise ScrollsegError("no image layer to save")
        out = save_view_png(self.viewer, layer, path or self.save_path.value)
        self.status.value = f"saved {out}"
        return out

    def _on_save(self, _value: Any = None) -> None:
        try:
            out = self.save()
        except ScrollsegError as exc:
            notify_error(exc)
        else:
            notify_info(f"saved {out}")
