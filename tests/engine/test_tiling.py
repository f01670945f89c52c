"""The global tile grid, gaussian map and weight sums against nnU-Net's own functions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from napari_scrollseg.engine.tiling import (
    Grid,
    gaussian_map,
    make_grid,
    steps_for_sliding_window,
    tta_transforms,
    weight_map,
    weight_sum,
)


@pytest.mark.parametrize("step", [0.5, 0.33, 0.7, 1.0])
def test_steps_equal_nnunet(step):
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    for size, patch in [(37, 16), (71, 32), (53, 32), (16, 16), (129, 64), (1000, 128), (5, 4)]:
        ours = steps_for_sliding_window(size, patch, step)
        theirs = compute_steps_for_sliding_window((size,), (patch,), step)[0]
        assert list(ours) == theirs, (size, patch, step)


def test_gaussian_equals_nnunet_compute_gaussian():
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    for patch in [(8, 16, 16), (16, 32, 32), (32, 32)]:
        theirs = compute_gaussian(
            patch, sigma_scale=1 / 8, value_scaling_factor=10, device=torch.device("cpu")
        )
        ours = gaussian_map(patch)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs.float().numpy())
        assert ours.min() > 0
        assert ours.max() == 10


def test_grid_tiles_equal_nnunet_slicers_with_padding_and_offset():
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    # a nonzero box of shape (6, 71, 53) at (3, 2, 1): z is padded to the patch (8)
    grid = make_grid((6, 71, 53), (8, 32, 32), 0.5, offset=(3, 2, 1))
    assert grid.shape == (8, 71, 53)
    assert grid.offset == (2, 2, 1)  # one voxel of padding before along z (2 // 2)
    assert grid.data == (slice(3, 9), slice(2, 73), slice(1, 54))
    steps = compute_steps_for_sliding_window(grid.shape, (8, 32, 32), 0.5)
    expected = [tuple(o + s for o, s in zip(grid.offset, t)) for t in itertools.product(*steps)]
    assert grid.tiles() == expected
    assert grid.n_tiles == len(expected) == 1 * 4 * 3


def test_2d_grid_has_a_row_per_slice():
    grid = make_grid((5, 45, 37), (16, 16), 0.5)
    assert grid.patch == (1, 16, 16)
    assert grid.starts[0] == (0, 1, 2, 3, 4)
    assert grid.n_tiles == 5 * 5 * 4
    assert weight_map(grid.patch).shape == (1, 16, 16)
    np.testing.assert_array_equal(weight_map(grid.patch)[0], gaussian_map((16, 16)))


def _brute_intersecting(grid: Grid, box):
    out = []
    for t in grid.tiles():
        if all(s < b.stop and s + p > b.start for s, p, b in zip(t, grid.patch, box)):
            out.append(t)
    return out


def test_tiles_intersecting_and_ownership_partition():
    grid = make_grid((37, 71, 53), (16, 32, 32), 0.5)
    rng = np.random.default_rng(0)
    for _ in range(20):
        lo = rng.integers(0, [36, 70, 52])
        hi = lo + rng.integers(1, 30, 3)
        box = tuple(slice(int(a), int(min(b, n))) for a, b, n in zip(lo, hi, (37, 71, 53)))
        assert grid.tiles_intersecting(box) == _brute_intersecting(grid, box)
    # chunks of an awkward size partition the volume: every tile has exactly one owner
    chunk = (16, 20, 24)
    owners = []
    for start in itertools.product(*(range(0, n, c) for n, c in zip((37, 71, 53), chunk))):
        box = tuple(slice(s, s + c) for s, c in zip(start, chunk))
        owners += grid.tiles_starting_in(box)
    assert sorted(owners) == sorted(grid.tiles())


def test_weight_sum_matches_placing_every_tile():
    grid = make_grid((21, 45, 37), (8, 16, 16), 0.5)
    g = weight_map(grid.patch)
    full = np.zeros((21, 45, 37), np.float32)
    for t in grid.tiles():
        full[grid.tile_box(t)] += g
    box = (slice(3, 17), slice(0, 20), slice(30, 37))
    np.testing.assert_allclose(weight_sum(grid, box, g), full[box], rtol=1e-6)
    assert (full > 0).all()
    count = np.zeros((21, 45, 37), np.float32)
    for t in grid.tiles():
        count[grid.tile_box(t)] += 1
    u = weight_sum(grid, box, weight_map(grid.patch, "uniform"))
    np.testing.assert_array_equal(u, count[box])
    assert u.min() >= 1


def test_tta_modes():
    assert tta_transforms("none", mirror_axes=(0, 1, 2), n_spatial=3) == [(0, ())]
    mirror = tta_transforms("mirror", mirror_axes=(0, 1, 2), n_spatial=3)
    assert len(mirror) == 8
    assert mirror[0] == (0, ())
    assert len(set(mirror)) == 8
    assert len(tta_transforms("mirror", mirror_axes=(0, 1), n_spatial=2)) == 4
    rf = tta_transforms("rot-flip-12", mirror_axes=(0, 1), n_spatial=2)
    assert len(rf) == 12
    assert {k for k, _ in rf} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="2D models only"):
        tta_transforms("rot-flip-12", mirror_axes=(0, 1, 2), n_spatial=3)
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_transforms("flip", mirror_axes=(), n_spatial=3)
    with pytest.raises(ValueError, match="blend must be one of"):
        weight_map((8, 8), "cosine")
