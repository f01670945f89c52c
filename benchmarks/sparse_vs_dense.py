"""Sparse vs dense labels: the same nnU-Net training, Dice against the full truth.

Training phantoms (several seeds) are labelled two ways: *dense* (the whole truth)
and *sparse* (a few z-slices of the truth, everything else unlabeled, as a user
paints them). Both datasets are exported with ``export_dataset`` and trained with
``engine.train`` (the sparse-aware trainer, same network, epochs and iterations).
Each model then predicts a held-out phantom (another seed) with
``predict_volume``; Dice per class against that phantom's full truth. Target: the
sparse model's mean Dice is at least 0.9 of the dense model's.

    .venv/bin/python benchmarks/sparse_vs_dense.py --work /tmp/svd   # both, CPU-sized (~15 min, 2 cores)
    .venv/bin/python benchmarks/sparse_vs_dense.py --work /tmp/svd --mode sparse   # one of them
    .venv/bin/python benchmarks/sparse_vs_dense.py --work /tmp/svd --report   # table from results

Results: ``<work>/<mode>.json`` and ``<work>/sparse_vs_dense.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from napari_scrollseg.engine.dataset import export_dataset
from napari_scrollseg.engine.demo import dice_per_class, phantom_cases, tiny_network
from napari_scrollseg.engine.phantom import CLASSES, INK_CONTRAST, write_phantom
from napari_scrollseg.engine.predict_volume import predict_volume
from napari_scrollseg.engine.train import train

DATASET_IDS = {"sparse": 981, "dense": 982}


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Export, train and evaluate one labelling mode; write ``<work>/<mode>.json``."""
    t0 = time.perf_counter()
    names = sorted(CLASSES, key=CLASSES.get)
    cases = phantom_cases(
        args.work / "phantoms",
        args.shape,
        args.seeds,
        n_slices=args.slices if mode == "sparse" else None,
        ink_contrast=args.ink_contrast,
    )
    annotated = sum(int((labels > 0).sum()) for _, labels in cases)
    name = f"Svd{mode.capitalize()}"
    raw = args.work / "raw" / f"Dataset{DATASET_IDS[mode]:03d}_{name}"
    if not raw.exists():
        export_dataset(
            cases, out_dir=args.work / "raw", dataset_id=DATASET_IDS[mode], name=name, classes=names
        )
    model = args.work / "results" / raw.name / "nnUNetTrainer__nnUNetPlansScrollseg__3d_fullres"
    trained = (model / "fold_all" / "checkpoint_final.pth").is_file() and not args.retrain
    for ev in (
        ()
        if trained
        else train(
            raw,
            results_dir=args.work / "results",
            folds=("all",),
            device=args.device,
            epochs=args.epochs,
            iterations=args.iterations,
            num_processes=2,
            da_processes=args.da_processes,
            validate=False,
            plans_overrides=tiny_network(args.features, args.patch),
        )
    ):
        print(f"[{mode} {time.perf_counter() - t0:6.0f} s] {ev}", flush=True)
        if ev.kind == "done":
            model = ev.model_folder
    train_s = time.perf_counter() - t0
    test = _test_phantom(args)
    pred_path = args.work / f"pred_{mode}.zarr"
    # same physical scale as the training phantoms (models trained before the export
    # carried the spacing record 1.0: ignore_spacing predicts them at the phantom's grid)
    predict_volume(
        model,
        test,
        pred_path,
        device=args.device,
        mirror=False,
        overwrite=True,
        bar=False,
        ignore_spacing=True,
    )
    pred = zarr.open_array(str(pred_path / "labels" / "prediction" / "0"), mode="r")[...]
    truth = zarr.open_array(str(test / "labels" / "truth" / "0"), mode="r")[...]
    dice = dice_per_class(np.asarray(pred), np.asarray(truth), CLASSES)
    result = {
        "mode": mode,
        "dice": dice,
        "mean_dice": float(np.nanmean(list(dice.values()))),
        "annotated_voxels": annotated,
        "annotated_fraction": annotated / (len(args.seeds) * math.prod(args.shape)),
        "train_seconds": None if trained else round(train_s),
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in vars(args).items()
            if k not in ("work", "report", "mode", "retrain")
        },
    }
    (args.work / f"{mode}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["dice"]), flush=True)
    return result


def _test_phantom(args: argparse.Namespace) -> Path:
    return args.work / f"test_seed{args.test_seed}_ink{args.ink_contrast:g}.zarr"


def report(work: Path) -> dict | None:
    """Compare ``sparse.json`` and ``dense.json``; print a table, write ``sparse_vs_dense.json``."""
    res = {}
    for mode in ("sparse", "dense"):
        path = work / f"{mode}.json"
        if not path.is_file():
            print(f"missing {path}: run --mode {mode}")
            return None
        res[mode] = json.loads(path.read_text())
    classes = list(res["dense"]["dice"])
    print(f"{'class':10s} {'sparse':>8s} {'dense':>8s} {'ratio':>7s}")
    for c in classes:
        s, d = res["sparse"]["dice"][c], res["dense"]["dice"][c]
        print(f"{c:10s} {s:8.3f} {d:8.3f} {s / d if d else float('nan'):7.3f}")
    ratio = res["sparse"]["mean_dice"] / res["dense"]["mean_dice"]
    print(
        f"{'mean':10s} {res['sparse']['mean_dice']:8.3f} {res['dense']['mean_dice']:8.3f} "
        f"{ratio:7.3f}  (target >= 0.9)"
    )
    print(
        f"annotated voxels: sparse {res['sparse']['annotated_fraction']:.1%}, "
        f"dense {res['dense']['annotated_fraction']:.1%}"
    )
    summary = {"ratio_mean_dice": ratio, "pass": ratio >= 0.9, **res}
    (work / "sparse_vs_dense.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path("benchmarks/results/sparse_vs_dense"))
    p.add_argument("--mode", choices=["sparse", "dense", "both"], default="both")
    p.add_argument("--report", action="store_true", help="only compare existing results")
    p.add_argument("--retrain", action="store_true", help="train again even if a model exists")
    p.add_argument("--shape", type=int, nargs=3, default=(48, 96, 96))
    p.add_argument("--seeds", type=int, nargs="+", default=[21, 22, 23, 24])
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--slices", type=int, default=6, help="annotated z-slices per case (sparse)")
    p.add_argument(
        "--ink-contrast",
        type=float,
        default=50.0,
        help=f"grey values ink adds to papyrus (%(default)s; the phantom's default "
        f"{INK_CONTRAST:g} is too faint for a CPU-sized training to learn ink at all)",
    )
    p.add_argument("--features", type=int, nargs="+", default=(4, 8, 16))
    p.add_argument("--patch", type=int, nargs=3, default=(16, 32, 32))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--device", default=None)
    p.add_argument("--da-processes", type=int, default=0)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    test = _test_phantom(args)
    if not args.report and not test.exists():
        write_phantom(test, args.shape, seed=args.test_seed, ink_contrast=args.ink_contrast)
    if not args.report:
        for mode in ("sparse", "dense") if args.mode == "both" else (args.mode,):
            run_mode(mode, args)
    report(args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
