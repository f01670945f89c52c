"""Input and model fingerprints; a resume on a changed input or model is refused (issue 13, 3)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.fingerprint import (
    check_resume_fingerprints,
    differences,
    input_fingerprint,
    model_fingerprint,
)
from napari_scrollseg.engine.omezarr import write_image
from napari_scrollseg.engine.volumes import open_volume
from tests.engine.conftest import blocky_volume

SHAPE = (16, 40, 40)


def _scan(path: Path, seed: int = 1) -> Path:
    write_image(path, blocky_volume(SHAPE, seed=seed), spacing=(1.0, 1.0, 1.0), chunks=(8, 16, 16))
    return path


def test_input_fingerprint_is_stable_and_sees_every_kind_of_change(tmp_path, caplog):
    scan = _scan(tmp_path / "a.zarr")
    first = input_fingerprint(open_volume(scan))
    assert first == input_fingerprint(open_volume(scan))  # deterministic, nothing changed
    assert first["listing"] is not None

    # labels added to the scan are not the image: same fingerprint
    write_image(scan / "labels" / "x", np.zeros(SHAPE, np.uint8), spacing=(1, 1, 1), labels_of=scan)
    assert input_fingerprint(open_volume(scan)) == first

    # a copy of the scan (same bytes, new modification times) is the same input: a resume
    # warns and goes on (issue 13 note: copying a scan to scratch storage must not refuse)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(scan, copy, copy_function=shutil.copy)  # shutil.copy: mtimes not kept
    copied = input_fingerprint(open_volume(copy))
    assert copied["mtimes"] != first["mtimes"]
    assert differences({"input": first}, {"input": copied}) == []
    with caplog.at_level(logging.WARNING, logger="napari_scrollseg.engine.fingerprint"):
        check_resume_fingerprints(tmp_path / "out.zarr", {"input": first}, {"input": copied})
    assert "new modification times" in caplog.text

    # one file more (names or sizes differ): refused
    (copy / "0" / "stray").write_bytes(b"x")
    changed = differences({"input": first}, {"input": input_fingerprint(open_volume(copy))})
    assert changed == ["the input's files (names or sizes)"]
    with pytest.raises(ScrollsegError, match="names or sizes"):
        check_resume_fingerprints(
            tmp_path / "out.zarr", {"input": first}, {"input": input_fingerprint(open_volume(copy))}
        )

    # the same path now holds another scan of the same shape
    shutil.rmtree(scan)
    _scan(scan, seed=2)
    changed = differences({"input": first}, {"input": input_fingerprint(open_volume(scan))})
    assert "the input's voxels (sampled chunks)" in changed

    # other spacing only: the metadata
    shutil.rmtree(scan)
    write_image(scan, blocky_volume(SHAPE, seed=1), spacing=(2.0, 1.0, 1.0), chunks=(8, 16, 16))
    changed = differences({"input": first}, {"input": input_fingerprint(open_volume(scan))})
    assert changed[0].startswith("the input's metadata")


def test_fingerprint_of_an_in_memory_volume_has_no_listing():
    import dask.array as da

    from napari_scrollseg.engine.volumes import Volume

    data = da.from_array(blocky_volume(SHAPE), chunks=(8, 16, 16))
    vol = Volume(
        levels=(data,), spacing=(1, 1, 1), origin=(0, 0, 0), axes="zyx", source="", kind="array"
    )
    fp = input_fingerprint(vol)
    assert fp["listing"] is None
    assert len(fp["samples"]) == 64


def test_model_fingerprint_hashes_each_checkpoint(tmp_path, tiny_model_3d):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_3d, folder)
    first = model_fingerprint(folder)
    assert sorted(first["checkpoints"]) == [
        "fold_0/checkpoint_final.pth",
        "fold_1/checkpoint_final.pth",
    ]
    with open(folder / "fold_1" / "checkpoint_final.pth", "ab") as f:
        f.write(b"\0")
    assert differences({"model": first}, {"model": model_fingerprint(folder)}) == [
        "the model's checkpoints"
    ]
    plans = json.loads((folder / "plans.json").read_text())
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    assert "the model's plans.json" in differences(
        {"model": first}, {"model": model_fingerprint(folder)}
    )


def _interrupted(model: Path, scan: Path, out: Path) -> None:
    from napari_scrollseg.engine.predict_volume import iter_predict_volume

    gen = iter_predict_volume(model, scan, out, chunk=8, folds="0", device="cpu", num_workers=1)
    for ev in gen:
        if ev.chunks_done >= 1:
            break
    gen.close()


def test_resume_refuses_a_changed_input_or_model(tmp_path, tiny_model_3d):
    from napari_scrollseg.engine.predict_volume import predict_volume

    scan = _scan(tmp_path / "scan.zarr")
    model = tmp_path / "model" / tiny_model_3d.name
    shutil.copytree(tiny_model_3d, model)
    out = tmp_path / "out.zarr"
    _interrupted(model, scan, out)
    attrs = json.loads((out / ".zattrs").read_text())["scrollseg"]
    assert attrs["complete"] is False
    assert set(attrs["fingerprints"]) == {"input", "model"}

    shutil.rmtree(scan)
    _scan(scan, seed=7)  # the input replaced: same path, same shape
    with pytest.raises(ScrollsegError, match=r"was started on other data: the input's") as err:
        predict_volume(model, scan, out, chunk=8, folds="0", device="cpu", num_workers=1)
    assert "--overwrite" in str(err.value)
    assert json.loads((out / ".zattrs").read_text())["scrollseg"]["complete"] is False

    # with --overwrite it starts again and finishes; then a changed model is refused
    predict_volume(
        model, scan, out, chunk=8, folds="0", device="cpu", num_workers=1, overwrite=True
    )
    assert json.loads((out / ".zattrs").read_text())["scrollseg"]["complete"] is True
    import torch

    from napari_scrollseg.engine.model import clear_cache

    ck = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    ck["network_weights"] = {k: v + 0.01 for k, v in ck["network_weights"].items()}
    torch.save(ck, model / "fold_0" / "checkpoint_final.pth")
    clear_cache()
    with pytest.raises(ScrollsegError, match="the model's checkpoints changed"):
        predict_volume(model, scan, out, chunk=8, folds="0", device="cpu", num_workers=1)


def test_a_run_resumes_from_a_moved_and_copied_scan_and_model(tmp_path, tiny_model_3d):
    """Scans move to scratch storage between sessions: the same bytes elsewhere resume."""
    from napari_scrollseg.engine.predict_volume import predict_volume

    scan = _scan(tmp_path / "scan.zarr")
    model = tmp_path / "model" / tiny_model_3d.name
    shutil.copytree(tiny_model_3d, model)
    out = tmp_path / "out.zarr"
    _interrupted(model, scan, out)
    done_before = sorted(p.name for p in (out / ".scrollseg").rglob("*") if p.is_file())

    moved_scan = tmp_path / "scratch" / "scan.zarr"
    shutil.copytree(scan, moved_scan, copy_function=shutil.copy)  # new mtimes too
    shutil.rmtree(scan)
    moved_model = tmp_path / "elsewhere" / tiny_model_3d.name
    shutil.move(model, moved_model)
    predict_volume(moved_model, moved_scan, out, chunk=8, folds="0", device="cpu", num_workers=1)
    info = json.loads((out / ".zattrs").read_text())["scrollseg"]
    assert info["complete"] is True
    assert info["volume"] == str(moved_scan)
    assert done_before  # the first run had finished work that the resume kept

    fresh = tmp_path / "fresh.zarr"
    predict_volume(moved_model, moved_scan, fresh, chunk=8, folds="0", device="cpu", num_workers=1)
    import zarr

    for name in ("labels/prediction/0", "0"):
        a, b = zarr.open(str(out / name), mode="r"), zarr.open(str(fresh / name), mode="r")
        np.testing.assert_array_equal(a[:], b[:])
