"""Live requests: the full run's answer on the view, cache, priorities, cancel, cap.

The model is the built-in one on the phantom (real nnU-Net, trained by the project's
own code), without mirroring so that a request costs seconds on a CPU; the zscore case
uses the tiny test model.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_scrollseg.engine.builtin import builtin_model
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.live import LiveOptions, LivePredictor, choose_level, view_blocks
from napari_scrollseg.engine.volumes import open_volume
from tests.engine.conftest import blocky_volume

OPTS = LiveOptions(device="cpu", mirror=False, batch_size=2, max_tiles=None)
# one slice of a 2D view: z 20 (tiles of 32 starting at 0, 16, 32 -> two rows)
VIEW = (slice(20, 21), slice(16, 88), slice(40, 112))


@pytest.fixture(scope="module")
def live(phantom_zarr: Path, one_torch_thread: None):
    with LivePredictor(builtin_model(), open_volume(phantom_zarr), OPTS) as p:
        yield p


@pytest.fixture(scope="module")
def full_run(phantom_zarr: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread):
    """``predict_volume`` of the same model over the view's voxels (tiles of the whole grid)."""
    from napari_scrollseg.engine.predict import predict_volume

    out = tmp_path_factory.mktemp("live_full") / "pred.zarr"
    roi = [(s.start, s.stop) for s in VIEW]
    predict_volume(
        builtin_model(), phantom_zarr, out, roi=roi, mirror=False, device="cpu", bar=False
    )
    g = zarr.open_group(str(out), mode="r")
    return np.asarray(g["0"][:]), np.asarray(g["labels/prediction/0"][:])


def test_submit_load_loads_and_predicts_nothing(live: LivePredictor) -> None:
    before = live.forward_passes
    req = live.submit_load().wait(600)
    assert live.model is not None
    assert (req.level, req.exact, req.probs, req.tiles) == (0, True, None, 0)
    assert req.scale == pytest.approx((7.91, 7.91, 7.91))
    assert live.forward_passes == before


def test_view_equals_the_full_run_on_the_same_voxels(live: LivePredictor, full_run) -> None:
    events = []
    live.on_event = events.append
    try:
        req = live.predict(VIEW, timeout=600)
    finally:
        live.on_event = None
    ref_probs, ref_labels = full_run
    assert req.probs.shape == ref_probs.shape
    diff = np.abs(req.probs - ref_probs / 255.0).max()
    assert diff <= 1 / 255, diff
    assert (req.labels == ref_labels).mean() == 1.0
    assert len(np.unique(req.labels)) > 1  # the model finds papyrus in air
    # blocks landed one by one, nearest the view centre first
    blocks = [e.block for e in events if e.block is not None]
    assert len(blocks) == req.blocks_total == req.blocks_done > 1
    assert events[-1].final
    assert events[-1].error is None
    centre = np.array([(s.start + s.stop) / 2 for s in VIEW])

    def dist(b):
        return np.linalg.norm(np.array([(s.start + s.stop) / 2 for s in b]) - centre)

    assert dist(blocks[0]) == min(dist(b) for b in blocks)
    assert req.scale == pytest.approx((7.91, 7.91, 7.91))
    assert req.tiles_run + req.tiles_cached == req.tiles


def test_pan_away_and_back_runs_no_new_forward_pass(live: LivePredictor) -> None:
    first = live.predict(VIEW, timeout=600)
    before = live.forward_passes
    away = (slice(50, 51), slice(60, 128), slice(0, 40))  # other tiles along z
    live.predict(away, timeout=600)
    ran_away = live.forward_passes - before
    mid = live.forward_passes
    back = live.predict(VIEW, timeout=600)
    assert live.forward_passes == mid  # the session's counter: nothing ran
    assert back.tiles_run == 0
    assert back.tiles_cached == back.tiles
    np.testing.assert_array_equal(back.labels, first.labels)
    np.testing.assert_array_equal(back.probs, first.probs)
    assert ran_away > 0
    # stepping a slice inside the same tiles runs nothing either
    step = live.predict((slice(21, 22), VIEW[1], VIEW[2]), timeout=600)
    assert step.tiles_run == 0


def test_moving_the_view_mid_request_cancels_the_rest(live: LivePredictor) -> None:
    opts = LiveOptions(device="cpu", mirror=False, batch_size=1, max_tiles=None)
    with LivePredictor(builtin_model(), live._volume, opts) as p:  # nothing cached
        first_block = threading.Event()

        def on_event(ev):
            if ev.block is not None and ev.request.id == 1:
                first_block.set()

        p.on_event = on_event
        view = (slice(50, 51), slice(0, 128), slice(0, 128))  # 9 tiles, 4 blocks
        est = p.estimate(view)
        req = p.submit(view)
        assert first_block.wait(600)
        corner = (slice(50, 51), slice(100, 128), slice(100, 128))
        p.view_moved(corner)  # the view left three of the four blocks
        req.wait(600)
        assert 0 < req.tiles_run < est.to_run
        assert req.blocks_done < req.blocks_total
        # a new request cancels a running one outright
        other = p.submit((slice(10, 11), slice(0, 128), slice(0, 128)))
        newer = p.submit(corner)  # served from the cache
        newer.wait(600)
        other._done.wait(600)
        assert other.cancelled
        assert other.tiles_run < p.estimate(other.box).tiles


def test_cap_runs_the_centre_and_estimate_says_so(live: LivePredictor) -> None:
    from dataclasses import replace

    with LivePredictor(
        builtin_model(), live._volume, replace(OPTS, max_tiles=5)
    ) as p:  # a cache of its own: nothing cached yet
        view = (slice(50, 51), slice(0, 128), slice(0, 128))
        est = p.estimate(view)
        assert est.capped
        assert est.capped_to == 4  # the centre block; the next one would pass the cap
        assert est.to_run == 9
        req = p.predict(view, timeout=600)
        assert req.capped
        assert req.tiles_run == 4
        assert req.blocks_done < req.blocks_total
        assert p.rate
        hits, misses = p.cache.hits, p.cache.misses
        assert p.estimate(view).seconds is not None
        assert p.estimate(view).cached == 4  # the tiles run are in the cache ...
        assert (p.cache.hits, p.cache.misses) == (hits, misses)  # ... looked up, not used


def test_zscore_model_uses_whole_volume_statistics(tmp_path: Path, tiny_model_3d_zscore):
    from napari_scrollseg.engine.omezarr import write_image
    from napari_scrollseg.engine.predict import predict_volume

    image = blocky_volume((13, 37, 29), seed=9)
    image[:, :, :10] //= 4  # a view with very different statistics from the whole
    write_image(tmp_path / "vol.zarr", image, spacing=(1.0, 1.0, 1.0), chunks=(8, 16, 16))
    predict_volume(
        tiny_model_3d_zscore,
        tmp_path / "vol.zarr",
        tmp_path / "out.zarr",
        mirror=False,
        device="cpu",
        bar=False,
    )
    g = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    view = (slice(6, 7), slice(0, 37), slice(0, 12))
    opts = LiveOptions(device="cpu", mirror=False)
    with LivePredictor(tiny_model_3d_zscore, tmp_path / "vol.zarr", opts) as p:
        assert "whole volume" in p.normalization_note
        req = p.predict(view, timeout=600)
    assert np.abs(req.probs - g["0"][(slice(None), *view)] / 255.0).max() <= 1 / 255
    assert (req.labels == g["labels/prediction/0"][view]).all()


def test_bad_inputs_come_back_as_one_clear_error(phantom_zarr: Path, tmp_path: Path) -> None:
    with LivePredictor(tmp_path / "nope", phantom_zarr, OPTS) as p:
        req = p.submit(VIEW)
        with pytest.raises(ScrollsegError, match="does not exist"):
            req.wait(60)
    with (
        LivePredictor(builtin_model(), phantom_zarr, OPTS) as p,
        pytest.raises(ScrollsegError, match="does not overlap"),
    ):
        p.predict((slice(0, 1), slice(500, 600), slice(0, 10)), timeout=60)
    with pytest.raises(ScrollsegError, match="precision"):
        LiveOptions(precision="double")


def test_choose_level_and_blocks() -> None:
    spacings = [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (4.0, 4.0, 4.0)]
    assert choose_level(spacings, (1.0, 1.0, 1.0)) == 0
    assert choose_level(spacings, (3.5, 3.5, 3.5)) == 2
    assert choose_level(spacings, (2.2, 2.2)) == 1  # a 2D model: in-plane only
    box = (slice(3, 4), slice(10, 100), slice(0, 70))
    blocks = view_blocks(box, (1, 32, 32))
    covered = np.zeros((1, 90, 70), int)
    for b in blocks:
        covered[tuple(slice(s.start - r.start, s.stop - r.start) for s, r in zip(b, box))] += 1
    assert (covered == 1).all()
    assert blocks[0] == (slice(3, 4), slice(32, 64), slice(32, 64))


def test_out_of_memory_retries_smaller_batches_then_says_what_to_do(tiny_model_3d: Path):
    import torch

    volume = blocky_volume((12, 40, 40), seed=3)
    box = (slice(5, 6), slice(0, 40), slice(0, 40))
    opts = LiveOptions(device="cpu", mirror=False, batch_size=4, max_tiles=None)
    with LivePredictor(tiny_model_3d, volume, opts) as p:
        reference = p.predict(box, timeout=120)
        p.cache.clear()
        session = p.session
        real = session._forward_counted  # the device's forward under the session's halving
        sizes = []

        def forward(batch, options):  # a device that holds one tile at a time
            sizes.append(int(batch.shape[0]))
            if batch.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(batch, options)

        session._forward_counted = forward
        again = p.predict(box, timeout=120)
        np.testing.assert_array_equal(again.labels, reference.labels)
        assert max(sizes) == 4
        assert sizes[-1] == 1
        p.cache.clear()
        session._forward_counted = lambda batch, options: (_ for _ in ()).throw(
            torch.OutOfMemoryError("CUDA out of memory (injected)")
        )
        with pytest.raises(ScrollsegError, match="ran out of memory on a single tile"):
            p.predict(box, timeout=120)


def test_zoomed_out_on_a_pyramid_is_a_coarse_preview_zoomed_in_exact(
    phantom_zarr: Path, full_run, tmp_path: Path
) -> None:
    """A view whose level-0 request exceeds the cap runs on the finest pyramid level that
    fits (placed at that level's scale and origin, ``exact=False``), equal to the full
    run on that level; zoomed in, level 0 runs, equal to the full run there."""
    from dataclasses import replace

    from napari_scrollseg.engine.predict import predict_volume

    s = 7.91
    with LivePredictor(builtin_model(), open_volume(phantom_zarr), replace(OPTS, max_tiles=8)) as p:
        # the whole slice z 20: 18 tiles at level 0 (over the cap), 1 tile at level 1
        whole = p.submit_world((20 * s, 0, 0), (20 * s, 128 * s, 128 * s), 0).wait(600)
        # zoomed in on a corner of VIEW: 8 tiles at level 0
        zoomed = p.submit_world((20 * s, 16.5 * s, 40.5 * s), (20 * s, 39.5 * s, 63.5 * s), 0).wait(
            600
        )
    assert (whole.level, whole.exact, zoomed.level, zoomed.exact) == (1, False, 0, True)
    assert whole.scale == pytest.approx((2 * s,) * 3)
    # a level-1 voxel pools level-0 voxels 2i, 2i+1: its centre is half a voxel further
    assert whole.translate == pytest.approx((s / 2,) * 3)
    assert whole.box == (slice(10, 11), slice(0, 64), slice(0, 64))  # z 20 at level 1
    assert whole.tiles_run == 1
    out = tmp_path / "level1.zarr"
    roi = [(b.start, b.stop) for b in whole.box]
    predict_volume(builtin_model(), open_volume(phantom_zarr, level=1), out, roi=roi,
                   ignore_spacing=True, mirror=False, device="cpu", bar=False)  # fmt: skip
    g = zarr.open_group(str(out), mode="r")
    assert np.abs(whole.probs - g["0"][:] / 255).max() <= 1 / 255
    assert (whole.labels == g["labels/prediction/0"][:]).mean() == 1.0
    assert zoomed.box == (slice(20, 21), slice(16, 40), slice(40, 64))
    assert zoomed.tiles_run + zoomed.tiles_cached == zoomed.tiles == 8
    ref_probs, ref_labels = full_run  # VIEW starts at (20, 16, 40)
    assert np.abs(zoomed.probs - ref_probs[:, :, :24, :24] / 255).max() <= 1 / 255
    assert (zoomed.labels == ref_labels[:, :24, :24]).mean() == 1.0
