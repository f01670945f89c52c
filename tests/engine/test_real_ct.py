"""A reduced run of docs/tutorial-real-ct.md on a real micro-CT scan (cement, from the
``qim3d`` wheel on PyPI, fetched by ``scripts/real_ct.py``): sparse (3 slices) and dense
labels, the same tiny CPU network, Dice per class on a held-out part of the scan.

Floors (see the tutorial for the full-size figures): every class, background included,
must be learned from both label sets; matrix (class 1, nnU-Net's background) above 0.9
and pore above 0.5. Budgets: dense 2 x 16 iterations (pore pseudo Dice 0.8-0.94 after
the first epoch in every run seen), sparse 6 x 16. A sparse run can sit at pore pseudo
Dice 0.0 for its first epochs: once with 2 x 16 it ended there (pore Dice 0.0; the
earlier 2 x 8 budget failed 1 run in 4 the same way), and once with 4 x 16 it only
left it in the fourth epoch. Such a model ranks
pores (mean pore probability 0.26 on pore voxels, 0.10 on matrix) but has not yet
crossed 0.5 anywhere; the sampler drew pore in every patch and the clip windows of the
two label sets agree, so it is too little training, not a fault of the sampler or the
normalisation. Skipped, with the reason, where PyPI cannot be reached.
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
EPOCHS = {"train_truth": 2, "train_sparse": 6}  # x 16 iterations (see above)


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
            iterations=16,
            num_processes=1,
            da_processes=0,
            validate=False,
            plans_overrides={**TINY, "batch_size": 2},
        )
    )
    model = events[-1].model_folder
    window = next(e.message for e in events if "clip window" in e.message)
    out = predict_volume(
        model, cement["test_path"], root / "pred.zarr", mirror=False, bar=False, device="cpu"
    )
    return {"scores": evaluate(out, cement["test_truth"]), "window": window}


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
            assert dice[name] > floor, (name, dice, result["window"])
    assert np.isfinite(dense["scores"]["mean_dice"])
