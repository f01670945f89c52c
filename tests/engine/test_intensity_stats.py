"""The fingerprint's intensity statistics cover every annotated class, background included."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from napari_scrollseg.engine.dataset import export_dataset
    from napari_scrollseg.engine.phantom import make_phantom

    root = tmp_path_factory.mktemp("intensity")
    image, truth = make_phantom((16, 48, 48), seed=2)
    raw = export_dataset(
        [(image, truth)],
        out_dir=root / "raw",
        dataset_id=951,
        name="Dense",
        classes=["air", "papyrus", "ink"],
    )
    return {"raw": raw, "image": np.asarray(image), "truth": np.asarray(truth), "root": root}


def test_clip_window_covers_the_background_class(dense):
    """Stock nnU-Net samples ``seg > 0`` only: with dense labels class 1 (air, nnU-Net's
    background) is left out and the CT window's lower bound lies above most air voxels."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )

    from napari_scrollseg.engine.intensity_stats import annotated_intensity_properties

    image, truth = dense["image"], dense["truth"]
    air = image[truth == 1]
    _, stock = DatasetFingerprintExtractor.collect_foreground_intensities(
        (truth[None] - 1).astype(np.int16), image[None].astype(np.float32)
    )
    stock_lo = stock[0]["percentile_00_5"]
    assert (air < stock_lo).mean() > 0.5  # stock: most air is clipped to one value
    ours = annotated_intensity_properties(dense["raw"])["0"]
    lo, hi = ours["percentile_00_5"], ours["percentile_99_5"]
    assert (air < lo).mean() < 0.02  # now air lies inside the window
    exact = np.percentile(image, (0.5, 99.5))  # dense: every voxel is annotated
    assert lo == pytest.approx(exact[0], abs=2)
    assert hi == pytest.approx(exact[1], abs=2)
    assert ours["mean"] == pytest.approx(image.mean(), rel=0.02)


def test_ignore_and_unlabeled_voxels_are_left_out(tmp_path):
    from napari_scrollseg.engine.dataset import export_dataset
    from napari_scrollseg.engine.intensity_stats import annotated_intensity_properties

    image = np.full((8, 16, 16), 200, np.uint8)
    labels = np.zeros(image.shape, np.uint8)  # unlabeled: not counted
    image[2:4] = 10
    labels[2:4] = 1
    image[5] = 90
    labels[5] = 2
    image[6] = 250
    labels[6] = 255  # ignore: not counted
    raw = export_dataset(
        [(image, labels)], out_dir=tmp_path, dataset_id=952, name="Mixed", classes=["a", "b"]
    )
    props = annotated_intensity_properties(raw)["0"]
    assert (props["min"], props["max"]) == (10, 90)


def test_fix_fingerprint_keeps_nnunets_statistics(dense, tmp_path):
    from napari_scrollseg.engine.intensity_stats import KEY, NNUNET_KEY, fix_fingerprint

    fp = tmp_path / "dataset_fingerprint.json"
    stock = {"0": {"percentile_00_5": 60.0, "percentile_99_5": 170.0}}
    fp.write_text(json.dumps({KEY: stock, "spacings": [[1, 1, 1]]}))
    out = fix_fingerprint(dense["raw"], fp)
    saved = json.loads(fp.read_text())
    assert saved[NNUNET_KEY] == stock == out["nnunet"]
    assert saved[KEY]["0"]["percentile_00_5"] < 60
    assert saved["spacings"] == [[1, 1, 1]]
    fix_fingerprint(dense["raw"], fp)  # again (reused plans): nnU-Net's values stay known
    assert json.loads(fp.read_text())[NNUNET_KEY] == stock
