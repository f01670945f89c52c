"""The pipeline's ceiling: ``predict_volume`` with a network that costs nearly nothing.

A real trained-model folder (nnU-Net format, ``--preset small`` as ``benchmarks/predict.py``)
is loaded into a :class:`~napari_scrollseg.engine.predict.Predictor`, whose network is then
swapped for a trivial module with the same input and output channels (one multiply), and
the session is handed to :func:`~napari_scrollseg.engine.predict.predict_volume` through
the public API. Whatever the run still costs is the pipeline: reading, normalising,
accumulating, partial sums, finalisation and writing. Reports output Mvoxel/s, the time
split (``session.stats``, summed over threads), partial-sum bytes written to and read from
disk per output voxel and peak RSS; writes JSON to ``benchmarks/results/``.

On a shared machine the wall time depends on the load: ``--repeat`` keeps the fastest of
several runs, and the process CPU time (all threads: the tasks, zarr's and blosc's) is
reported beside it. Compare a checkout with another by running this script with that
checkout's ``src`` first on ``PYTHONPATH`` (same ``--work``: the same input volume).

Examples::

    python benchmarks/pipeline_ceiling.py --shape 128 256 256 --out-json after.json
    python benchmarks/pipeline_ceiling.py --preset nnunet --shape 256 384 384 --chunk 128
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def trivial_network(in_channels: int, n_classes: int):
    """Logits ``x[:, 0] * w_k``: the real output shape for the cost of one multiply."""
    import torch

    class Trivial(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = torch.linspace(-1.0, 1.0, n_classes).reshape(1, n_classes, 1, 1, 1)
            self.register_buffer("w", w)
            self.in_channels = in_channels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1] * self.w

    return Trivial()


def _code_version() -> str:
    """The commit of the napari_scrollseg checkout that ran (``+dirty`` if changed)."""
    import subprocess

    import napari_scrollseg

    where = Path(napari_scrollseg.__file__).parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(where), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{where.parents[1]} {rev}".strip()


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (sums and finalize there)")
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs; the fastest is kept")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    ap.add_argument(
        "--out-json", default=None, help="file name under benchmarks/results/ (or a full path)"
    )
    a = ap.parse_args()

    import torch
    from predict import make_model, make_volume

    from napari_scrollseg.engine.predict import Predictor, predict_volume

    torch.set_num_threads(a.torch_threads)
    work = a.work or Path(tempfile.mkdtemp(prefix="scrollseg-ceiling-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work, a.preset)
    volume = work / f"volume-{'x'.join(map(str, a.shape))}.zarr"
    if not volume.exists():
        make_volume(volume, tuple(a.shape), a.chunk)
    session = Predictor(model, folds="0", device=a.device, cache=None)
    lm = session.model
    lm._networks[:] = [trivial_network(1, lm.n_classes).to(lm.device)]
    options = {
        "mirror": False,
        "chunk": a.chunk,
        "batch_size": a.batch_size,
        "num_workers": a.threads,
        "overwrite": True,
        "bar": False,
    }
    # warm-up on a small volume: one-time imports and lazy set-up stay out of the timing
    warm = work / "warm-up.zarr"
    if not warm.exists():
        make_volume(warm, (a.chunk,) * 3, a.chunk)
    predict_volume(session, warm, work / "warm-up-out.zarr", **options)
    best = None
    for _ in range(max(1, a.repeat)):
        session.stats = type(session.stats)()
        session.forward_passes = 0
        marks: dict[str, float] = {}  # process CPU seconds when each stage first shows

        def mark(ev, marks: dict = marks) -> None:
            marks.setdefault(ev.stage, _cpu_seconds())

        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        predict_volume(session, volume, work / "out.zarr", progress=mark, **options)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        end = cpu0 + cpu
        phases = {  # process CPU (all threads) from one stage's first event to the next
            "prepare": marks.get("predict", end) - cpu0,
            "chunks": marks.get("pyramid", end) - marks.get("predict", end),
            "pyramid": marks.get("done", end) - marks.get("pyramid", end),
        }
        print(f"run: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
        if best is None or wall < best[0]:
            best = (wall, cpu, session.stats.as_dict(), session.forward_passes, phases)
    wall, cpu, stats, tiles, phases = best
    voxels = a.shape[0] * a.shape[1] * a.shape[2]
    result = {
        "benchmark": "pipeline_ceiling",
        "shape": a.shape,
        "chunk": a.chunk,
        "patch": list(lm.patch_size),
        "n_classes": lm.n_classes,
        "device": str(lm.device),
        "threads": a.threads,
        "batch_size": a.batch_size,
        "tiles": tiles,
        "repeat": a.repeat,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "mvoxel_per_s": round(voxels / wall / 1e6, 3),
        "mvoxel_per_cpu_s": round(voxels / cpu / 1e6, 3),
        "cpu_seconds_by_phase": {k: round(v, 3) for k, v in phases.items()},
        "load_average_1min": round(__import__("os").getloadavg()[0], 2),
        "seconds": {k: round(v, 3) for k, v in stats["seconds"].items()},
        "seconds_note": "summed over threads (wall time of each stage, load included)",
        "partial_disk_bytes_written_per_voxel": round(stats["partial_bytes_written"] / voxels, 2),
        "partial_disk_bytes_read_per_voxel": round(stats["partial_bytes_read"] / voxels, 2),
        "partial_peak_memory_mb": round(stats["partial_peak_memory"] / 2**20, 1),
        "partial_budget_mb": round(stats["partial_budget"] / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "code": _code_version(),
        "machine": platform.platform(),
        "cpus": __import__("os").cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if a.out_json:
        dest = ROOT / "benchmarks" / "results" / a.out_json
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {dest}")


if __name__ == "__main__":
    main()
