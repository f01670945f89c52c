"""Predictions speak the annotation's language: class ids 1..K with names and colours,
named probability channels, and the loop predict -> annotations -> correct -> export -> retrain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_scrollseg.engine.errors import ScrollsegError

SHAPE = (16, 64, 64)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from napari_scrollseg.engine.phantom import write_phantom
    from napari_scrollseg.engine.predict_volume import predict_volume

    root = tmp_path_factory.mktemp("loop")
    ph = write_phantom(root / "ph.zarr", SHAPE, seed=5)
    out = predict_volume(
        "phantom-tiny", ph, root / "pred.zarr", mirror=False, chunk=32, bar=False, device="cpu"
    )
    return {"root": root, "phantom": ph, "pred": out}


@pytest.mark.slow
def test_prediction_holds_class_ids_names_and_colours(predicted):
    import zarr

    from napari_scrollseg.engine.omezarr import read_label_metadata

    out = predicted["pred"]
    labels = zarr.open_array(str(out / "labels" / "prediction" / "0"), mode="r")[:]
    truth = zarr.open_array(str(predicted["phantom"] / "labels" / "truth" / "0"), mode="r")[:]
    assert set(np.unique(labels)) <= {1, 2, 3}  # the annotation's ids, never nnU-Net's 0
    assert (labels == truth).mean() > 0.8  # same ids as the truth, no shift
    names, colors = read_label_metadata(out / "labels" / "prediction")
    assert names == {1: "air", 2: "papyrus", 3: "ink"}
    assert set(colors) == {1, 2, 3}
    assert all(len(c) == 4 for c in colors.values())
    omero = json.loads((out / ".zattrs").read_text())["omero"]
    assert [c["label"] for c in omero["channels"]] == ["air", "papyrus", "ink"]


@pytest.mark.slow
def test_prediction_to_annotations_corrected_exported_and_retrained(predicted):
    """The whole loop: a region of the prediction becomes annotations, one slice is
    corrected, the store is exported and a (tiny) model trains on it."""
    import tifffile
    import zarr

    from napari_scrollseg.engine.annotations import AnnotationStore, annotations_from_prediction
    from napari_scrollseg.engine.dataset import export_dataset
    from napari_scrollseg.engine.train import train

    root = predicted["root"]
    truth = zarr.open_array(str(predicted["phantom"] / "labels" / "truth" / "0"), mode="r")[:]
    box = (slice(4, 12), slice(0, 64), slice(0, 48))
    store = annotations_from_prediction(predicted["pred"], root / "ann.zarr", box=box, slab=3)
    assert store.classes.names() == ["air", "papyrus", "ink"]
    pred = zarr.open_array(str(predicted["pred"] / "labels" / "prediction" / "0"), mode="r")[:]
    got = store[:]
    np.testing.assert_array_equal(got[box], pred[box])
    outside = np.ones(SHAPE, bool)
    outside[box] = False
    assert (got[outside] == 0).all()  # outside the box stays unlabeled
    # correct one slice by hand (here: from the truth), as the annotate widget would
    store[8] = truth[8]
    store.save()
    reopened = AnnotationStore.open(root / "ann.zarr")
    np.testing.assert_array_equal(reopened[8], truth[8])
    # a store with other classes is refused
    other = AnnotationStore.create(root / "other.zarr", shape=SHAPE, classes=["a", "b", "c"])
    with pytest.raises(ScrollsegError, match="not the annotation's"):
        annotations_from_prediction(predicted["pred"], other)

    raw = export_dataset(
        [(predicted["phantom"], reopened)],
        out_dir=root / "raw",
        dataset_id=941,
        name="Loop",
        classes=reopened.classes,
    )
    lab = tifffile.imread(next((raw / "labelsTr").glob("*.tif")))
    # the corrected slice went into the dataset as nnU-Net ids (class k -> k-1)
    (case,) = json.loads((raw / "dataset.json").read_text())["scrollseg"]["cases"].values()
    crop = tuple(slice(a, b) for a, b in case["crop"])
    expected = truth[crop].astype(int) - 1
    z = 8 - crop[0].start
    inside = tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(box[1:], crop[1:]))
    np.testing.assert_array_equal(lab[z][inside], expected[z][inside])
    events = list(
        train(
            raw,
            results_dir=root / "results",
            folds=("all",),
            device="cpu",
            epochs=1,
            iterations=2,
            num_processes=1,
            da_processes=0,
            validate=False,
            plans_overrides={
                "n_stages": 3,
                "features_per_stage": [4, 8, 16],
                "patch_size": [8, 32, 32],
                "batch_size": 2,
            },
        )
    )
    done = events[-1]
    assert done.kind == "done"
    assert (done.model_folder / "fold_all" / "checkpoint_final.pth").is_file()
