"""The view widget in a real viewer (Xvfb): each transform changes the displayed data as
its formula says, on dask-backed layers, computing only some of the chunks."""

from __future__ import annotations

import asyncio
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from PIL import Image as PILImage
from zarr.storage import MemoryStore, WrapperStore

from napari_scrollseg.engine import contrast
from napari_scrollseg.widgets import view as view_module
from napari_scrollseg.widgets.view import COMPOSITE, ViewWidget
from tests.engine.test_contrast import counted
from tests.widgets._stall import StallMeter

SHAPE = (16, 128, 128)
CHUNKS = (4, 32, 32)  # 4 x 4 x 4 = 64 chunks per level 0
N_CHUNKS = 64


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def messages(monkeypatch):
    shown: list[str] = []
    monkeypatch.setattr(view_module, "notify_info", shown.append)
    monkeypatch.setattr(view_module, "notify_error", lambda exc: shown.append(str(exc)))
    return shown


def _widget(viewer) -> ViewWidget:
    widget = ViewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="view")
    return widget


def apply_scan(widget: ViewWidget, qtbot) -> None:
    """Click "Apply to scan" and wait for its sample to be read (in a thread)."""
    widget.apply_scan.clicked()
    qtbot.waitUntil(lambda: widget.scan_worker is None, timeout=30_000)


def composite(widget: ViewWidget, qtbot) -> None:
    """Click "Composite" and wait for the maps' maxima to be read (in a thread)."""
    widget.apply_overlay.clicked()
    qtbot.waitUntil(lambda: widget.overlay_worker is None, timeout=30_000)


def _pyramid(data: np.ndarray):
    """Three levels stored apart, as in an OME-Zarr; reads of level 0 are counted."""
    level0, source = counted(data, CHUNKS)
    coarser = [da.from_array(data[::f, ::f, ::f].copy(), chunks=CHUNKS) for f in (2, 4)]
    return [level0, *coarser], source


def test_scan_curve_window_gamma_on_a_dask_pyramid(viewer, qtbot):
    raw = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    levels, source = _pyramid(raw)
    layer = viewer.add_image(levels, multiscale=True, name="scan")
    widget = _widget(viewer)
    widget.scan_layer.value = layer
    widget.curve.value = True
    widget.low.value, widget.high.value = 2.0, 98.0
    widget.gamma.value = 0.8
    source.reads.clear()
    apply_scan(widget, qtbot)
    lut = contrast.curve_lut(np.uint8)
    # data: lut[raw], lazily; the window is the percentiles of the curved coarsest level
    assert all(isinstance(level, da.Array) for level in layer.data)
    expected_window = tuple(np.percentile(lut[raw[::4, ::4, ::4]], [2, 98]))
    assert tuple(layer.contrast_limits) == pytest.approx(expected_window)
    assert layer.gamma == pytest.approx(0.8)
    z = int(viewer.dims.current_step[0])
    shown = np.asarray(layer.data[0][z, 40:70, 10:50])
    np.testing.assert_array_equal(shown, lut[raw[z, 40:70, 10:50]])
    print(f"\nscan: {len(source.reads)} of {N_CHUNKS} level-0 chunks read")
    assert len(source.reads) < N_CHUNKS  # the sample + what is on screen, never all 64
    # napari's contrast limits and gamma = the engine's window and gamma, exactly
    values = view_module.display_values(layer, 0)[z].compute()
    lo, hi = expected_window
    formula = np.clip((lut[raw[z]].astype(np.float64) - lo) / (hi - lo), 0, 1) ** 0.8
    np.testing.assert_allclose(values, formula, rtol=1e-5, atol=1e-6)
    # applying again without the curve starts from the raw data, not the curved data
    widget.curve.value = False
    apply_scan(widget, qtbot)
    np.testing.assert_array_equal(np.asarray(layer.data[0][z, :5, :5]), raw[z, :5, :5])


def test_scan_curve_on_float_data_says_what_to_do(viewer, messages, qtbot):
    layer = viewer.add_image(np.random.default_rng(1).random((4, 16, 16)), name="float")
    widget = _widget(viewer)
    widget.scan_layer.value = layer
    widget.curve.value = True
    widget.apply_scan.clicked()
    assert len(messages) == 1
    assert "uint8 or uint16" in messages[0]
    widget.curve.value = False  # window and gamma work on any dtype
    apply_scan(widget, qtbot)
    assert len(messages) == 1


def test_composite_flip_boost_invert_follow_the_controls(viewer, qtbot):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, SHAPE, dtype=np.uint8)  # max > 1: divided by its max
    b = rng.random(SHAPE, dtype=np.float32)
    levels_a, src_a = _pyramid(a)
    levels_b, src_b = _pyramid(b)
    la = viewer.add_image(levels_a, multiscale=True, name="ink [0]")
    lb = viewer.add_image(levels_b, multiscale=True, name="ink [1]")
    widget = _widget(viewer)
    widget.maps.value = [la, lb]
    widget.mode.value = "max"
    composite(widget, qtbot)
    out = viewer.layers[COMPOSITE]
    assert out.multiscale
    assert len(out.data) == 3
    assert all(isinstance(level, da.Array) for level in out.data)
    a1 = a.astype(np.float32) / a.max()
    comp = np.maximum(a1, b)
    z = 5
    np.testing.assert_allclose(np.asarray(out.data[0][z]), comp[z], rtol=1e-6)
    # the controls update the composite: flip, boost 2.5, invert, in the seed's order
    src_a.reads.clear()
    src_b.reads.clear()
    widget.flip_h.value = True
    widget.boost.value = 2.5
    widget.invert.value = True
    qtbot.wait(50)
    assert viewer.layers[COMPOSITE] is out
    expected = 1 - np.minimum(comp[..., ::-1] * 2.5, 1)
    got = np.asarray(out.data[0][z, 0:32, 96:128])
    np.testing.assert_allclose(got, expected[z, 0:32, 96:128], rtol=1e-5, atol=1e-6)
    # napari's slice and our region, not the volume
    print(f"\ncomposite: {len(src_a.reads)}, {len(src_b.reads)} of {N_CHUNKS} chunks read")
    assert len(src_a.reads) < N_CHUNKS
    assert len(src_b.reads) < N_CHUNKS
    widget.colormap.value = "viridis"
    widget.opacity.value = 0.4
    assert out.colormap.name == "viridis"
    assert out.opacity == pytest.approx(0.4)


def test_composite_of_different_shapes_is_resized_and_said(viewer, messages, qtbot):
    rng = np.random.default_rng(3)
    a = rng.random(SHAPE, dtype=np.float32)
    b = rng.random((8, 64, 64), dtype=np.float32)
    la = viewer.add_image(da.from_array(a, chunks=CHUNKS), name="a")
    lb = viewer.add_image(da.from_array(b, chunks=CHUNKS), name="b")
    widget = _widget(viewer)
    widget.maps.value = [la, lb]
    composite(widget, qtbot)
    assert any("resized" in m and "(8, 64, 64)" in m for m in messages)
    out = viewer.layers[COMPOSITE]
    assert out.data.shape == SHAPE
    up = b.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_allclose(np.asarray(out.data[3]), ((a + up) / 2)[3], rtol=1e-6)
    # nothing chosen: one message, no layer change
    widget.maps.value = []
    widget.apply_overlay.clicked()
    assert "choose one or more" in messages[-1]


def test_save_view_png_is_the_visible_region_at_full_resolution(viewer, tmp_path, qtbot):
    raw = np.random.default_rng(4).integers(0, 256, (4, 200, 300), dtype=np.uint8)
    layer = viewer.add_image(da.from_array(raw, chunks=(1, 50, 50)), name="scan")
    widget = _widget(viewer)
    widget.scan_layer.value = layer
    widget.gamma.value = 1.5
    apply_scan(widget, qtbot)
    viewer.dims.set_current_step(0, 2)
    viewer.scene.camera.center = (2, 100, 150)
    viewer.scene.camera.zoom = 8.0  # much smaller than the image on screen
    qtbot.wait(100)
    widget.save_layer.value = layer
    path = widget.save(tmp_path / "view.png")
    png = np.asarray(PILImage.open(path))
    region = view_module.visible_region(viewer, layer, 0)
    assert region[0] == 2
    ys, xs = region[1], region[2]
    assert png.shape == (ys.stop - ys.start, xs.stop - xs.start)
    assert png.shape[0] < 200
    assert png.shape[1] < 300
    assert abs((ys.start + ys.stop) / 2 - 100) <= 1  # centred where the camera looks
    assert abs((xs.start + xs.stop) / 2 - 150) <= 1
    lo, hi = layer.contrast_limits
    v = np.clip((raw[2, ys, xs].astype(np.float64) - lo) / (hi - lo), 0, 1) ** 1.5
    expected = np.rint(v * 255).astype(np.uint8)
    assert np.abs(png.astype(int) - expected).max() <= 1  # float32 vs float64 rounding
    viewer.dims.ndisplay = 3
    with pytest.raises(Exception, match="2D"):
        widget.save(tmp_path / "v3.png")


class SlowStore(WrapperStore):
    """A zarr store whose every chunk read takes ``delay`` seconds (a remote volume)."""

    def __init__(self, store, delay: float) -> None:
        super().__init__(store)
        self.delay = delay
        self.reads = 0

    async def get(self, key, prototype, byte_range=None):
        if not key.endswith("zarr.json"):
            self.reads += 1
            await asyncio.sleep(self.delay)
        return await self._store.get(key, prototype, byte_range)


def test_the_percentile_sample_is_read_off_the_gui_thread(viewer, qtbot):
    data = np.random.default_rng(5).integers(0, 256, (64, 512, 512), dtype=np.uint8)
    store = SlowStore(MemoryStore(), delay=0.3)
    z = zarr.create_array(store, shape=data.shape, chunks=(16, 128, 128), dtype=data.dtype)
    z[:] = data
    layer = viewer.add_image(da.from_zarr(z), name="remote")
    qtbot.wait(200)  # napari's first slice is read
    widget = _widget(viewer)
    widget.scan_layer.value = layer
    store.reads = 0
    with StallMeter() as ticks:
        t0 = time.perf_counter()
        widget.apply_scan.clicked()
        click_s = time.perf_counter() - t0
        qtbot.waitUntil(lambda: widget.scan_worker is None, timeout=60_000)
    sample_s = ticks.at[-1] - ticks.at[0]
    print(
        f"\npercentile sample: {store.reads} chunk reads of 0.3 s in {sample_s:.1f} s; click "
        f"{click_s * 1000:.0f} ms; longest GUI gap {ticks.longest * 1000:.0f} ms "
        f"({ticks.own * 1000:.0f} ms of it ours)"
    )
    assert store.reads >= 1  # the sample was read (slowly) ...
    assert click_s < 0.1  # ... but not by the click
    assert ticks.own < 0.1  # the GUI thread never stalled for a chunk
    same = da.from_array(data, chunks=(16, 128, 128))  # the same chunks, in memory
    assert tuple(layer.contrast_limits) == pytest.approx(contrast.percentile_window(same))
