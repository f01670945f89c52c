"""Training through the engine: sampler, events, cancel, resume, curves, stock nnU-Net interop.

One real (tiny) nnU-Net training on CPU is shared by the module: it is cancelled
after its first epoch, then resumed to the end. Everything else reads its outputs.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from napari_scrollseg.engine.demo import tiny_network
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.nnunet_trainers.sampling import random_patch_keys, sparse_bbox

TINY = tiny_network()


# -- the sampler ----------------------------------------------------------------------------
def test_sparse_bbox_puts_the_annotated_voxel_anywhere_in_the_patch():
    rng = np.random.default_rng(0)
    shape, patch = (40, 80, 80), (16, 32, 32)
    lbs = [0, 0, 0]
    for voxel in [(20, 40, 40), (0, 0, 79), (39, 5, 70)]:
        rel = []
        for _ in range(3000):
            lo, hi = sparse_bbox(voxel, shape, patch, patch, lbs, rng)
            assert [h - lo_ for lo_, h in zip(lo, hi)] == list(patch)
            for v, a, b in zip(voxel, lo, hi):
                assert a <= v < b, (voxel, lo, hi)  # always inside the patch
            rel.append([v - a for v, a in zip(voxel, lo)])
        rel = np.array(rel)
        centre = np.all(rel == np.array(patch) // 2, axis=1).mean()
        assert centre < 0.05  # stock nnU-Net: always exactly the centre (1.0)
        if voxel == (20, 40, 40):  # far from borders: every in-patch position occurs
            for axis, p in enumerate(patch):
                assert set(rel[:, axis]) == set(range(p))


def test_sparse_bbox_keeps_the_centre_inside_small_images():
    rng = np.random.default_rng(1)
    # image smaller than the patch: nnU-Net pads (lower bound below zero)
    shape, patch, lbs = (10, 20, 20), (16, 32, 32), [-3, -6, -6]
    for _ in range(500):
        voxel = rng.integers(0, shape)
        lo, hi = sparse_bbox(voxel, shape, patch, patch, lbs, rng)
        assert all(a >= lb for a, lb in zip(lo, lbs))
        assert all(a <= v < b for v, a, b in zip(voxel, lo, hi))


def _anchor_labels(
    tmp_path, sparse: bool, force_fg: bool, n: int = 2000, sampling: str = "balanced"
) -> dict:
    """Labels of the anchor voxels that our loader (and stock nnU-Net's) pick on one case
    saved as nnU-Net preprocesses it (blosc2 files, nnU-Net's own location sampling).

    Papyrus (1) fills the annotated slices but for an 8 x 8 corner of background (0)
    and a 6 x 6 ink (2) square: background is 1.6 % of the annotated voxels. Sparse:
    three annotated z-slices, the rest ignore (3). A 1-voxel patch is its own anchor.
    """
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from napari_scrollseg.nnunet_trainers.sparse import SparseDataLoader

    tmp_path.mkdir(parents=True, exist_ok=True)
    labels = {"background": 0, "papyrus": 1, "ink": 2} | ({"ignore": 3} if sparse else {})
    lm = LabelManager(labels, None)
    seg = np.full((1, 16, 64, 64), 3 if sparse else 1, np.int8)
    for z in (2, 8, 13) if sparse else range(16):
        seg[0, z] = 1
        seg[0, z, :8, :8] = 0
        seg[0, z, 30:36, 30:36] = 2
    wanted = [*lm.foreground_labels] + ([[-1, *lm.all_labels]] if sparse else [])
    props = {"class_locations": DefaultPreprocessor._sample_foreground_locations(seg, wanted)}
    data = np.random.default_rng(0).normal(size=seg.shape).astype(np.float32)
    blocks = dict(chunks=(1, 16, 64, 64), blocks=(1, 8, 32, 32))
    nnUNetDatasetBlosc2.save_case(
        data,
        seg,
        props,
        str(tmp_path / "case_000"),
        **blocks,
        chunks_seg=(1, 16, 64, 64),
        blocks_seg=(1, 8, 32, 32),
    )
    ds = nnUNetDatasetBlosc2(str(tmp_path))
    np.random.seed(0)
    out = {}
    ours = functools.partial(SparseDataLoader, sampling=sampling)
    for name, cls in (("stock", nnUNetDataLoader), ("ours", ours)):
        dl = cls(ds, 2, (1, 1, 1), (1, 1, 1), lm, oversample_foreground_percent=0.0)
        _, _, _, case = dl._data.load_case("case_000")
        got = [
            seg[0][tuple(dl.get_bbox(seg.shape[1:], force_fg, case["class_locations"])[0])]
            for _ in range(n)
        ]
        out[name] = {v: float(np.mean(np.array(got) == v)) for v in range(4)}
    return out


def test_sparse_sampler_anchors_on_background_as_on_any_other_class(tmp_path):
    """Sparse labels: background (nnU-Net's label 0, e.g. air far from a scroll) is one of
    the four equally likely anchors (background, papyrus, ink, any annotated voxel).
    Stock nnU-Net only anchors on any annotated voxel, so on background at its share."""
    got = _anchor_labels(tmp_path, sparse=True, force_fg=False)
    print(got)
    share = 64 / (64 * 64)  # background among the annotated voxels
    assert got["stock"][0] < 3 * share  # ~1.6 %: background is rarely under a patch
    assert 0.21 < got["ours"][0] < 0.30  # 1/4 + share/4
    assert 0.21 < got["ours"][2] < 0.30  # ink as before: 1/4 + its share/4
    assert got["ours"][3] == 0  # never on an ignore voxel


def test_nnunet_sampling_keeps_nnunet_foreground_shares(tmp_path):
    """``sampling="nnunet"``: a random patch anchors on any annotated voxel or on annotated
    background, never on a chosen class, so a rare class (ink) is anchored on at nnU-Net's
    rate (its forced-foreground patches): half as often as with "balanced" (1 in 6 instead
    of 1 in 3 with one patch in three forced), and the model over-predicts it less."""
    got = _anchor_labels(tmp_path, sparse=True, force_fg=False, sampling="nnunet")
    print(got)
    ink = 36 / (64 * 64)  # ink among the annotated voxels
    assert got["ours"][2] < 3 * ink  # ~0.4 %, as stock nnU-Net's random patches
    assert abs(got["ours"][2] - got["stock"][2]) < 0.02
    assert 0.45 < got["ours"][0] < 0.56  # background key: 1/2 + its share/2
    assert got["ours"][3] == 0  # never on an ignore voxel
    forced = _anchor_labels(tmp_path / "forced", sparse=True, force_fg=True, sampling="nnunet")
    assert 0.4 < forced["ours"][2] < 0.6  # forced patches as nnU-Net: papyrus or ink
    with pytest.raises(ValueError, match="unknown sampling"):
        random_patch_keys([None], "rare-first", (1, 2))


def test_sampler_keeps_nnunet_semantics_for_forced_and_dense_patches(tmp_path):
    """Forced-foreground patches never anchor on background; dense labels get no
    background key (their random patches are mostly background already)."""
    forced = _anchor_labels(tmp_path / "forced", sparse=True, force_fg=True)
    assert forced["ours"][0] == forced["ours"][3] == 0
    assert 0.4 < forced["ours"][2] < 0.6  # papyrus or ink, as nnU-Net
    dense = _anchor_labels(tmp_path / "dense", sparse=False, force_fg=False, n=1500)
    # a third each: papyrus, ink, a random patch (background at its share of the image)
    assert 0.28 < dense["ours"][2] < 0.40
    assert dense["ours"][0] < 0.05


# -- one real training, cancelled then resumed ----------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from napari_scrollseg.engine.dataset import export_dataset
    from napari_scrollseg.engine.demo import sparse_slices
    from napari_scrollseg.engine.phantom import make_phantom
    from napari_scrollseg.engine.train import train

    root = tmp_path_factory.mktemp("train")
    cases = []
    for seed in range(3):
        image, truth = make_phantom((16, 48, 48), seed=seed)
        cases.append((image, sparse_slices(truth, n_slices=3)))
    raw = export_dataset(
        cases, out_dir=root / "raw", dataset_id=901, name="Tiny", classes=["air", "papyrus", "ink"]
    )
    options = dict(
        results_dir=root / "results",
        device="cpu",
        epochs=2,
        iterations=2,
        num_processes=1,
        da_processes=0,
        plans_overrides=TINY,
    )
    first = []
    gen = train(raw, **options)
    for ev in gen:
        first.append(ev)
        if ev.kind == "epoch":
            break
    t0 = time.perf_counter()
    gen.close()  # cancel
    cancel_seconds = time.perf_counter() - t0
    model = first[-1].model_folder
    latest = model / "fold_0" / "checkpoint_latest.pth"
    after_cancel = {
        "latest": latest.is_file(),
        "final": (model / "fold_0" / "checkpoint_final.pth").is_file(),
    }
    second = list(train(raw, resume=True, **options))
    return {
        "raw": raw,
        "first": first,
        "second": second,
        "cancel_seconds": cancel_seconds,
        "after_cancel": after_cancel,
        "model": model,
        "root": root,
        "options": options,
    }


@pytest.mark.slow
def test_events_arrive_per_epoch(run):
    first = run["first"]
    assert [e.kind for e in first if e.kind == "epoch"] == ["epoch"]
    ep = first[-1]
    assert (ep.fold, ep.epoch, ep.epochs) == (0, 0, 2)
    assert np.isfinite([ep.train_loss, ep.val_loss]).all()
    assert ep.epoch_time > 0
    assert list(ep.pseudo_dice) == ["air", "papyrus", "ink"]  # class 1 (nnU-Net background) too
    assert all(0 <= d <= 1 for d in ep.pseudo_dice.values())
    assert "epoch 1/2" in str(ep)


@pytest.mark.slow
def test_cancel_stops_promptly_and_leaves_a_resumable_checkpoint(run):
    assert run["cancel_seconds"] < 60
    assert run["after_cancel"] == {"latest": True, "final": False}


@pytest.mark.slow
def test_resume_continues_from_latest(run):
    second = run["second"]
    kinds = [e.kind for e in second]
    assert "resumed" in kinds
    resumed = next(e for e in second if e.kind == "resumed")
    assert resumed.epoch == 1  # the cancelled epoch 1 is redone, epoch 0 is not
    assert [e.epoch for e in second if e.kind == "epoch"] == [1]
    assert kinds[-2:] == ["fold_done", "done"]
    fold_done = second[-2]  # carries the fold's validation Dice per class
    assert fold_done.model_folder == run["model"]
    assert set(fold_done.dice) == {"air", "papyrus", "ink"}  # every class, background too
    assert all(0 <= v <= 1 for v in fold_done.dice.values())


@pytest.mark.slow
def test_model_folder_is_stock_with_curves_and_dice(run):
    import torch

    model = run["model"]
    done = run["second"][-1]
    assert done.model_folder == model
    assert model.name == "nnUNetTrainer__nnUNetPlansScrollseg__3d_fullres"
    assert not list(model.parent.glob("nnUNetTrainerSparse*"))  # no stray folder
    ck = torch.load(
        model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    assert ck["trainer_name"] == "nnUNetTrainer"
    assert ck["current_epoch"] == 2
    rows = (model / "progress.csv").read_text().splitlines()
    assert rows[0].startswith("fold,epoch,train_loss,val_loss")
    assert rows[0].endswith("dice_air,dice_papyrus,dice_ink")
    assert [r.split(",")[1] for r in rows[1:]] == ["0", "1"]
    assert (model / "progress.png").stat().st_size > 1000
    summary = json.loads((model / "dice_summary.json").read_text())
    assert list(summary["per_class"]) == ["air", "papyrus", "ink"] == list(done.dice)
    assert 0 < summary["per_class"]["air"] <= 1  # the background class is validated too
    assert (summary["folds"], summary["cases"]) == (["0"], 1)
    assert 0 <= summary["per_class"]["papyrus"] <= 1


@pytest.mark.slow
def test_model_predicts_in_stock_nnunet_without_scrollseg(run, tmp_path):
    """nnUNetPredictor in a Python where napari_scrollseg cannot be imported."""
    import tifffile

    image = next((run["raw"] / "imagesTr").glob("*_0000.tif"))
    site = sysconfig.get_paths()["purelib"]
    script = f"""
import sys
sys.path.append({site!r})  # site-packages without its .pth files (the editable install)
try:
    import napari_scrollseg.nnunet_trainers
except ImportError:
    pass
else:
    raise SystemExit("napari_scrollseg is importable here")
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                    allow_tqdm=False)
p.initialize_from_trained_model_folder({str(run["model"])!r}, use_folds=(0,))
p.predict_from_files([[{str(image)!r}]], [{str(tmp_path / "pred")!r}],
                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
print("trainer", type(p.trainer_name) if hasattr(p, "trainer_name") else "", p.network.__class__.__name__)
"""
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = tifffile.imread(tmp_path / "pred.tif")
    assert pred.shape == tifffile.imread(image).shape
    assert set(np.unique(pred)) <= {0, 1, 2}
    # scrollseg really was absent there
    check = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path.append({site!r}); import napari_scrollseg.engine",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},  # no PYTHONPATH to src/ either
    )
    assert check.returncode != 0
    assert "No module named 'napari_scrollseg" in check.stderr


# -- cheap checks ---------------------------------------------------------------------------
def test_sparse_slices_and_dice():
    from napari_scrollseg.engine.demo import dice_per_class, sparse_slices

    truth = np.ones((10, 4, 4), np.uint8)
    truth[:, :2] = 2
    labels = sparse_slices(truth, n_slices=3)
    painted = np.flatnonzero(labels.any(axis=(1, 2)))
    assert len(painted) == 3
    assert {0, 9}.isdisjoint(painted)  # evenly inside, not the end slices
    np.testing.assert_array_equal(labels[painted], truth[painted])
    assert (labels[np.setdiff1d(np.arange(10), painted)] == 0).all()
    with pytest.raises(ScrollsegError, match="n_slices"):
        sparse_slices(truth, n_slices=11)
    pred = truth.copy()
    pred[0, 0, 0] = 1  # one papyrus voxel called air
    dice = dice_per_class(pred, truth, {"air": 1, "papyrus": 2})
    assert dice["papyrus"] == pytest.approx(2 * 79 / (79 + 80))
    assert dice["air"] == pytest.approx(2 * 80 / (81 + 80))


def test_train_rejects_a_folder_that_is_not_a_dataset(tmp_path):
    from napari_scrollseg.engine.train import train

    with pytest.raises(ScrollsegError, match="Dataset<ID>_<Name>"):
        next(train(tmp_path, results_dir=tmp_path / "r"))
    with pytest.raises(ScrollsegError, match="epochs must be at least 1"):
        next(train(tmp_path, results_dir=tmp_path / "r", epochs=0))


@pytest.mark.slow
def test_plans_overrides_check_the_patch(run):
    from napari_scrollseg.engine.train import apply_plans_overrides

    pre = run["root"] / "results" / "nnUNet_preprocessed" / run["raw"].name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    out = apply_plans_overrides(plans, "3d_fullres", TINY, "X")
    arch = out["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert (arch["n_stages"], len(arch["strides"])) == (3, 3)
    assert len(arch["n_conv_per_stage_decoder"]) == 2
    with pytest.raises(ScrollsegError, match="n_stages must be 3"):
        apply_plans_overrides(plans, "3d_fullres", {"n_stages": 2}, "X")
    with pytest.raises(ScrollsegError, match="divisible"):
        apply_plans_overrides(plans, "3d_fullres", {"patch_size": [15, 32, 32]}, "X")
    with pytest.raises(ScrollsegError, match="unknown plans override"):
        apply_plans_overrides(plans, "3d_fullres", {"features": [1]}, "X")


def test_dice_summary_pools_over_cases_and_folds(tmp_path):
    from napari_scrollseg.engine.train import dice_summary

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    for fold, (tp, fp, fn) in {0: (10, 0, 0), 1: (0, 5, 5)}.items():
        d = tmp_path / f"fold_{fold}" / "validation"
        d.mkdir(parents=True)
        case = {"metrics": {"1": {"TP": tp, "FP": fp, "FN": fn, "Dice": 0.0}}}
        d.joinpath("summary.json").write_text(json.dumps({"metric_per_case": [case]}))
    out = dice_summary(tmp_path)
    assert out["per_class"] == {"a": pytest.approx(20 / 30)}  # pooled, not mean of 1.0 and 0.0
    assert out["folds"] == ["0", "1"]
    assert json.loads((tmp_path / "dice_summary.json").read_text())["cases"] == 2


@pytest.mark.slow
def test_sparse_loader_samples_real_preprocessed_cases(run):
    """The trainer's data loader on the real preprocessed data: annotated voxel in,
    off-centre, and the rare class under the patch far more often than stock nnU-Net."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from napari_scrollseg.nnunet_trainers.sparse import SparseDataLoader

    pre = run["root"] / "results" / "nnUNet_preprocessed" / run["raw"].name
    pm = PlansManager(str(pre / "nnUNetPlansScrollseg.json"))
    lm = pm.get_label_manager(json.loads((pre / "dataset.json").read_text()))
    folder = str(pre / "nnUNetPlans_3d_fullres")
    ds = infer_dataset_class(folder)(folder)
    patch = (4, 8, 8)  # small against the case, so that which voxels it holds matters
    rare = max(lm.foreground_labels)  # ink: the rarest class
    cases = [ds.load_case(i) for i in ds.identifiers]
    data, _, _, props = max(cases, key=lambda c: len(c[3]["class_locations"][rare]))
    shape = data.shape[1:]
    locations = props["class_locations"]
    annotated = {tuple(v[1:]) for v in locations[(-1, *lm.all_labels)]}
    rare_voxels = [tuple(v[1:]) for v in locations[rare]]
    assert 0 < len(rare_voxels) < len(annotated) / 20

    def sample(loader_class) -> tuple[float, float]:
        """Fractions of random (not forced-foreground) patches centred on an annotated
        voxel, and holding an annotated voxel of the rare class."""
        dl = loader_class(ds, 2, patch, patch, lm, oversample_foreground_percent=0.0)
        assert dl.has_ignore
        centred = with_rare = 0
        for _ in range(300):
            lo, hi = dl.get_bbox(shape, False, locations)
            inside = [v for v in annotated if all(a <= c < b for c, a, b in zip(v, lo, hi))]
            assert inside
            centre = tuple(a + p // 2 for a, p in zip(lo, patch))
            centred += centre in annotated
            with_rare += any(all(a <= c < b for c, a, b in zip(v, lo, hi)) for v in rare_voxels)
        return centred / 300, with_rare / 300

    stock, ours = sample(nnUNetDataLoader), sample(SparseDataLoader)
    print(f"centred, holding the rare class: stock {stock}, sparse-aware {ours}")
    assert stock[0] == 1.0  # stock: always on an annotated voxel
    assert ours[0] < 0.8  # ours: off-centre
    assert ours[1] >= 0.3  # the rare class is one of the equally likely anchors
    assert ours[1] > stock[1] + 0.1


def test_builtin_model_is_listed_and_complete(capsys):
    from napari_scrollseg.cli import main
    from napari_scrollseg.engine.builtin import builtin_model, builtin_models

    path = builtin_model()
    assert path == builtin_models()["phantom-tiny"]
    for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
        assert (path / name).is_file()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 5e6
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == ["phantom-tiny", str(path)]
    with pytest.raises(ScrollsegError, match="no built-in model named 'nope'"):
        builtin_model("nope")


@pytest.mark.slow
def test_train_command_line(run, tmp_path):
    """``scrollseg train`` trains a fold, prints its epochs and the model folder; bad
    options are one ``error:`` line and exit 2."""
    cli = [sys.executable, "-m", "napari_scrollseg.cli", "train", str(run["raw"])]
    common = ["--out", str(tmp_path / "results"), "--device", "cpu", "-np", "1"]
    common += ["--epochs", "1", "--iterations", "2", "--da-processes", "0", "--fold", "all"]
    proc = subprocess.run(
        [*cli, *common, "--no-validate", "--seed", "5", "--plans-overrides", json.dumps(TINY)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1/1" in proc.stdout + proc.stderr
    assert "2 iterations, seed 5" in proc.stdout + proc.stderr
    models = list((tmp_path / "results").glob("Dataset901_Tiny/nnUNetTrainer__*__3d_fullres"))
    assert len(models) == 1
    assert (models[0] / "fold_all" / "checkpoint_final.pth").is_file()
    assert str(models[0]) in proc.stdout + proc.stderr
    assert not (models[0] / "fold_all" / "validation").exists()  # --no-validate
    assert "\r" not in proc.stdout + proc.stderr  # a pipe gets plain lines, not a \r bar
    bad = subprocess.run(
        [*cli, *common, "--plans-overrides", "{n_stages: 3"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --plans-overrides is not valid JSON")
    assert len(bad.stderr.strip().splitlines()) == 1


def _fake_raw(tmp_path, n_cases: int):
    raw = tmp_path / "Dataset905_Few"
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"background": 0, "a": 1},
                "channel_names": {"0": "CT"},
                "file_ending": ".tif",
            }
        )
    )
    for i in range(n_cases):
        (raw / "labelsTr" / f"Few_{i:03d}.tif").write_bytes(b"")
    return raw


def test_folds_are_checked_before_any_work(tmp_path):
    """One case: fold 'all' is chosen and said first; a fold the cases cannot give is
    refused before planning starts."""
    from napari_scrollseg.engine.train import train

    gen = train(_fake_raw(tmp_path, 1), results_dir=tmp_path / "r", folds=(0,))
    first = next(gen)
    gen.close()
    assert first.kind == "step"
    assert "fold 'all'" in first.message
    assert not (tmp_path / "r").exists()  # nothing planned yet
    with pytest.raises(ScrollsegError, match=r"3 cases give folds 0\.\.2"):
        next(train(_fake_raw(tmp_path / "b", 3), results_dir=tmp_path / "r", folds=(3,)))
    assert not (tmp_path / "r").exists()


def test_failure_messages_say_what_happened(tmp_path):
    from napari_scrollseg.engine.train import OOM_HINT, _failure

    log = tmp_path / "fold0.log"
    for line in (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes",
        "MemoryError",
    ):
        message = _failure("training fold 0", 1, ["Traceback", line], log, resumable=True)
        assert message.startswith(f"training fold 0 failed: {OOM_HINT}"), message
        assert "Resume" in message
        assert str(log) in message
    message = _failure("training fold 0", -9, ["epoch 3"], log, resumable=True)
    assert message.startswith("training fold 0 was killed (SIGKILL: by hand, or by the system")
    message = _failure("nnU-Net planning", 1, ["  File x", "ValueError: bad labels"], log, False)
    assert (
        message
        == f"nnU-Net planning failed (exit 1): ValueError: bad labels -- full output in {log}"
    )


@pytest.mark.slow
def test_fine_tuning_starts_from_every_weight_of_the_pretrained_model(run, tmp_path):
    """pretrained_weights loads the whole network, segmentation heads included (same
    classes): with a vanishing learning rate one step leaves every weight as it was."""
    import torch

    from napari_scrollseg.engine.train import train

    start = run["model"] / "fold_0" / "checkpoint_final.pth"
    events = list(
        train(
            run["raw"],
            results_dir=tmp_path / "results",
            preprocessed_dir=run["root"] / "results" / "nnUNet_preprocessed",
            device="cpu",
            epochs=1,
            iterations=1,
            num_processes=1,
            da_processes=0,
            plans_overrides=TINY,
            validate=False,
            pretrained_weights=start,
            learning_rate=1e-12,
        )
    )
    assert any("fine-tuning from" in e.message and "with its" in e.message for e in events)
    assert events[-1].kind == "done"
    old = torch.load(start, map_location="cpu", weights_only=False)["network_weights"]
    ck = events[-1].model_folder / "fold_0" / "checkpoint_final.pth"
    new = torch.load(ck, map_location="cpu", weights_only=False)["network_weights"]
    assert any(".seg_layers." in k for k in new)
    assert set(new) == set(old)
    for k in old:
        if old[k].is_floating_point():  # not the norms' step counters
            assert torch.allclose(new[k], old[k], atol=1e-6), k


def test_pretrained_weights_are_checked_before_any_work(tmp_path):
    from napari_scrollseg.engine.train import train

    with pytest.raises(ScrollsegError, match=r"pretrained weights .* not found"):
        next(train(tmp_path, results_dir=tmp_path / "r", pretrained_weights=tmp_path / "x.pth"))
    ck = tmp_path / "c.pth"
    ck.write_bytes(b"")
    with pytest.raises(ScrollsegError, match="not with pretrained weights"):
        next(train(tmp_path, results_dir=tmp_path / "r", pretrained_weights=ck, resume=True))
    with pytest.raises(ScrollsegError, match="learning_rate must be above 0"):
        next(train(tmp_path, results_dir=tmp_path / "r", learning_rate=0))


@pytest.mark.slow
def test_nnunet_sampling_reaches_the_trainer(run, tmp_path):
    """``train(sampling="nnunet")`` reaches the trainer's loader: the checkpoint records it
    (one epoch of one iteration on the module's dataset)."""
    import torch

    from napari_scrollseg.engine.train import train

    with pytest.raises(ScrollsegError, match="unknown sampling"):
        next(train(run["raw"], results_dir=tmp_path, sampling="rare-first"))
    options = {**run["options"], "results_dir": tmp_path / "results", "epochs": 1, "iterations": 1}
    events = list(train(run["raw"], **options, validate=False, sampling="nnunet"))
    model = events[-1].model_folder
    ck = torch.load(
        model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    assert ck["scrollseg"]["sampling"].endswith("; nnunet")
    default = torch.load(
        run["model"] / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    assert default["scrollseg"]["sampling"].endswith("; balanced")


@pytest.mark.slow
def test_a_class_left_unlearned_is_reported_at_the_fold_end(run, tmp_path):
    """The fold's end names every class whose last-epoch pseudo Dice is below
    ``UNLEARNED_DICE`` (what a healthy-looking loss hides), and no other."""
    import csv
    import shutil

    from napari_scrollseg.engine.train import (
        UNLEARNED_DICE,
        _unlearned_warning,
        dice_summary,
        unlearned_classes,
    )

    text = (run["model"] / "fold_0" / "progress.csv").read_text()
    last = list(csv.DictReader(text.splitlines()))[-1]
    low = {k[5:] for k, v in last.items() if k.startswith("dice_") and float(v) < UNLEARNED_DICE}
    validation = dice_summary(run["model"], folds=[0])["per_class"]
    low_val = {k for k, v in validation.items() if v < UNLEARNED_DICE}  # NaN: not held out
    fold_done = run["second"][-2]
    assert set(unlearned_classes(run["model"], 0)) == low
    assert bool(fold_done.warning) == bool(low | low_val)
    for name in ("air", "papyrus", "ink"):
        assert (f"{name} (pseudo Dice" in fold_done.warning) == (name in low)
        assert (f"validation Dice {validation.get(name, -1):.3f}" in fold_done.warning) == (
            name in low_val
        )
    # a class learned in the epochs' pseudo Dice but not on the held-out cases is said too
    fine = {"air": 0.9, "papyrus": 0.02, "ink": float("nan")}
    empty = tmp_path / "no-progress"
    (empty / "fold_0").mkdir(parents=True)
    assert _unlearned_warning(empty, 0, fine) == (
        "fold 0 has not learned papyrus (validation Dice 0.020) by its last epoch: the model "
        "predicts almost none of it. Train longer (more epochs) or annotate more of it"
    )
    assert _unlearned_warning(empty, 0, {"air": 0.9}) == ""
    # the same run, had its last epoch never predicted ink
    copy = tmp_path / run["model"].name
    shutil.copytree(run["model"], copy)
    rows = list(csv.reader(text.splitlines()))
    rows[-1][-1] = "0.0"  # dice_ink
    with open(copy / "fold_0" / "progress.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    expected = {**{k: float(last[f"dice_{k}"]) for k in low}, "ink": 0.0}
    assert unlearned_classes(copy, 0) == expected
    assert unlearned_classes(copy, 1) == {}  # no such fold


@pytest.mark.slow
def test_other_plans_under_a_trained_models_name_are_refused(run):
    """Another network under the plans name of a trained model would mix it into that
    model's folder (its checkpoints, a resume): refused, with what differs."""
    from napari_scrollseg.engine.errors import ScrollsegError
    from napari_scrollseg.engine.train import plan_and_preprocess

    options = {"results_dir": run["options"]["results_dir"], "num_processes": 1}
    same = list(plan_and_preprocess(run["raw"], plans_overrides=TINY, **options))
    assert same[-1].plans == run["model"].name.split("__")[1]
    bigger = {**TINY, "batch_size": TINY["batch_size"] + 1}
    with pytest.raises(ScrollsegError, match=r"trained with other 3d_fullres plans .*batch_size"):
        list(plan_and_preprocess(run["raw"], plans_overrides=bigger, **options))
    renamed = list(
        plan_and_preprocess(run["raw"], plans_overrides=bigger, plans_name="Bigger", **options)
    )
    assert renamed[-1].plans == "Bigger"


@pytest.mark.slow
def test_a_seed_makes_a_training_repeatable(run, tmp_path):
    """Two trainings with one seed (augmentation in the training process) give the same
    losses and weights; another seed does not."""
    import torch

    from napari_scrollseg.engine.train import read_progress, train

    options = {**run["options"], "epochs": 1, "iterations": 2, "validate": False}
    options["preprocessed_dir"] = run["root"] / "results" / "nnUNet_preprocessed"
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        events = list(train(run["raw"], **{**options, "results_dir": tmp_path / name}, seed=seed))
        model = events[-1].model_folder
        weights = torch.load(
            model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
        )["network_weights"]
        runs[name] = (read_progress(model)[0], weights)
    (a, wa), (b, wb), (c, wc) = runs["a"], runs["b"], runs["c"]
    assert (a["train_loss"], a["val_loss"]) == (b["train_loss"], b["val_loss"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["train_loss"] != c["train_loss"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
