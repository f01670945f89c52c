"""``scrollseg predict``: ROI runs, provenance, and one clear ``error:`` line per bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_scrollseg import cli
from tests.engine.conftest import blocky_volume

ROI = "3:15,10:30,4:24"
FAST = ["--device", "cpu", "--folds", "1", "--no-mirror", "--chunk", "8,12,12"]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_scrollseg.engine.omezarr import write_image

    path = tmp_path_factory.mktemp("predict_cli") / "vol.zarr"
    write_image(
        path, blocky_volume((19, 40, 33), seed=3), spacing=(1.0, 1.0, 1.0), chunks=(8, 16, 16)
    )
    return path


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI, expect a failure reported as one ``error:`` line; return it."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_roi_run_equals_region_and_records_provenance(
    tmp_path: Path, volume: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    import zarr

    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.predict import predict_region
    from napari_scrollseg.engine.volumes import open_volume

    out = tmp_path / "roi.zarr"
    assert (
        cli.main(["predict", str(tiny_model_3d), str(volume), str(out), "--roi", ROI, *FAST]) == 0
    )
    summary = capsys.readouterr().out
    assert f"wrote {out}" in summary
    assert "0 resumed" in summary
    model = load_model(tiny_model_3d, folds=(1,), device="cpu")
    box = (slice(3, 15), slice(10, 30), slice(4, 24))
    probs, labels = predict_region(model, open_volume(volume), box, mirror=False)
    # stored in class ids 1..K; predict_region gives nnU-Net's k-1
    np.testing.assert_array_equal(zarr.open_array(str(out / "labels/prediction/0"))[:], labels + 1)
    ours = zarr.open_array(str(out / "0"))[:]
    assert np.abs(ours.astype(int) - np.rint(probs * 255)).max() <= 1
    # placed where the roi is: origin shifted by the roi start, spacing copied
    pred = open_volume(out)
    assert pred.shape == (3, 12, 20, 20)
    assert tuple(pred.origin) == (3.0, 10.0, 4.0)
    assert tuple(pred.spacing) == (1.0, 1.0, 1.0)
    info = pred.attrs["scrollseg"]
    assert info["roi"] == [[3, 15], [10, 30], [4, 24]]
    assert info["tta"] == "none"
    assert info["model"] == str(tiny_model_3d)
    assert info["complete"] is True
    # the same command again: nothing to compute
    assert (
        cli.main(["predict", str(tiny_model_3d), str(volume), str(out), "--roi", ROI, *FAST]) == 0
    )
    assert "0 computed now" in capsys.readouterr().out


def test_existing_output_is_never_silently_replaced(
    tmp_path: Path, volume: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out.zarr"
    base = ["predict", str(tiny_model_3d), str(volume), str(out), *FAST]
    assert cli.main([*base, "--roi", ROI]) == 0
    capsys.readouterr()
    before = json.loads((out / ".zattrs").read_text())["scrollseg"]
    msg = _error(capsys, [*base, "--roi", "0:8,0:12,0:12"])
    assert "other arguments" in msg
    assert "--overwrite" in msg
    assert json.loads((out / ".zattrs").read_text())["scrollseg"] == before
    assert cli.main([*base, "--roi", "0:8,0:12,0:12", "--overwrite"]) == 0
    after = json.loads((out / ".zattrs").read_text())["scrollseg"]
    assert after["roi"] == [[0, 8], [0, 12], [0, 12]]


def test_model_folder_without_plans(
    tmp_path: Path, volume: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_3d, broken)
    (broken / "plans.json").unlink()
    msg = _error(capsys, ["predict", str(broken), str(volume), str(tmp_path / "o.zarr"), *FAST])
    assert "plans.json" in msg
    assert not (tmp_path / "o.zarr").exists()


def test_missing_fold(
    tmp_path: Path, volume: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["predict", str(tiny_model_3d), str(volume), str(tmp_path / "o.zarr"), *FAST]
    msg = _error(capsys, [*argv, "--folds", "7"])
    assert "fold 7 not found" in msg


def test_wrong_channel_count(
    tmp_path: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    from napari_scrollseg.engine.omezarr import write_image

    two = tmp_path / "two.zarr"
    data = np.stack([blocky_volume((9, 20, 20), seed=s) for s in (1, 2)])
    write_image(two, data, spacing=(1.0, 1.0, 1.0), axes="czyx", chunks=(2, 9, 20, 20))
    msg = _error(capsys, ["predict", str(tiny_model_3d), str(two), str(tmp_path / "o.zarr"), *FAST])
    assert "1 input channel" in msg
    assert "has 2" in msg


def test_output_path_holding_something_else(
    tmp_path: Path, volume: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["predict", str(tiny_model_3d), str(volume)]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert "is a file" in _error(capsys, [*base, str(a_file), *FAST])
    assert a_file.read_text() == "keep me"
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    for extra in ([], ["--overwrite"]):
        msg = _error(capsys, [*base, str(folder), *FAST, *extra])
        assert "not a scrollseg prediction" in msg
    assert (folder / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_read_only_location(
    tmp_path: Path, volume: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["predict", str(tiny_model_3d), str(volume)]
    a_file = tmp_path / "file"
    a_file.write_text("")
    msg = _error(capsys, [*base, str(a_file / "out.zarr"), *FAST])
    assert "is a file, not a folder" in msg
    if os.geteuid() != 0:  # a folder without write permission stops non-root users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out.zarr"
    else:  # root writes through permissions; sysfs refuses everyone
        target = Path("/sys/scrollseg-test-out.zarr")
        if not Path("/sys").is_dir() or (os.access("/sys", os.W_OK) and _mkdir_works(target)):
            pytest.skip("no read-only location available for root here")
    msg = _error(capsys, [*base, str(target), *FAST])
    assert "cannot write to" in msg
    assert "writable" in msg


def _mkdir_works(path: Path) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    path.rmdir()
    return True


def test_bad_roi_and_unknown_cluster_backend(
    tmp_path: Path, volume: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["predict", str(tiny_model_3d), str(volume), str(tmp_path / "o.zarr"), *FAST]
    assert "--roi" in _error(capsys, [*argv, "--roi", "5:2,0:10,0:10"])
    assert "one per axis" in _error(capsys, [*argv, "--roi", "0:5,0:10"])
    if importlib.util.find_spec("dask_cuda") is None:
        assert "pip install dask-cuda" in _error(capsys, [*argv, "--cluster", "local-cuda"])


def test_a_second_run_on_a_live_output_is_refused(
    tmp_path: Path, volume: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    import socket

    out = tmp_path / "out.zarr"
    argv = ["predict", str(tiny_model_3d), str(volume), str(out), "--roi", ROI, *FAST]
    assert cli.main(argv) == 0
    capsys.readouterr()
    lock = out / ".scrollseg" / "lock"
    assert not lock.exists()
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process holds it
    assert "another scrollseg run" in _error(capsys, argv)
    lock.write_text(f"{socket.gethostname()} {_dead_pid()}")  # a killed run left it behind
    assert cli.main(argv) == 0
    assert not lock.exists()


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_spacing_mismatch_is_an_error_unless_ignored(
    tmp_path: Path, phantom_zarr: Path, tiny_model_3d: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["predict", str(tiny_model_3d), str(phantom_zarr), str(tmp_path / "p.zarr"), *FAST]
    argv += ["--roi", "20:30,40:60,40:60"]
    assert "resample" in _error(capsys, argv)  # phantom: 7.91 um voxels, model: 1
    assert not (tmp_path / "p.zarr").exists()
    assert cli.main([*argv, "--ignore-spacing"]) == 0
    assert (tmp_path / "p.zarr" / "labels" / "prediction" / "0").is_dir()
