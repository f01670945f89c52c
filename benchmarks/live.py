"""Benchmark live inference: request-to-layer latency for a 512 x 512 view of the phantom.

With the built-in model (``phantom-tiny``, patch 32 x 64 x 64) on a phantom wide enough
to pan (default 32 x 768 x 768), one :class:`~napari_scrollseg.engine.live.LivePredictor`
answers, in order:

* ``cold``: the first request for a 2D view (one slice, 512 x 512 voxels): model load
  excluded (done before), every tile touching the slice runs;
* ``warm``: the same view again: every tile comes from the tile cache (no forward pass);
* ``pan``: the view moved by half its width: about half of the tiles are new.

Latency is from ``submit`` to the last block written into a napari ``Image`` layer's
data (the layer object the widget updates; no canvas here). Reports tiles run / cached,
read / compute / finish seconds. Each stage prints (flushed) as it ends and the JSON is
rewritten after each figure, so a run cut short by a time limit keeps what it measured.

Examples::

    python benchmarks/live.py                        # CPU, no mirroring (CPU-sized)
    python benchmarks/live.py --device cuda --mirror # a GPU, nnU-Net's default TTA
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def say(text: str) -> None:
    """Print now (a run killed by a time limit keeps every line printed)."""
    print(text, flush=True)


def run(args: argparse.Namespace, save) -> dict:
    """Measure; ``save(report)`` is called after each figure (and at the end)."""
    t_start = time.perf_counter()
    import numpy as np
    import torch

    try:
        from napari.layers import Image
    except ImportError:  # a GPU box without napari: the same writes into a plain array
        Image = None

    from napari_scrollseg.engine.builtin import builtin_model
    from napari_scrollseg.engine.live import LiveOptions, LivePredictor
    from napari_scrollseg.engine.phantom import write_phantom
    from napari_scrollseg.engine.volumes import open_volume

    say(f"imports done ({time.perf_counter() - t_start:.1f} s)")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scrollseg-live-bench-"))
    path = work / f"phantom-{'x'.join(map(str, args.shape))}.zarr"
    if not path.exists():
        write_phantom(path, shape=tuple(args.shape))
        say(f"phantom written: {path} ({time.perf_counter() - t_start:.1f} s)")
    volume = open_volume(path)
    opts = LiveOptions(
        device=args.device, mirror=args.mirror, max_tiles=None, batch_size=args.batch_size
    )
    target = np.zeros((1, args.view, args.view), np.float32)
    layer = Image(target) if Image is not None else _ArrayLayer(target)
    landed = threading.Event()

    def on_event(ev) -> None:  # the worker thread: what the widget's relay receives
        if ev.block is not None:
            layer.data[(0, *(slice(s.start - r.start, s.stop - r.start) for s, r in zip(ev.block[1:], ev.request.box[1:])))] = ev.probs[-1, 0]  # fmt: skip
        if ev.final:
            landed.set()

    results: dict = {}
    report = {
        "benchmark": "live",
        "view": [1, args.view, args.view],
        "phantom_shape": list(args.shape),
        "model": "phantom-tiny (built-in)",
        "mirror": args.mirror,
        "batch_size": args.batch_size,
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "layer": "napari Image" if Image is not None else "numpy array (napari not installed)",
        "results": results,
        "targets": {"warm_s": 0.05, "cold_gpu_s": 0.5},
    }
    with LivePredictor(builtin_model(), volume, opts, on_event=on_event) as live:
        t0 = time.perf_counter()
        live.load()
        device = str(live.model.device)
        report["device"] = device
        report["gpu"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
        report["torch_threads"] = torch.get_num_threads()
        report["model_load_s"] = round(time.perf_counter() - t0, 3)
        say(f"model loaded on {device} in {report['model_load_s']} s")
        z = args.shape[0] // 2
        y0 = x0 = (args.shape[1] - args.view - args.view // 2) // 2
        views = {
            "cold": (y0, x0),
            "warm": (y0, x0),
            "pan": (y0, x0 + args.view // 2),
        }
        t0 = time.perf_counter()
        live.predict((slice(z, z + 1), slice(0, 64), slice(0, 64)), timeout=3600)  # bbox, stats
        live.cache.clear()
        report["first_request_s"] = round(time.perf_counter() - t0, 3)  # grid, stats, warm-up
        say(f"first (small) request: {report['first_request_s']} s")
        for name, (y, x) in views.items():
            landed.clear()
            t0 = time.perf_counter()
            req = live.submit((slice(z, z + 1), slice(y, y + args.view), slice(x, x + args.view)))
            landed.wait(3600)
            layer.refresh()
            latency = time.perf_counter() - t0
            req.wait(0)
            results[name] = {
                "latency_s": round(latency, 4),
                "tiles": req.tiles,
                "tiles_run": req.tiles_run,
                "tiles_cached": req.tiles_cached,
                "read_s": round(req.read_s, 4),
                "compute_s": round(req.compute_s, 4),
                "finish_s": round(req.finish_s, 4),
                "tiles_per_s": round(req.tiles_run / req.compute_s, 2) if req.compute_s else None,
            }
            say(f"{name:5s} {latency:8.3f} s  {req.tiles_run:4d} run  {req.tiles_cached:4d} cached")
            save(report)
    return report


class _ArrayLayer:
    """Where napari is not installed: the layer's data array, and a refresh that does nothing."""

    def __init__(self, data):
        self.data = data

    def refresh(self) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--view", type=int, default=512)
    p.add_argument("--shape", type=int, nargs=3, default=(32, 768, 768))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workdir", default=None, help="where the phantom is written (reused)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/reference/)")
    p.add_argument("--note", default="", help="a remark stored in the JSON (e.g. machine load)")
    args = p.parse_args()
    kind = "cpu" if args.device == "cpu" else args.device.replace(":", "")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "reference" / f"live-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> None:
        report["note"] = args.note
        out.write_text(json.dumps(report, indent=1) + "\n")

    save(run(args, save))
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
