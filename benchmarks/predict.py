"""Benchmark full-volume prediction: scrollseg's ``predict_volume`` against ``nnUNetPredictor``.

For two volume sizes that differ 8x (2x per axis) it runs, each in a fresh subprocess so
that peak memory (``ru_maxrss``) is the run's own:

* scrollseg: :func:`napari_scrollseg.engine.predict_volume.predict_volume` from an
  OME-Zarr on disk into an OME-Zarr (chunked, bounded memory);
* nnU-Net: stock ``nnUNetPredictor.predict_single_npy_array`` on the same volume, read
  into memory as nnU-Net needs it, same model, folds, step and mirroring.

It reports voxels/s of both and their ratio, forward passes (tiles) of both against the
grid's tile count, and peak RSS. With ``--device cuda`` it also measures the network's
pure forward throughput (random tiles, same batch size and precision, no I/O) and
scrollseg's share of it. Prints a table and writes JSON to ``benchmarks/results/``.

Examples::

    python benchmarks/predict.py                                  # CPU, small model, quick
    python benchmarks/predict.py --device cuda --preset nnunet --shape 128 256 256 --mirror

The model is a freshly initialised nnU-Net network in nnU-Net's checkpoint format (speed
does not depend on trained weights): ``--preset small`` (3 stages, patch 32x64x64) or
``--preset nnunet`` (nnU-Net's default 3d_fullres network: 6 stages, 32..320 features,
patch 128^3). ``--model PATH`` uses a trained model instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _peak_gpu_mb(device: str) -> float | None:
    """Peak memory torch allocated on a CUDA device in this process (None elsewhere)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def make_model(root: Path, preset: str) -> Path:
    """A freshly initialised nnU-Net trained-model folder for a preset."""
    from tests.engine.conftest import tiny_plans, write_tiny_model

    if preset == "small":
        plans = tiny_plans(patch_3d=(32, 64, 64))
        kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [8, 16, 32]
    elif preset == "nnunet":
        plans = tiny_plans(patch_3d=(128, 128, 128))
        kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        kw.update(
            n_stages=6,
            features_per_stage=[32, 64, 128, 256, 320, 320],
            kernel_sizes=[[3, 3, 3]] * 6,
            strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
            n_conv_per_stage=[2] * 6,
            n_conv_per_stage_decoder=[2] * 5,
        )
    else:
        raise SystemExit(f"unknown preset {preset!r}")
    return write_tiny_model(root / f"model-{preset}", plans=plans, folds=(0,))


def make_volume(path: Path, shape: tuple[int, int, int], chunks: int) -> None:
    """A blocky uint8 volume (three phases, no zero border) as OME-Zarr, written in slabs."""
    from tests.engine.conftest import blocky_volume

    from napari_scrollseg.engine.omezarr import write_image

    write_image(path, blocky_volume(shape, seed=1), spacing=(1.0, 1.0, 1.0), chunks=(chunks,) * 3)


# -- children (one run each, own process) ----------------------------------------------------
def child_scrollseg(a: argparse.Namespace) -> dict:
    import threading

    import nnunetv2.inference.predict_from_raw_data  # noqa: F401  imported before the
    import torch  # noqa: F401  timer starts, as in child_nnunet

    from napari_scrollseg.engine.predict_volume import predict_volume

    events: list = []
    partial = Path(a.out) / ".scrollseg" / "partial"
    peak_partial = [0]
    stop = threading.Event()

    def watch() -> None:  # disk held by partial sums, sampled every 50 ms
        while not stop.wait(0.05):
            try:
                size = sum(f.stat().st_size for f in partial.iterdir())
            except OSError:
                continue
            peak_partial[0] = max(peak_partial[0], size)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    predict_volume(
        a.model,
        a.volume,
        a.out,
        device=a.device,
        folds="0",
        step=a.step,
        mirror=a.mirror,
        half=a.half,
        batch_size=a.batch_size,
        chunk=a.chunk,
        num_workers=a.threads,
        progress=events.append,
        overwrite=True,
    )
    wall = time.perf_counter() - t0
    stop.set()
    last = events[-1]
    return {
        "peak_partial_mb": peak_partial[0] / 2**20,
        "wall_s": wall,
        "tiles": last.tiles_computed,  # forward passes of this run
        "tiles_grid": last.grid_tiles,
        "chunks": last.chunks_total,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": _peak_gpu_mb(a.device),
    }


def child_nnunet(a: argparse.Namespace) -> dict:
    import torch
    import zarr
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    t0 = time.perf_counter()
    image = zarr.open_array(str(Path(a.volume) / "0"), mode="r")[:]
    predictor = nnUNetPredictor(
        tile_step_size=a.step,
        use_gaussian=True,
        use_mirroring=a.mirror,
        perform_everything_on_device=a.device != "cpu",
        device=torch.device(a.device),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(a.model, (0,), "checkpoint_final.pth")
    calls = [0]
    predictor.network.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    predictor.predict_single_npy_array(
        image[None].astype(np.float32), {"spacing": [1.0, 1.0, 1.0]}, None, None, True
    )
    wall = time.perf_counter() - t0
    passes = 2 ** len(predictor.allowed_mirroring_axes or ()) if a.mirror else 1
    return {
        "wall_s": wall,
        "tiles": calls[0] // passes,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": _peak_gpu_mb(a.device),
    }


def child_forward(a: argparse.Namespace) -> dict:
    """Pure network throughput: random tiles, same batch, TTA and precision, no I/O."""
    import torch

    from napari_scrollseg.engine.model import load_model

    model = load_model(a.model, folds=(0,), device=a.device)
    x = torch.randn(a.batch_size, model.n_channels, *model.patch_size, device=model.device)
    for _ in range(2):
        model.forward(x, mirror=a.mirror, half=a.half)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        model.forward(x, mirror=a.mirror, half=a.half)
        n += a.batch_size
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"tiles_per_s": n / wall, "patch": list(model.patch_size)}


def _run_child(kind: str, args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small", choices=["small", "nnunet"])
    p.add_argument("--model", default=None, help="a trained-model folder instead of a preset")
    p.add_argument("--shape", nargs=3, type=int, default=[48, 96, 96], help="smaller volume")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--step", type=float, default=0.5)
    p.add_argument("--mirror", action="store_true", help="nnU-Net's mirroring TTA (8 passes)")
    p.add_argument(
        "--half",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="autocast; default: on CUDA only, as nnUNetPredictor (which the comparison runs)",
    )
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="forward-throughput duration")
    p.add_argument("--workdir", default=None)
    p.add_argument(
        "--factors",
        nargs="+",
        type=int,
        default=[1, 2],
        help="volume sizes as multiples of --shape per axis (2: 8x the voxels)",
    )
    p.add_argument("--out-json", default=None, help="where to write the JSON (also partial)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--volume", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        fn = {"scrollseg": child_scrollseg, "nnunet": child_nnunet, "forward": child_forward}
        print(json.dumps(fn[a.child](a)))
        return

    work = Path(a.workdir or tempfile.mkdtemp(prefix="scrollseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = a.model or str(make_model(work, a.preset))
    common = ["--model", model, "--device", a.device, "--step", str(a.step)]
    common += ["--batch-size", str(a.batch_size), "--chunk", str(a.chunk)]
    common += ["--threads", str(a.threads), "--seconds", str(a.seconds)]
    common += ["--mirror"] * a.mirror
    common += [] if a.half is None else ["--half" if a.half else "--no-half"]
    fwd = _run_child("forward", common)  # first: every row can say its share at once
    print(f"pure forward: {fwd['tiles_per_s']:.2f} tiles/s, patch {fwd['patch']}", flush=True)
    result = {
        "device": a.device,
        "torch_device_name": _device_name(a.device),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "preset": None if a.model else a.preset,
        "model": model,
        "step": a.step,
        "mirror": a.mirror,
        "half": "auto: autocast on CUDA" if a.half is None else a.half,
        "batch_size": a.batch_size,
        "chunk": a.chunk,
        "pure_forward_tiles_per_s": fwd["tiles_per_s"],
        "patch": fwd["patch"],
        "patch_voxels": int(np.prod(fwd["patch"])),
        "runs": [],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = (
        Path(a.out_json)
        if a.out_json
        else out / f"predict-{a.device.replace(':', '')}-{stamp}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    for factor in a.factors:
        shape = tuple(s * factor for s in a.shape)
        vol = work / f"vol-{'x'.join(map(str, shape))}.zarr"
        if not vol.exists():
            make_volume(vol, shape, a.chunk)
        io = ["--volume", str(vol), "--out", str(work / "pred.zarr")]
        n_vox = int(np.prod(shape))
        ours = _run_child("scrollseg", [*common, *io])
        ours.update(voxels_per_s=n_vox / ours["wall_s"], tiles_per_s=ours["tiles"] / ours["wall_s"])
        share = ours["tiles_per_s"] / fwd["tiles_per_s"]
        print(
            f"{'x'.join(map(str, shape))} scrollseg: {ours['wall_s']:.2f} s, "
            f"{ours['voxels_per_s'] / 1e6:.3f} Mvox/s, {share:.0%} of pure forward, peak RSS "
            f"{ours['peak_rss_mb']:.0f} MB, peak GPU {ours['peak_gpu_mb']} MB",
            flush=True,
        )
        row = {"shape": list(shape), "voxels": n_vox, "scrollseg": ours}
        row["scrollseg_share_of_forward"] = share
        result["runs"].append(row)
        path.write_text(json.dumps(result, indent=1))  # kept if the next child is cut off
        ref = _run_child("nnunet", [*common, *io])
        ref["voxels_per_s"] = n_vox / ref["wall_s"]
        row.update(
            nnunet=ref,
            speed_ratio=ref["wall_s"] / ours["wall_s"],
            tile_ratio=ours["tiles"] / max(ref["tiles"], 1),
        )
        print(
            f"{'x'.join(map(str, shape))} nnU-Net: {ref['wall_s']:.2f} s, speed ratio "
            f"{row['speed_ratio']:.2f}x, peak RSS {ref['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        path.write_text(json.dumps(result, indent=1))
    if len(result["runs"]) == 2:
        _print_table(result)
    print(f"\nwrote {path}")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _print_table(r: dict) -> None:
    print(
        f"device {r['device']} ({r['torch_device_name']}), patch {r['patch']}, batch "
        f"{r['batch_size']}, mirror {r['mirror']}, half {r['half']}, chunk {r['chunk']}"
    )
    head = (
        f"{'volume':>14} {'who':>9} {'wall s':>8} {'Mvox/s':>8} {'tiles':>6} "
        f"{'grid':>6} {'peak RSS MB':>11}"
    )
    print(head)
    print("-" * len(head))
    for run in r["runs"]:
        shape = "x".join(map(str, run["shape"]))
        for who in ("scrollseg", "nnunet"):
            x = run[who]
            grid = x.get("tiles_grid", "")
            print(
                f"{shape:>14} {who:>9} {x['wall_s']:8.2f} {x['voxels_per_s'] / 1e6:8.3f} "
                f"{x['tiles']:6d} {grid!s:>6} {x['peak_rss_mb']:11.0f}"
            )
        print(
            f"{'':>14} speed scrollseg/nnU-Net {run['speed_ratio']:.2f}x, tiles ratio "
            f"{run['tile_ratio']:.3f}, scrollseg at {run['scrollseg_share_of_forward']:.0%} "
            "of the pure forward throughput"
        )
    a, b = r["runs"]
    for who in ("scrollseg", "nnunet"):
        growth = b[who]["peak_rss_mb"] / a[who]["peak_rss_mb"]
        print(f"peak RSS growth for 8x voxels, {who}: {growth:.2f}x")
    print(f"pure forward: {r['pure_forward_tiles_per_s']:.1f} tiles/s")


if __name__ == "__main__":
    main()
