"""Shared fixtures: the synthetic scroll on disk, written once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Triton (imported by torch._dynamo, e.g. at a torch optimizer's first use) carries its own
# LLVM and segfaults while loading in a process that already holds Mesa's (llvmpipe:
# napari's OpenGL under Xvfb), as when a test worker runs widget tests, then engine tests.
# Nothing here needs it: make it unimportable, as on a machine without it.
sys.modules.setdefault("triton", None)


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


#: test files by cost (seconds, one process on a loaded 2-core machine), dearest first:
#: ``scripts/test.sh`` runs two pytest-xdist workers, one file each at a time, in this
#: order (``--dist loadfile --no-loadscope-reorder``), so the long files do not end up
#: alone at the end of the run
DEAREST_FIRST = (
    "engine/test_train.py",  # 330: trains the module's tiny model
    "engine/test_real_ct.py",  # 270: fetches a real scan, trains twice
    "widgets/test_train_widget.py",  # 260
    "engine/test_predict_volume.py",  # 150
    "engine/test_predict_region.py",  # 135
    "engine/test_train_detach.py",  # 120
    "engine/test_prediction_loop.py",  # 110
    "test_demo.py",  # 110
    "engine/test_train_signals.py",  # 70
    "engine/test_predict_memory.py",  # 65
    "widgets/test_live_widget.py",  # 60
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the dearest test files first (a stable sort: the order within a file stays)."""
    tests = Path(__file__).parent
    rank = {name: i for i, name in enumerate(DEAREST_FIRST)}

    def cost_rank(item: pytest.Item) -> int:
        try:
            return rank.get(item.path.relative_to(tests).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=cost_rank)
