"""The synthetic scroll: deterministic, chunking-independent, scroll-like classes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_scrollseg.engine import phantom
from napari_scrollseg.engine.errors import ScrollsegError


def test_classes_and_intensities():
    img, truth = phantom.make_phantom((24, 96, 96), seed=3)
    assert img.dtype == np.uint8
    assert truth.dtype == np.uint8
    counts = np.bincount(truth.ravel(), minlength=4)
    assert counts[0] == 0  # every voxel is labelled densely
    assert counts[phantom.AIR] > counts[phantom.PAPYRUS] > counts[phantom.INK] > 0
    air = img[truth == phantom.AIR].mean()
    papyrus = img[truth == phantom.PAPYRUS].mean()
    ink = img[truth == phantom.INK].mean()
    assert papyrus > air + 50  # sheets stand out from air
    assert ink > papyrus  # ink is faint but brighter
    assert img[truth == phantom.AIR].std() > 5  # scanner-like noise


def test_deterministic_and_seeded():
    a = phantom.make_phantom((16, 40, 40), seed=1)
    b = phantom.make_phantom((16, 40, 40), seed=1)
    c = phantom.make_phantom((16, 40, 40), seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_lazy_equals_eager_for_any_chunking():
    img, truth = phantom.make_phantom((21, 48, 40), seed=5)
    limg, ltruth = phantom.lazy_phantom((21, 48, 40), seed=5, z_chunk=4)
    np.testing.assert_array_equal(limg.compute(), img)
    np.testing.assert_array_equal(ltruth.compute(), truth)


def test_written_layout(phantom_zarr):
    root = zarr.open_group(str(phantom_zarr), mode="r")
    img, truth = phantom.make_phantom(phantom.DEFAULT_SHAPE, seed=0)
    np.testing.assert_array_equal(root["0"][:], img)
    np.testing.assert_array_equal(root["labels/truth/0"][:], truth)
    assert root.attrs["scrollseg"]["classes"] == {"air": 1, "papyrus": 2, "ink": 3}
    scale = root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == list(phantom.SPACING)


@pytest.mark.parametrize("shape", [(4, 64, 64), (10, 10)])
def test_bad_shape(shape):
    with pytest.raises(ScrollsegError, match="three sizes >= 8"):
        phantom.make_phantom(shape)


def test_ink_contrast_changes_only_the_ink() -> None:
    from napari_scrollseg.engine.phantom import INK, make_phantom

    faint, truth = make_phantom((16, 40, 40), seed=3)
    strong, truth2 = make_phantom((16, 40, 40), seed=3, ink_contrast=50)
    np.testing.assert_array_equal(truth, truth2)
    ink = truth == INK
    assert ink.any()
    np.testing.assert_array_equal(faint[~ink], strong[~ink])
    assert (strong[ink].astype(int) - faint[ink]).mean() > 15


def test_phantom_cases_are_written_once_dense_or_sparse(tmp_path) -> None:
    from napari_scrollseg.engine.demo import phantom_cases

    dense = phantom_cases(tmp_path, (12, 24, 24), [1, 2])
    sparse = phantom_cases(tmp_path, (12, 24, 24), [1, 2], n_slices=2, ink_contrast=18)
    assert [p.name for p, _ in dense] == ["seed1_ink18.zarr", "seed2_ink18.zarr"]
    assert [p for p, _ in sparse] == [p for p, _ in dense]  # same contrast: reused
    for (_, truth), (_, labels) in zip(dense, sparse):
        assert (truth > 0).all()
        painted = np.flatnonzero((labels > 0).any(axis=(1, 2)))
        assert len(painted) == 2
        np.testing.assert_array_equal(labels[painted], truth[painted])


def test_default_shape_is_unchanged():
    """The built-in model and the docs' figures were made on this exact phantom."""
    import hashlib

    img, truth = phantom.make_phantom(phantom.DEFAULT_SHAPE, seed=0)
    digest = hashlib.sha256(img.tobytes() + truth.tobytes()).hexdigest()
    assert digest.startswith("ef1aa4d7431be6f4")


def _sheet_runs(truth: np.ndarray) -> float:
    """Median length of the papyrus runs along x (sheet thickness across the sheets)."""
    runs = []
    for row in (truth != phantom.AIR).reshape(-1, truth.shape[-1]):
        edges = np.flatnonzero(np.diff(np.r_[0, row.astype(np.int8), 0]))
        runs += list(edges[1::2] - edges[::2])
    return float(np.median(runs))


def test_features_keep_their_voxel_size_above_the_default_shape():
    _, small = phantom.make_phantom((8, 128, 128), seed=0)
    _, large = phantom.make_phantom((8, 384, 384), seed=0)
    assert abs(_sheet_runs(large) - _sheet_runs(small)) <= 1
    # more turns of the same sheets: papyrus/air crossings grow with the size
    crossings = [
        np.abs(np.diff((t == phantom.AIR).astype(np.int8), axis=-1)).sum() for t in (small, large)
    ]
    assert crossings[1] > 2.5 * crossings[0] * (384 / 128)
    # below the default shape, features still shrink with the shape (small tests stay fast)
    _, tiny = phantom.make_phantom((8, 64, 64), seed=0)
    assert _sheet_runs(tiny) < _sheet_runs(small)
