"""The npe2 manifest: valid, shipped in the package, every ``python_name`` importable,
and readers matched only to the paths scrollseg opens."""

from __future__ import annotations

import importlib
import importlib.resources
import subprocess
import sys
from pathlib import Path

import pytest
from npe2 import PluginManager, PluginManifest

DIST = "napari-scrollseg"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest() -> PluginManifest:
    return PluginManifest.from_distribution(DIST)


def test_npe2_validate_passes():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run(
        [str(npe2), "validate", DIST, "--imports"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_manifest_ships_in_the_package(manifest):
    packaged = importlib.resources.files("napari_scrollseg") / "napari.yaml"
    assert packaged.read_text() == (ROOT / "napari.yaml").read_text()
    assert manifest.name == DIST  # the manifest name is the distribution name


def test_every_python_name_imports(manifest):
    commands = manifest.contributions.commands
    assert commands
    for command in commands:
        module, _, attr = command.python_name.partition(":")
        assert module.startswith("napari_scrollseg."), command.python_name
        target = getattr(importlib.import_module(module), attr)
        assert callable(target), command.python_name
    ids = {c.id for c in commands}
    contributions = manifest.contributions
    used = [r.command for r in contributions.readers or ()]
    used += [w.command for w in contributions.writers or ()]
    used += [s.command for s in contributions.sample_data or ()]
    used += [w.command for w in contributions.widgets or ()]
    assert set(used) <= ids


def test_reader_patterns_claim_only_volumes(manifest, tmp_path):
    pm = PluginManager()
    pm.register(manifest)

    def claims(path: str) -> bool:
        return any(r.plugin_name == DIST for r in pm.iter_compatible_readers([path]))

    for path in (
        "scan.zarr",
        "https://example.org/scroll.zarr",
        "vol.tif",
        "stack.TIFF",
        "scan.h5",
        "scan.zarr.zip",
    ):
        assert claims(path), path
    folder = tmp_path / "slices"
    folder.mkdir()
    assert claims(str(folder))
    # no catch-all: napari must not ask which reader to use for ordinary images
    for path in ("photo.png", "notes.csv", "movie.mp4", "data.npy"):
        assert not claims(path), path
