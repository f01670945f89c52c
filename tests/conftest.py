"""Shared fixtures: the synthetic scroll on disk, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default phantom (64 x 128 x 128, seed 0) as OME-Zarr with its truth labels."""
    from napari_scrollseg.engine.phantom import write_phantom

    return write_phantom(tmp_path_factory.mktemp("phantom") / "phantom.zarr")


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A folder no file can be created in: chmod 555, or sysfs when running as root."""
    import os
    import tempfile

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys/kernel")  # root may write anywhere but here (sysfs creates no files)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pytest.skip("no read-only folder available to root here")
    except OSError:
        yield folder
