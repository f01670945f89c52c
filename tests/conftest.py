"""Shared fixtures: the synthetic scroll on disk, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_zarr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default phantom (64 x 128 x 128, seed 0) as OME-Zarr with its truth labels."""
    from napari_scrollseg.engine.phantom import write_phantom

    return write_phantom(tmp_path_factory.mktemp("phantom") / "phantom.zarr")
