"""Whole-volume runs within the device's memory and with memory flat in the volume size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.engine.conftest import blocky_volume

ROOT = Path(__file__).resolve().parents[2]


class _Holds:
    """A device that holds ``most`` tiles: the real network above it raises torch's OOM."""

    def __init__(self, net, most: int) -> None:
        self.net, self.most, self.sizes = net, most, []

    def __call__(self, x):
        import torch

        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.most:
            raise torch.OutOfMemoryError(f"CUDA out of memory (holds {self.most} tiles)")
        return self.net(x)


def _network_module(net, most: int):
    """``_Holds`` as a torch module (the model calls its networks as modules)."""
    import torch

    holds = _Holds(net, most)

    class Holds(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.holds = holds

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.holds(x)

    return Holds()


def test_out_of_memory_halves_the_batch_and_keeps_the_answer(
    tmp_path: Path, tiny_model_3d: Path
) -> None:
    from napari_scrollseg.engine.errors import ScrollsegError
    from napari_scrollseg.engine.omezarr import write_image
    from napari_scrollseg.engine.predict import Predictor, predict_volume

    write_image(tmp_path / "vol.zarr", blocky_volume((12, 40, 40), seed=3), spacing=(1, 1, 1))
    opts = {"chunk": (12, 20, 20), "batch_size": 4, "mirror": False, "num_workers": 1}
    opts["bar"] = False
    session = Predictor(tiny_model_3d, folds="1", device="cpu", cache=None)
    ref = predict_volume(session, tmp_path / "vol.zarr", tmp_path / "ref.zarr", **opts)
    networks = session.model._networks
    real = networks[0]
    try:
        networks[0] = _network_module(real, most=1)
        limited = Predictor(session.model, cache=None)
        out = predict_volume(limited, tmp_path / "vol.zarr", tmp_path / "small.zarr", **opts)
        sizes = networks[0].holds.sizes
        assert sizes[:3] == [4, 2, 1]  # halved down to what the device holds
        assert limited.batch_limit == 1
        assert sizes.count(4) == 1  # later blocks start at 1
        assert sizes.count(2) == 1
        assert limited.forward_passes == session.forward_passes  # every tile ran once
        import zarr

        for path in ("0", "labels/prediction/0"):
            a = zarr.open_array(str(ref / path), mode="r")[:].astype(int)
            b = zarr.open_array(str(out / path), mode="r")[:].astype(int)
            assert np.abs(a - b).max() <= 1
        networks[0] = _network_module(real, most=0)  # not even one tile
        with pytest.raises(ScrollsegError, match="out of memory on a single tile"):
            predict_volume(
                Predictor(session.model, cache=None),
                tmp_path / "vol.zarr",
                tmp_path / "none.zarr",
                **opts,
            )
    finally:
        networks[0] = real


_CHILD = r"""
import json, sys, torch
from napari_scrollseg.engine.predict import Predictor, partials, predict_volume

partials.BUDGET_BLOCKS = 8  # reached at both sizes: past it, sums go to disk

torch.set_num_threads(1)
model, work = sys.argv[1], sys.argv[2]

class Cheap(torch.nn.Module):  # the network's output shape for the cost of a multiply
    def __init__(self, k):
        super().__init__()
        self.register_buffer("w", torch.linspace(-1, 1, k).reshape(1, k, 1, 1, 1))
    def forward(self, x):
        return x[:, :1] * self.w

def rss_mb():  # this process's peak RSS (VmHWM: ru_maxrss would include the parent's at exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

session = Predictor(model, folds="1", device="cpu", cache=None)
session.model._networks[:] = [Cheap(session.model.n_classes)]
opts = dict(chunk=32, mirror=False, num_workers=2, bar=False, overwrite=True)
predict_volume(session, work + "/warm.zarr", work + "/warm-out.zarr", **opts)
base = rss_mb()
predict_volume(session, work + "/vol.zarr", work + "/out.zarr", **opts)
print(json.dumps({"base_mb": base, "peak_mb": rss_mb()}))
"""


def _peak_rss(model: Path, work: Path, shape: tuple[int, int, int]) -> dict:
    """Peak RSS (MB) of a fresh process after a warm-up run (``base_mb``) and after the
    run on a volume of ``shape`` (``peak_mb``); the volumes are written beforehand."""
    from napari_scrollseg.engine.omezarr import write_image

    work.mkdir()
    write_image(work / "warm.zarr", blocky_volume((32, 64, 64), seed=2), spacing=(1, 1, 1))
    volume = blocky_volume(shape, seed=2)
    write_image(work / "vol.zarr", volume, spacing=(1, 1, 1), chunks=(32,) * 3)
    del volume
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    args = [str(model), str(work)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_flat_in_the_volume_size(tmp_path: Path, tiny_model_3d: Path) -> None:
    """Peak RSS of a run on a volume 8x larger (2x per axis) stays within 1.25x, and what
    the run adds above the warm session's memory hardly grows.

    The partial sums held grow with the volume's cross-section (a sweep's front) up to
    the run's budget, then spill to disk: the budget (here 8 blocks, reached at both
    sizes) bounds them. What else is in flight is bounded by the scheduler's window."""
    small = _peak_rss(tiny_model_3d, tmp_path / "small", (64, 128, 128))
    large = _peak_rss(tiny_model_3d, tmp_path / "large", (128, 256, 256))
    print(f"peak RSS: {small} -> {large}")
    assert large["peak_mb"] <= 1.25 * small["peak_mb"]
    grew_small = small["peak_mb"] - small["base_mb"]
    grew_large = large["peak_mb"] - large["base_mb"]
    # what the runs added above the warm session (MB), small -> large: 14.4 -> 34.7 (CI,
    # where a 16 MB slack failed by 0.7), 17.4 -> 33.2, 21.4 -> 32.9 and, with
    # MALLOC_ARENA_MAX=2, 12.2 -> 31.4 here. Python's share (tracemalloc peak, 9.2 ->
    # 17.9): the input chunk cache, LRU within input_cache's bound (1.0 -> 4.5 MB), and
    # the run's plan (tiles, 1.8 MB) and chunk markers (1.0 MB), which grow with the
    # number of tiles and chunks; the rest is the allocator's. The slack covers them, the
    # ratio above bounds the whole
    assert grew_large <= 1.25 * grew_small + 24.0, (grew_small, grew_large)
