"""The viewer's array transforms: exact formulas, lazy over dask (chunks counted)."""

from __future__ import annotations

import threading
import warnings

import dask.array as da
import numpy as np
import pytest
from PIL import Image
from scipy.interpolate import PchipInterpolator

from napari_scrollseg.engine import contrast
from napari_scrollseg.engine.errors import ScrollsegError


class CountingArray:
    """A numpy array whose reads are counted: ``da.from_array`` reads one chunk per call."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.reads: list[tuple] = []
        self._lock = threading.Lock()

    def __getitem__(self, key):
        out = self.data[key]
        if out.size:  # dask reads an empty slice once to learn the chunk type
            with self._lock:
                self.reads.append(key)
        return out


def counted(data: np.ndarray, chunks) -> tuple[da.Array, CountingArray]:
    source = CountingArray(data)
    return da.from_array(source, chunks=chunks, asarray=True, lock=False), source


def _u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# -- curve ---------------------------------------------------------------------------------
def test_curve_lut_is_the_monotone_cubic_through_the_seed_points():
    lut = contrast.curve_lut(np.uint8)
    assert lut.dtype == np.uint8
    assert lut.shape == (256,)
    assert (lut[0], lut[128], lut[255]) == (0, 64, 255)
    assert np.all(np.diff(lut.astype(int)) >= 0)
    expected = np.rint(PchipInterpolator([0, 128, 255], [0, 64, 255])(np.arange(256)))
    np.testing.assert_array_equal(lut, expected)
    assert lut[64] < 64
    assert lut[200] < 200
    lut16 = contrast.curve_lut(np.uint16)
    assert lut16.shape == (65536,)
    assert (lut16[0], lut16[128 * 257], lut16[65535]) == (0, 64 * 257, 65535)
    assert np.all(np.diff(lut16.astype(np.int64)) >= 0)
    with pytest.raises(ScrollsegError, match="uint8 or uint16"):
        contrast.curve_lut(np.float32)


def test_apply_curve_on_dask_reads_only_the_chunks_asked_for():
    data = _u8((8, 64, 64))
    arr, source = counted(data, (4, 32, 32))  # 2 x 2 x 2 = 8 chunks
    out = contrast.apply_curve(arr)
    assert isinstance(out, da.Array)
    assert out.dtype == np.uint8
    assert source.reads == []  # lazy
    part = out[1, :20, 40:].compute()
    np.testing.assert_array_equal(part, contrast.curve_lut(np.uint8)[data[1, :20, 40:]])
    assert len(source.reads) == 1  # one of 8 chunks


# -- window and gamma ------------------------------------------------------------------------
def test_scan_values_formula_curve_window_gamma():
    data = _u8((4, 16, 16), seed=1)
    lut = contrast.curve_lut(np.uint8)
    got = contrast.scan_values(data, curve=True, window=(30, 200), gamma=0.7)
    x = lut[data].astype(np.float64)
    expected = np.clip((x - 30) / 170, 0, 1) ** 0.7
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert got.dtype == np.float32
    # window only: no curve; default window is the dtype's range
    np.testing.assert_allclose(contrast.scan_values(data), data / 255.0, rtol=1e-6)
    with pytest.raises(ScrollsegError, match="high > low"):
        contrast.scan_values(data, window=(5, 5))
    with pytest.raises(ScrollsegError, match="gamma"):
        contrast.scan_values(data, gamma=0)


def test_scan_values_lazy_on_dask_pyramid():
    data = (np.random.default_rng(2).integers(0, 4000, (8, 64, 64))).astype(np.uint16)
    arr, source = counted(data, (8, 16, 16))  # 16 chunks
    levels = [arr, arr[::2, ::2, ::2]]
    out = contrast.scan_levels(levels, curve=True, window=(100.0, 900.0), gamma=2.0)
    assert [o.shape for o in out] == [(8, 64, 64), (4, 32, 32)]
    assert source.reads == []
    got = out[0][3, 2:14, 18:30].compute()
    x = contrast.curve_lut(np.uint16)[data[3, 2:14, 18:30]].astype(np.float64)
    np.testing.assert_allclose(got, np.clip((x - 100) / 800, 0, 1) ** 2, rtol=1e-5, atol=1e-7)
    assert len(source.reads) == 1


def test_percentile_window_reads_a_bounded_sample():
    data = _u8((32, 64, 64), seed=3)
    arr, source = counted(data, (8, 16, 16))  # 64 chunks
    lo, hi = contrast.percentile_window(arr, (1, 99), max_voxels=1000)
    assert 0 < len(source.reads) <= 5  # a few blocks along the diagonal, not all 64
    assert 0 <= lo < 10
    assert 245 < hi <= 255
    # small or coarse level: read whole, exact percentiles
    small = data[::4, ::4, ::4]
    assert contrast.percentile_window([arr, da.from_array(small)], (2, 98)) == tuple(
        float(v) for v in np.percentile(small, [2, 98])
    )
    curved = contrast.percentile_window(small, (2, 98), curve=True)
    lut = contrast.curve_lut(np.uint8)
    assert curved == tuple(float(v) for v in np.percentile(lut[small], [2, 98]))
    with pytest.raises(ScrollsegError, match="percentiles"):
        contrast.percentile_window(small, (50, 10))


# -- probability maps ------------------------------------------------------------------------
def _probs(shape, seed):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_overlay_formula_in_the_seed_order(mode):
    a = _probs((3, 20, 30), 0)
    b = (np.random.default_rng(1).integers(0, 256, (3, 20, 30))).astype(np.uint8)  # max > 1
    got = contrast.overlay([a, b], mode=mode, flip_h=True, boost=3.0, invert=True)
    b1 = b.astype(np.float32) / b.max()
    comp = (a + b1) / 2 if mode == "mean" else np.maximum(a, b1)
    expected = 1 - np.minimum(comp[..., ::-1] * 3.0, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # vertical flip mirrors y; boost 1 and no invert leave the composite
    got_v = contrast.overlay([a, b], mode=mode, flip_v=True)
    np.testing.assert_allclose(got_v, comp[:, ::-1, :], rtol=1e-6, atol=1e-6)


def test_overlay_on_dask_computes_only_the_region():
    a, b = _probs((8, 64, 64), 2), _probs((8, 64, 64), 3)
    da_a, src_a = counted(a, (4, 32, 32))
    da_b, src_b = counted(b, (4, 32, 32))
    out = contrast.overlay([da_a, da_b], mode="max", flip_h=True, boost=2.5, divisors=[1, 1])
    assert isinstance(out, da.Array)
    assert src_a.reads == src_b.reads == []
    got = out[5, 40:60, 0:20].compute()  # after the flip: x 44..63 of the inputs, one chunk
    expected = np.minimum(np.maximum(a, b)[..., ::-1] * 2.5, 1)[5, 40:60, 0:20]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert len(src_a.reads) == len(src_b.reads) == 1


def test_overlay_resizes_other_shapes_to_the_first_and_says_so():
    a = _probs((4, 20, 20), 4)
    b = _probs((2, 10, 10), 5)
    with pytest.warns(contrast.ResizedWarning, match=r"map 1 has shape \(2, 10, 10\)"):
        got = contrast.overlay([a, da.from_array(b, chunks=5)], mode="mean")
    assert got.shape == a.shape
    up = b.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # nearest neighbour, factor 2
    np.testing.assert_allclose(np.asarray(got), (a + up) / 2, rtol=1e-6)
    with pytest.raises(ScrollsegError, match="3D"):
        contrast.overlay([a, b[0]])


def test_overlay_bad_options():
    a = _probs((4, 4), 0)
    with pytest.raises(ScrollsegError, match=r"boost must be in \[1, 10\]"):
        contrast.overlay([a], boost=0.5)
    with pytest.raises(ScrollsegError, match="mode"):
        contrast.overlay([a], mode="median")
    with pytest.raises(ScrollsegError, match="at least one"):
        contrast.overlay([])


def test_overlay_levels_keeps_the_pyramid_and_one_divisor_per_map():
    a = (np.random.default_rng(6).integers(0, 200, (8, 32, 32))).astype(np.uint8)
    pyr = [da.from_array(a, chunks=16), da.from_array(a[::2, ::2, ::2], chunks=16)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = contrast.overlay_levels([pyr, pyr], mode="mean", invert=True)
    assert [o.shape for o in out] == [(8, 32, 32), (4, 16, 16)]
    np.testing.assert_allclose(out[1].compute(), 1 - a[::2, ::2, ::2] / a.max(), atol=1e-6)


# -- PNG -----------------------------------------------------------------------------------
def test_save_png_region_clipped_and_scaled(tmp_path):
    values = np.linspace(-0.5, 1.5, 8 * 40 * 50, dtype=np.float32).reshape(8, 40, 50)
    arr, source = counted(values, (1, 20, 25))  # 32 chunks
    path = contrast.save_png(arr, tmp_path / "view", (3, slice(0, 20), slice(25, 50)))
    assert path.suffix == ".png"
    got = np.asarray(Image.open(path))
    assert got.dtype == np.uint8
    assert got.shape == (20, 25)
    expected = np.rint(np.clip(values[3, :20, 25:], 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert len(source.reads) == 1
    with pytest.raises(ScrollsegError, match="2D"):
        contrast.save_png(arr, tmp_path / "x.png", (slice(0, 2),))
