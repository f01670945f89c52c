"""The README's main job: ``scrollseg demo`` runs the whole loop headless on the phantom."""

from __future__ import annotations

import json

import pytest

from napari_scrollseg.cli import main


@pytest.mark.slow
def test_demo_runs_the_whole_loop(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in ("phantom: wrote", "annotation:", "export:", "train:", "predict", "dice vs full"):
        assert step in printed
    dice = json.loads((out / "dice.json").read_text())["dice"]
    # the built-in model was trained on other phantom seeds: this is held-out data
    assert dice["air"] > 0.95
    assert dice["papyrus"] > 0.95
    assert dice["ink"] > 0.5
    assert (out / "montage.png").stat().st_size > 10_000
    assert (out / "prediction.zarr" / "labels" / "prediction").is_dir()
