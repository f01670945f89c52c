"""The command-line contract: subcommands, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from napari_scrollseg.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("info", "phantom", "demo"):
        assert command in out


def test_phantom_command(tmp_path, capsys):
    out = tmp_path / "p.zarr"
    assert main(["phantom", str(out), "--shape", "16", "40", "48", "--seed", "2"]) == 0
    assert "wrote phantom (16, 40, 48) seed 2" in capsys.readouterr().out
    assert zarr.open_group(str(out), mode="r")["0"].shape == (16, 40, 48)
    # a second run refuses to overwrite: one error line, exit 2, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "napari_scrollseg.cli", "phantom", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert "already exists" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_models_lists_the_builtin_model(capsys):
    assert main(["models"]) == 0
    name, path = capsys.readouterr().out.split()
    assert name == "phantom-tiny"
    assert (Path(path) / "plans.json").is_file()
    assert list(Path(path).glob("fold_*/checkpoint_final.pth"))


def test_train_fine_tuning_flags_are_checked_before_any_work(tmp_path, capsys):
    """``--pretrained-weights`` and ``--learning-rate`` reach ``train``: a missing
    checkpoint or a learning rate of 0 is one error line before planning starts."""
    dataset = tmp_path / "Dataset001_X"
    dataset.mkdir()
    args = ["train", str(dataset), "--out", str(tmp_path / "r")]
    assert main([*args, "--pretrained-weights", str(tmp_path / "missing.pth")]) == 2
    assert "pretrained weights" in capsys.readouterr().err
    assert main([*args, "--learning-rate", "0"]) == 2
    assert "learning_rate must be above 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
