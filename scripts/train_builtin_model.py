"""Reproduce the built-in model ``phantom-tiny`` with the project's own code.

Phantoms with several seeds (and shapes) -> sparse labels (a few z-slices of the
truth, the rest unlabeled) -> ``export_dataset`` -> ``engine.train`` (sparse-aware
trainer, a tiny 4-stage network) -> the trained fold, without optimizer state, copied
into ``src/napari_scrollseg/data/models/phantom-tiny/``.

Several ``--shapes`` (each used with every seed) let the model see the phantom at
sizes where patches of pure air far from the scroll occur (e.g. ``64x128x128
32x512x512``, or a wide field of view such as ``32x256x1024``, where a quarter of
the patches are pure air); ``--pretrained`` fine-tunes an existing model (its
``checkpoint_final.pth``) instead of training from scratch.

    .venv/bin/python scripts/train_builtin_model.py --work /tmp/builtin [--install]
    .venv/bin/python scripts/train_builtin_model.py --work /tmp/builtin --install-only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from napari_scrollseg.engine.builtin import MODELS_DIR
from napari_scrollseg.engine.dataset import export_dataset
from napari_scrollseg.engine.demo import phantom_cases, tiny_network
from napari_scrollseg.engine.phantom import CLASSES
from napari_scrollseg.engine.train import train

NAME = "phantom-tiny"
KEEP = (
    "network_weights",
    "init_args",
    "trainer_name",
    "inference_allowed_mirroring_axes",
    "current_epoch",
)


def _shape(text: str) -> tuple[int, int, int]:
    """``64x128x128`` -> (64, 128, 128)."""
    try:
        z, y, x = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a shape is ZxYxX, e.g. 64x128x128, not {text!r}"
        ) from None
    return z, y, x


def strip_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint keeping only what inference needs (no optimizer state, no logs)."""
    import torch

    ck = torch.load(src, map_location="cpu", weights_only=False)
    slim = {k: ck[k] for k in KEEP if k in ck}
    slim["init_args"] = {**ck["init_args"], "device": torch.device("cpu")}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/scrollseg-builtin"))
    p.add_argument(
        "--shapes",
        type=_shape,
        nargs="+",
        default=[(64, 128, 128)],
        help="phantom shapes ZxYxX, each with every seed (default: 64x128x128)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14, 15])
    p.add_argument("--slices", type=int, default=6, help="annotated z-slices per case")
    p.add_argument("--features", type=int, nargs="+", default=(8, 16, 32, 64), help="per stage")
    p.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best)")
    p.add_argument("--da-processes", type=int, default=0)
    p.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="fine-tune from this checkpoint (e.g. the installed model's fold_0/"
        "checkpoint_final.pth) instead of training from scratch",
    )
    p.add_argument(
        "--learning-rate", type=float, default=None, help="initial (default: nnU-Net's 1e-2)"
    )
    p.add_argument(
        "--sampling",
        choices=("balanced", "nnunet"),
        default="balanced",
        help="random patches' anchors (engine.train's sampling; nnunet: ink over-predicted less)",
    )
    p.add_argument("--nice", type=int, default=0, help="lower the training's CPU priority")
    p.add_argument(
        "--no-validate",
        action="store_false",
        dest="validate",
        help="skip nnU-Net's final validation (slow on CPU with large phantoms)",
    )
    p.add_argument(
        "--install", action="store_true", help=f"copy the model into {MODELS_DIR / NAME}"
    )
    p.add_argument(
        "--install-only",
        action="store_true",
        help="install the model the last training in --work made (e.g. after evaluating it)",
    )
    args = p.parse_args(argv)

    record = args.work / "trained.json"  # what the last training made, for --install-only
    if args.install_only:
        if not record.is_file():
            p.error(f"--install-only: no finished training recorded in {record}")
        install(**json.loads(record.read_text()))
        return 0
    trained = train_model(args)
    record.write_text(json.dumps(trained, indent=2))
    if args.install:
        install(**trained)
    return 0


def train_model(args: argparse.Namespace) -> dict:
    """Phantoms -> sparse labels -> dataset -> training; what :func:`install` needs."""
    tiny = tiny_network(args.features, args.patch)
    base = None  # what the fine-tuning starts from, for model.json
    if args.pretrained is not None:
        base_json = args.pretrained.parent.parent / "model.json"
        base = {"checkpoint": str(args.pretrained)}
        if base_json.is_file():
            base["model.json"] = json.loads(base_json.read_text())
    t0 = time.perf_counter()
    cases = [
        case
        for shape in args.shapes
        for case in phantom_cases(
            args.work / "phantoms" / "x".join(map(str, shape)),
            shape,
            args.seeds,
            n_slices=args.slices,
        )
    ]
    classes = sorted(CLASSES, key=CLASSES.get)
    raw = (
        export_dataset(
            cases, out_dir=args.work / "raw", dataset_id=990, name="PhantomTiny", classes=classes
        )
        if not (args.work / "raw" / "Dataset990_PhantomTiny").exists()
        else args.work / "raw" / "Dataset990_PhantomTiny"
    )
    print(f"dataset: {raw}", flush=True)
    model, dice = None, None
    for ev in train(
        raw,
        results_dir=args.work / "results",
        folds=(0,),
        device=args.device,
        epochs=args.epochs,
        iterations=args.iterations,
        num_processes=1,
        da_processes=args.da_processes,
        plans_overrides=tiny,
        plans_name="nnUNetPlansTiny",
        pretrained_weights=args.pretrained,
        validate=args.validate,
        learning_rate=args.learning_rate,
        sampling=args.sampling,
        nice=args.nice,
    ):
        print(f"[{time.perf_counter() - t0:7.1f} s] {ev}", flush=True)
        if ev.kind == "done":
            model = ev.model_folder
            dice = ev.dice
    if model is None:
        raise SystemExit("the training did not finish: nothing to install")
    seconds = round(time.perf_counter() - t0)
    about = {
        "name": NAME,
        "made_by": "scripts/train_builtin_model.py",
        "phantom_shapes": [list(s) for s in args.shapes],
        "seeds": args.seeds,
        "annotated_z_slices_per_case": args.slices,
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "plans_overrides": tiny,
        "device": args.device,
        "fine_tuned_from": base,
        "initial_learning_rate": args.learning_rate or 1e-2,
        "sampling": args.sampling,
        "validation_dice_fold0": dice or None,
        "training_seconds": seconds,
    }
    return {"model": str(model), "about": about}


def install(model: str, about: dict, checkpoint: str = "checkpoint_final.pth") -> None:
    """Copy the trained fold (no optimizer state) and its description into the package.

    ``checkpoint``: e.g. ``checkpoint_latest.pth`` of a training stopped early (say so
    in ``about``); it is installed as ``checkpoint_final.pth``."""
    model = Path(model)
    dst = MODELS_DIR / NAME
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in (
        "dataset.json",
        "plans.json",
        "dataset_fingerprint.json",
        "progress.csv",
        "progress.png",
        "dice_summary.json",
    ):
        if (model / name).exists():  # no dice summary without validation
            shutil.copy2(model / name, dst / name)
    strip_checkpoint(model / "fold_0" / checkpoint, dst / "fold_0" / "checkpoint_final.pth")
    (dst / "model.json").write_text(json.dumps(about, indent=2))
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(f"installed {dst} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
