"""A reduced run of docs/tutorial-real-ct.md on a real micro-CT scan (cement, from the
``qim3d`` wheel on PyPI, fetched by ``scripts/real_ct.py``): sparse (3 slices) and dense
labels, the same tiny CPU network, Dice per class on a held-out part of the scan.

Floors (see the tutorial for the full-size figures): every class, background included,
must be learned from both label sets; matrix (class 1, nnU-Net's background) above 0.9
and pore above 0.5. A rare class sits at pseudo Dice 0.0 until a jump, whose iteration
varies from run to run. Here, unseeded: dense 4 x 16 iterations, 7 of 10 runs jumped in
the first epoch, 3 in the second or third; dense 4 x 32, 4 of 6 in the first, one in
the third, one only in the fourth and last; sparse 6 x 16, one of 4 in the fifth; sparse
6 x 32, 5 of 7 in the first, 2 in the second. CI saw held-out pore Dice 0.0 once with
dense 2 x 16 and once with dense 4 x 16. Before the jump the model ranks pores (mean
pore probability 0.26 on pore voxels, 0.10 on matrix) but has crossed 0.5 nowhere: too
little training, not a fault of the sampler or the normalisation, and the fold's end
says so (``TrainEvent.warning``). So the trainings are seeded (``SEED``: both jumped in
their first epoch here, and two runs with one seed gave the same losses to the last
digit) and their budgets leave room for another machine's rounding: dense 6 x 32,
sparse 8 x 32. Skipped, with the reason, where PyPI cannot be reached.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOORS = {"matrix": 0.9, "pore": 0.5}
CROP = (slice(None), slice(0, 64), slice(0, 64))  # reduced: a quarter of each slice
TINY = {"n_stages": 3, "features_per_stage": [4, 8, 16], "patch_size": [16, 32, 32]}
EPOCHS = {"train_truth": 6, "train_sparse": 8}  # x ITERATIONS (see above)
ITERATIONS = 32
SEED = 0


@pytest.fixture(scope="module")
def cement(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import tifffile

    root = tmp_path_factory.mktemp("real_ct")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "real_ct.py"), str(root)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the real CT scan could not be fetched from PyPI (qim3d wheel): {reason}")
    parts = {}
    for name in ("train", "train_truth", "train_sparse", "test", "test_truth"):
        parts[name] = tifffile.imread(root / f"{name}.tif")[CROP]
    parts["test_path"] = root / "test_crop.tif"
    tifffile.imwrite(parts["test_path"], parts["test"], photometric="minisblack")
    return {"root": root, **parts}


def _train_and_score(cement: dict, labels: str, dataset_id: int) -> dict:
    from napari_scrollseg.engine.dataset import export_dataset
    from napari_scrollseg.engine.evaluate import evaluate
    from napari_scrollseg.engine.predict_volume import predict_volume
    from napari_scrollseg.engine.train import train

    root = cement["root"] / labels
    raw = export_dataset(
        [(cement["train"], cement[labels])],
        out_dir=root / "raw",
        dataset_id=dataset_id,
        name=labels.replace("_", "-"),
        classes=["matrix", "pore"],
    )
    events = list(
        train(
            raw,
            results_dir=root / "results",
            folds=("all",),
            device="cpu",
            epochs=EPOCHS[labels],
            iterations=ITERATIONS,
            seed=SEED,
            num_processes=1,
            da_processes=0,
            validate=False,
            plans_overrides={**TINY, "batch_size": 2},
        )
    )
    model = events[-1].model_folder
    window = next(e.message for e in events if "clip window" in e.message)
    warnings = [e.warning for e in events if e.warning]
    out = predict_volume(
        model, cement["test_path"], root / "pred.zarr", mirror=False, bar=False, device="cpu"
    )
    return {"scores": evaluate(out, cement["test_truth"]), "window": window, "warnings": warnings}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two plannings and trainings: minutes on 2 shared cores
def test_every_class_is_learned_from_sparse_and_dense_labels(cement):
    dense = _train_and_score(cement, "train_truth", 981)
    sparse = _train_and_score(cement, "train_sparse", 982)
    # dense labels: nnU-Net's own statistics would leave class 1 (matrix) out of the window
    assert "foreground-only window" in dense["window"]
    for result in (dense, sparse):
        dice = {k: v["dice"] for k, v in result["scores"]["per_class"].items()}
        print("held-out Dice:", dice, result["window"])
        assert set(dice) == set(FLOORS)
        for name, floor in FLOORS.items():
            assert dice[name] > floor, (name, dice, result["window"], result["warnings"])
    assert np.isfinite(dense["scores"]["mean_dice"])


def test_fibre_truth_finds_the_tow_direction_and_the_void(monkeypatch):
    """scripts/real_ct.py's fibre truth on a synthetic laminate: fibres along z above
    y = 20, at 135 degrees in the z-x plane below, dark pockets as void."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_ct", ROOT / "scripts" / "real_ct.py")
    real_ct = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "real_ct", real_ct)  # for its dataclass
    spec.loader.exec_module(real_ct)
    z, y, x = np.mgrid[0:48, 0:40, 0:48].astype(np.float32)
    across_z = np.hypot((x % 6) - 3, (y % 6) - 3)  # fibres along z
    across_diag = np.hypot(((z + x) / np.sqrt(2)) % 6 - 3, (y % 6) - 3)  # along (-1, 0, 1)
    fibre = np.where(y < 20, across_z, across_diag) < 2
    scan = np.where(fibre, 165.0, 125.0)
    pockets = [(24, 8, 24), (24, 32, 24), (10, 10, 36)]
    for c in pockets:
        scan[np.hypot(np.hypot(z - c[0], y - c[1]), x - c[2]) < 3] = 40
    truth = real_ct.make_fibers_truth(scan.astype(np.uint8))
    for c in pockets:
        assert truth[c] == 1
    inner = (slice(8, 40), slice(None), slice(8, 40))
    upper, lower = truth[inner][:, 4:16], truth[inner][:, 26:36]
    assert (upper == 2).mean() > 0.8
    assert not (upper == 3).any()
    assert (lower == 3).mean() > 0.8
    assert not (lower == 2).any()
    assert (truth[:, 19:21] == 255).mean() > 0.5  # where the plies meet: unsure
