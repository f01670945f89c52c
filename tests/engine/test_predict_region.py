"""predict_region equals nnU-Net's own nnUNetPredictor on the whole volume, inside any box.

Volumes have odd shapes (no multiple of the patch). The reference is stock nnU-Net
(``predict_single_npy_array``, CPU, same folds, step and mirroring). See
``conftest.equivalence`` for the float16 band along the volume edges, where nnU-Net's own
sums are subnormal and scrollseg (float32) differs by design.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.model import load_model
from napari_scrollseg.engine.predict import Predictor, predict_region, run_tiles
from napari_scrollseg.engine.tiling import weight_map, weight_sum
from tests.engine.conftest import (
    blocky_volume,
    equivalence,
    nnunet_predict,
    nnunet_references,
    tiny_dataset_json,
    tiny_plans,
    write_tiny_model,
)

TOL = 1 / 255


def _check(model, volume, ref, boxes, *, step=0.5, session=None, **kw) -> list[dict]:
    """Inside each box: the bar against nnU-Net with float32 sums everywhere, and against
    stock nnU-Net (float16 sums) outside its float16 band (through ``session`` if given)."""
    ref_labels, ref_probs = ref["labels"], ref["probs"]
    arr = getattr(volume, "data", volume)
    shape = arr.shape[-3:]
    grid = model.grid(volume, step)
    out = []
    for box in boxes:
        box = tuple(slice(*b) for b in box)
        probs, labels = predict_region(session or model, volume, box, step=step, **kw)
        assert probs.shape == (model.n_classes, *(b.stop - b.start for b in box))
        assert labels.shape == probs.shape[1:]
        np.testing.assert_allclose(probs.sum(axis=0), 1, atol=1e-5)
        w = weight_sum(grid, box, weight_map(grid.patch))
        exact = np.abs(probs - ref["probs32"][(slice(None), *box)]).max()
        assert exact <= TOL, (box, exact)
        assert (labels == ref["labels32"][box]).mean() >= 0.9999, box
        stats = equivalence(probs, labels, ref_probs[(slice(None), *box)], ref_labels[box], w)
        stats["max_prob_diff_float32_sums"] = float(exact)
        assert stats["max_prob_diff_sound"] <= TOL, (box, stats)
        assert stats["label_agree_decided"] >= 0.9999, (box, stats)
        assert stats["label_agree_all"] >= 0.995, (box, stats)
        assert stats["frac_sound"] >= 0.9, (box, stats)
        out.append(stats)
    assert shape == ref_labels.shape
    return out


BOXES_3D = [
    ((0, 23), (0, 45), (0, 37)),  # whole volume
    ((5, 17), (10, 33), (7, 29)),  # interior
    ((15, 23), (0, 12), (25, 37)),  # corner, touching three borders
    ((11, 12), (3, 45), (0, 37)),  # one slice
]


@pytest.fixture(scope="module")
def ct_case(tiny_model_3d):
    """nnU-Net's answer for the 3D CT model, two folds, on a (23, 45, 37) volume."""
    volume = blocky_volume((23, 45, 37), seed=3)
    return volume, nnunet_references(tiny_model_3d, volume, folds=(0, 1))


def test_3d_ct_two_folds_matches_nnunet(tiny_model_3d, ct_case):
    volume, ref = ct_case
    model = load_model(tiny_model_3d, device="cpu")
    assert len(set(np.unique(ref["labels"]))) == 3  # the tiny net's answer is not trivial
    session = Predictor(model, cache=None)
    before = session.forward_passes
    stats = _check(model, volume, ref, BOXES_3D[:1], session=session)
    print("3D region, whole volume, vs nnUNetPredictor:", stats[0])
    # no wasted work: the whole volume runs each of nnU-Net's tiles once
    n_nnunet = len(ref["predictor"]._internal_get_sliding_window_slicers(volume.shape))
    assert session.forward_passes - before == n_nnunet == model.grid(volume).n_tiles
    _check(model, volume, ref, BOXES_3D[1:])


def test_only_the_float16_accumulation_differs(tiny_model_3d, ct_case):
    """Our grid, gaussian and normalised input run through nnU-Net's own network and TTA,
    summed in float16 in nnU-Net's order (per fold, tile by tile), give nnU-Net's output
    to the last bit, also in the float16 band where scrollseg's float32 sums differ."""
    import torch

    volume, ref = ct_case
    labels, probs, predictor = ref["labels"], ref["probs"], ref["predictor"]
    model = load_model(tiny_model_3d, device="cpu")
    grid = model.grid(volume)
    read = model.reader(volume)
    w16 = torch.from_numpy(weight_map(grid.patch).copy()).half()
    total = torch.zeros((3, *volume.shape), dtype=torch.half)
    for params in predictor.list_of_parameters:
        predictor.network.load_state_dict(params)
        acc = torch.zeros((3, *volume.shape), dtype=torch.half)
        n = torch.zeros(volume.shape, dtype=torch.half)
        for tile in grid.tiles():
            box = grid.tile_box(tile)
            x = torch.from_numpy(read(box))[None]
            logits = predictor._internal_maybe_mirror_and_predict(x)[0] * w16
            acc[(slice(None), *box)] += logits
            n[box] += w16
        total += torch.div(acc, n)
    total /= len(predictor.list_of_parameters)
    emulated = torch.softmax(total.float(), 0).numpy()
    np.testing.assert_allclose(emulated, probs, atol=1e-6)
    np.testing.assert_array_equal(emulated.argmax(0), labels)


def test_3d_zscore_uses_whole_volume_stats(tiny_model_3d_zscore):
    volume = blocky_volume((23, 45, 37), seed=4).astype(np.float32) * 0.7 + 300
    volume[:8] += 40  # the statistics of a crop differ from the whole volume's
    ref = nnunet_references(tiny_model_3d_zscore, volume, folds=(0,), step=0.7)
    probs = ref["probs"]
    model = load_model(tiny_model_3d_zscore, folds=(0,), device="cpu")
    _check(model, volume, ref, [BOXES_3D[1], BOXES_3D[2]], step=0.7)
    # a crop predicted as if it were the whole volume (crop statistics) gives another answer
    crop = volume[10:23]
    p_crop, _ = predict_region(model, crop, ((0, 13), (0, 45), (0, 37)), step=0.7)
    assert np.abs(p_crop - probs[:, 10:23]).max() > 5 * TOL


def test_2d_two_folds_matches_nnunet(tiny_model_2d):
    volume = blocky_volume((5, 45, 37), seed=5)
    ref = nnunet_references(tiny_model_2d, volume, folds=(0, 1))
    model = load_model(tiny_model_2d, device="cpu")
    assert model.is_2d
    assert model.patch_size == (16, 16)
    session = Predictor(model, cache=None)
    before = session.forward_passes
    boxes = [((0, 5), (0, 45), (0, 37)), ((1, 4), (9, 30), (5, 20)), ((4, 5), (30, 45), (0, 11))]
    stats = _check(model, volume, ref, boxes[:1], session=session)
    print("2D region, whole volume, vs nnUNetPredictor:", stats[0])
    n_nnunet = len(ref["predictor"]._internal_get_sliding_window_slicers(volume.shape))
    assert session.forward_passes - before == n_nnunet
    _check(model, volume, ref, boxes[1:])


def test_zero_border_is_cropped_like_nnunet(tiny_model_3d):
    # z extent of the nonzero box (6) is below the patch (8): nnU-Net pads it, centred
    volume = blocky_volume((12, 45, 37), seed=6, zero_border=3)
    ref = nnunet_references(tiny_model_3d, volume, folds=(0,))
    model = load_model(tiny_model_3d, folds=(0,), device="cpu")
    grid = model.grid(volume)
    assert grid.data == (slice(3, 9), slice(4, 40), slice(6, 34))
    assert grid.offset[0] == 2
    assert grid.shape[0] == 8
    stats = _check(model, volume, ref, [((0, 12), (0, 45), (0, 37)), ((0, 6), (20, 45), (0, 10))])
    # a known nonzero box skips the pass over the volume and gives the same answer
    same, _ = predict_region(model, volume, ((0, 6), (20, 45), (0, 10)), bbox=grid.data)
    np.testing.assert_array_equal(
        same, predict_region(model, volume, ((0, 6), (20, 45), (0, 10)))[0]
    )
    p, lab = predict_region(model, volume, ((0, 3), (0, 45), (0, 37)))  # all in the border
    assert (lab == 0).all()
    assert (p[0] == 1).all()
    assert stats[0]["label_agree_all"] >= 0.999


def test_zscore_with_mask_for_norm_on_a_cylinder_matches_nnunet(tmp_path, one_torch_thread):
    # a scroll-like cylinder of material in zero air: nnU-Net normalises inside the mask only
    plans = tiny_plans(scheme="ZScoreNormalization")
    plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [True]
    folder = write_tiny_model(
        tmp_path, plans=plans, dataset_json=tiny_dataset_json(channel="zscore"), folds=(0,)
    )
    volume = blocky_volume((12, 41, 39), seed=13)
    yy, xx = np.mgrid[:41, :39]
    volume[:, (yy - 20) ** 2 + (xx - 19) ** 2 > 18**2] = 0
    ref = nnunet_references(folder, volume, folds=(0,))
    model = load_model(folder, device="cpu")
    _check(model, volume, ref, [((0, 12), (0, 41), (0, 39)), ((3, 9), (0, 20), (10, 30))])


def test_transposed_plans_and_spacing_match_nnunet(tmp_path, one_torch_thread):
    # nnU-Net runs this model in (y, z, x) order; spacing (z, y, x) = (2, 0.8, 0.8)
    plans = tiny_plans(transpose=(1, 0, 2), spacing=(0.8, 2.0, 0.8), patch_3d=(16, 8, 16))
    folder = write_tiny_model(tmp_path, plans=plans, folds=(0,), seed=7)
    volume = blocky_volume((13, 35, 29), seed=7)
    ref = nnunet_references(folder, volume, folds=(0,), spacing=(2.0, 0.8, 0.8))
    model = load_model(folder, device="cpu")
    assert model.patch_size == (8, 16, 16)
    assert model.spacing == (2.0, 0.8, 0.8)
    vol = types.SimpleNamespace(data=volume, spacing=(2.0, 0.8, 0.8), axes="zyx")
    _check(model, vol, ref, [((0, 13), (0, 35), (0, 29)), ((2, 9), (5, 30), (0, 12))])


# -- TTA and blending modes (not nnU-Net's answer; checked for their own properties) ------------
def test_mirror_tta_is_flip_equivariant(tiny_model_3d):
    import torch

    model = load_model(tiny_model_3d, folds=(0,), device="cpu")
    x = torch.from_numpy(blocky_volume((8, 16, 16), seed=8).astype(np.float32) / 100 - 1)[
        None, None
    ]
    for axis in (2, 3, 4):
        a = model.forward(torch.flip(x, [axis]), mirror=True)
        b = torch.flip(model.forward(x, mirror=True), [axis])
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # without mirroring the network alone is not flip-equivariant
    a = model.forward(torch.flip(x, [4]), mirror=False)
    assert not torch.allclose(a, torch.flip(model.forward(x, mirror=False), [4]), atol=1e-3)


def test_rot_flip_12_is_rotation_equivariant(tiny_model_2d, tiny_model_3d):
    import torch

    model = load_model(tiny_model_2d, folds=(0,), device="cpu")
    x = torch.from_numpy(blocky_volume((1, 16, 16), seed=9).astype(np.float32) / 100 - 1)[None]
    rot = model.forward(torch.rot90(x, 1, dims=(-2, -1)), tta="rot-flip-12")
    expected = torch.rot90(model.forward(x, tta="rot-flip-12"), 1, dims=(-2, -1))
    torch.testing.assert_close(rot, expected, atol=1e-4, rtol=1e-4)
    plain = model.forward(x, tta="mirror")
    assert not torch.allclose(plain, model.forward(x, tta="rot-flip-12"), atol=1e-3)
    with pytest.raises(ScrollsegError, match="unknown TTA mode 'bogus'"):
        model.forward(x, tta="bogus")
    model3d = load_model(tiny_model_3d, folds=(0,), device="cpu")
    with pytest.raises(ScrollsegError, match=r"rot-flip-12.*2D models"):
        model3d.forward(torch.zeros(1, 1, 8, 16, 16), tta="rot-flip-12")


def test_uniform_blend_is_plain_average_of_tiles(tiny_model_3d):
    import torch

    model = load_model(tiny_model_3d, folds=(0,), device="cpu")
    volume = blocky_volume((10, 20, 19), seed=10)
    box = tuple(slice(0, s) for s in volume.shape)
    probs, _ = predict_region(model, volume, box, blend="uniform", mirror=False)
    grid = model.grid(volume)
    read = model.reader(volume)
    total = np.zeros((3, *volume.shape), np.float32)
    count = np.zeros(volume.shape, np.float32)
    for t in grid.tiles():
        tb = grid.tile_box(t)
        logits = model.forward(torch.from_numpy(read(tb))[None], mirror=False)[0].numpy()
        total[(slice(None), *tb)] += logits
        count[tb] += 1
    expected = torch.softmax(torch.from_numpy(total / count), 0).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    gauss, _ = predict_region(model, volume, box, mirror=False)
    assert np.abs(gauss - probs).max() > 1e-3


def test_run_tiles_partial_sums_add_up(tiny_model_3d):
    model = load_model(tiny_model_3d, folds=(0,), device="cpu")
    volume = blocky_volume((14, 30, 27), seed=11)
    grid = model.grid(volume)
    read = model.reader(volume)
    box = (slice(3, 11), slice(5, 25), slice(0, 27))
    tiles = grid.tiles_intersecting(box)
    whole = run_tiles(model, read, tiles, out_box=box, mirror=False, batch_size=3)
    half1 = run_tiles(model, read, tiles[::2], out_box=box, mirror=False)
    half2 = run_tiles(model, read, tiles[1::2], out_box=box, mirror=False, batch_size=1)
    np.testing.assert_allclose(half1 + half2, whole, rtol=1e-5, atol=1e-4)
    calls = []
    run_tiles(
        model,
        read,
        tiles,
        out_box=box,
        mirror=False,
        batch_size=4,
        on_batch=lambda d, n: calls.append((d, n)),
    )
    assert calls[-1] == (len(tiles), len(tiles))
    assert len(calls) == -(-len(tiles) // 4)


def test_tile_cache_reuses_tiles_and_keeps_the_answer(tiny_model_3d):
    from napari_scrollseg.engine.predict import TileCache

    model = load_model(tiny_model_3d, folds=(0,), device="cpu")
    volume = blocky_volume((14, 40, 33), seed=14)
    cache = TileCache()
    session = Predictor(model, cache=cache)
    a = ((2, 10), (0, 20), (0, 20))
    b = ((2, 10), (10, 30), (5, 25))  # panned: overlaps a's tiles
    first, _ = predict_region(model, volume, a, cache=cache)
    n_first = len(cache)
    assert n_first == len(model.grid(volume).tiles_intersecting(tuple(slice(*x) for x in a)))
    before = session.forward_passes
    panned, _ = session.predict_region(volume, b)
    run = session.forward_passes - before
    assert cache.hits > 0
    assert (
        run
        == len(cache) - n_first
        < len(model.grid(volume).tiles_intersecting(tuple(slice(*x) for x in b)))
    )
    # the same answer up to float32 summation order
    np.testing.assert_allclose(panned, predict_region(model, volume, b)[0], atol=1e-6)
    np.testing.assert_allclose(first, predict_region(model, volume, a, cache=cache)[0], atol=1e-6)
    # another TTA mode does not reuse mirrored tiles
    before = session.forward_passes
    session.predict_region(volume, a, mirror=False)
    assert session.forward_passes - before == n_first
    small = TileCache(max_bytes=cache.nbytes // 4)
    predict_region(model, volume, b, cache=small)
    assert 0 < small.nbytes <= small.max_bytes
    with pytest.raises(ScrollsegError, match="unknown blend mode"):
        predict_region(model, volume, a, blend="cosine")


def test_half_precision_differs_a_little(tiny_model_3d):
    # forced autocast on CPU (bfloat16): a fast mode, not nnU-Net's numerics; the default
    # on CPU is float32, as nnU-Net (which autocasts on CUDA only)
    model = load_model(tiny_model_3d, folds=(0,), device="cpu")
    assert not model.autocast()
    assert model.autocast(True)
    volume = blocky_volume((14, 40, 33), seed=15)
    box = tuple(slice(0, s) for s in volume.shape)
    full, full_labels = predict_region(model, volume, box)
    np.testing.assert_array_equal(full, predict_region(model, volume, box, half=False)[0])
    half, half_labels = predict_region(model, volume, box, half=True)
    diff = np.abs(full - half).max()
    assert 0 < diff < 0.05
    assert (full_labels == half_labels).mean() > 0.99


def test_predict_region_bad_box(tiny_model_3d):
    model = load_model(tiny_model_3d, folds=(0,), device="cpu")
    volume = blocky_volume((10, 20, 19), seed=12)
    with pytest.raises(ScrollsegError, match="outside the volume"):
        predict_region(model, volume, ((0, 11), (0, 20), (0, 19)))
    with pytest.raises(ScrollsegError, match="3 axes"):
        predict_region(model, volume, ((0, 10), (0, 20)))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_nnunet(tiny_model_3d, ct_case):
    """On a GPU: float32 (``half=False``) equals the CPU answer; the default autocasts
    like nnU-Net on CUDA and is measured against nnU-Net's CUDA answer."""
    import torch

    volume, ref = ct_case
    labels, probs = ref["labels"], ref["probs"]
    box = tuple(slice(0, s) for s in volume.shape)
    cpu, _ = predict_region(load_model(tiny_model_3d, device="cpu"), volume, box)
    gpu_model = load_model(tiny_model_3d, device="cuda")
    assert gpu_model.device.type == "cuda"
    assert gpu_model.autocast()  # the default on CUDA, as nnU-Net
    p32, l32 = predict_region(gpu_model, volume, box, batch_size=8, half=False)
    assert np.abs(p32 - cpu).max() <= TOL
    grid = gpu_model.grid(volume)
    w = weight_sum(grid, box, weight_map(grid.patch))
    stats = equivalence(p32, l32, probs, labels, w)
    assert stats["max_prob_diff_sound"] <= TOL
    g_labels, g_probs, _ = nnunet_predict(tiny_model_3d, volume, folds=(0, 1), device="cuda")
    p16, l16 = predict_region(gpu_model, volume, box)
    half = equivalence(p16, l16, g_probs, g_labels, w)
    print("cuda half vs nnU-Net cuda:", half)  # reported figure, not a bar
    assert half["label_agree_decided_sound"] >= 0.999
    torch.cuda.empty_cache()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_finalize_on_the_device_equals_finalize(device: str) -> None:
    """Division, softmax, argmax and uint8 where the sums are: the labels of the numpy
    finalize, probabilities within one uint8 step (exp differs in the last bits)."""
    import torch

    from napari_scrollseg.engine.predict.tiles import finalize, finalize_torch, finalize_uint8

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(3)
    acc = (rng.normal(size=(3, 20, 24, 28)) * 5).astype(np.float32)
    weights = rng.uniform(0, 2, size=(20, 24, 28)).astype(np.float32)
    weights[:3] = 0  # no tile there
    data = np.ones(weights.shape, bool)
    data[:, :2] = False  # outside the nonzero box
    probs, labels = finalize(acc.copy(), weights, data=data)
    np.testing.assert_array_equal(labels, probs.argmax(0))  # the first maximum, as numpy's
    probs8 = np.rint(probs * 255).astype(np.uint8)
    t = [torch.from_numpy(a).to(device) for a in (acc, weights, data)]
    for fn in (finalize_torch, finalize_uint8):
        p8, lab = fn(*t[:2], data=t[2])
        assert p8.dtype == np.uint8
        assert lab.dtype == np.uint8
        np.testing.assert_array_equal(lab, labels)
        assert np.abs(p8.astype(int) - probs8).max() <= 1
        assert (p8[0, :3] == 255).all()  # background where nothing was predicted
        assert (p8[1:, :, :2] == 0).all()
