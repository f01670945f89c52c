"""The ``scrollseg`` command: a thin shell over the engine.

Each subcommand has an ``_add_<name>`` (its arguments) and a ``_run_<name>``
(one engine call). Errors the user can fix (:class:`ScrollsegError`) are printed
as one ``error: ...`` line on stderr with exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from napari_scrollseg import __version__
from napari_scrollseg.engine.errors import ScrollsegError

log = logging.getLogger("napari_scrollseg")


def _shape(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# -- info ---------------------------------------------------------------------------------
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="shape, dtype, chunks, spacing, levels and size of a volume")
    p.add_argument(
        "path", help="OME-Zarr / zarr (path or URL), slice-TIFF folder, TIFF, file.h5:/dataset"
    )


def _run_info(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.volumes import describe, open_volume

    print(describe(open_volume(args.path)))
    return 0


def _dask_progress():
    """dask's progress bar on a terminal; on a log file, nothing (no \\r updates)."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    return ProgressBar(minimum=2, dt=0.5, out=sys.stderr)


class _LineProgress:
    """Plain progress lines, at most one every ``every`` seconds (for logs and pipes)."""

    def __init__(self, every: float = 10.0) -> None:
        import time

        self._clock = time.monotonic
        self.every, self._last, self._t0 = every, -float("inf"), time.monotonic()

    def __call__(self, ev) -> None:
        now = self._clock()
        if (
            ev.stage == "predict"
            and ev.chunks_done < ev.chunks_total
            and now - self._last < self.every
        ):
            return
        self._last = now
        rate = ev.tiles_computed / ev.elapsed_s if ev.elapsed_s > 0 else 0.0
        print(
            f"predict {ev.stage}: {ev.chunks_done}/{ev.chunks_total} chunks, "
            f"{ev.tiles_done}/{ev.tiles_total} tiles, {rate:.2f} tiles/s, {ev.elapsed_s:.0f} s",
            flush=True,
        )


# -- phantom ------------------------------------------------------------------------------
def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write the synthetic scroll phantom as OME-Zarr")
    p.add_argument("out", help="output .zarr path")
    p.add_argument("--shape", nargs=3, type=_shape, metavar=("Z", "Y", "X"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _run_phantom(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.phantom import DEFAULT_SHAPE, write_phantom

    shape = tuple(args.shape or DEFAULT_SHAPE)
    print(f"writing phantom {shape} seed {args.seed}: image, then truth labels", flush=True)
    with _dask_progress():
        out = write_phantom(args.out, shape, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote phantom {tuple(args.shape or DEFAULT_SHAPE)} seed {args.seed}: {out}")
    return 0


# -- demo ---------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop on the synthetic scroll")
    p.add_argument("--out", default="scrollseg-demo", help="output folder (default: %(default)s)")


def _run_demo(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.demo import run_demo

    for line in run_demo(args.out):
        print(line, flush=True)
    return 0


# -- predict ------------------------------------------------------------------------------
def _chunk_arg(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or Z,Y,X, got {text!r}") from None
    if len(values) not in (1, 3) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or Z,Y,X positive sizes, got {text!r}")
    return values


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="run an nnU-Net model over a whole volume (chunked, resumable, distributed)",
        description="Predict a whole volume with an nnU-Net v2 model into an OME-Zarr "
        "(uint8 probabilities + labels/prediction). Rerunning the same command resumes.",
    )
    p.add_argument(
        "model",
        help="nnU-Net trained-model folder, exported zip, or a built-in model name (`scrollseg models`)",
    )
    p.add_argument("volume", help="input volume (OME-Zarr, zarr, TIFF folder/file, file.h5:/ds)")
    p.add_argument("out", help="output .zarr path")
    p.add_argument("--step", type=float, default=0.5, help="tile step (fraction of the patch)")
    p.add_argument(
        "--mirror",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="nnU-Net's mirroring test-time augmentation (default: on)",
    )
    p.add_argument("--folds", default=None, help="folds to ensemble, e.g. 0,1 or all")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: best)")
    p.add_argument("--chunk", type=_chunk_arg, default=None, help="output chunk: N or Z,Y,X")
    p.add_argument(
        "--superchunk",
        type=_shape,
        default=None,
        help="share partial sums only within groups of N chunks per axis: bounds scratch "
        "disk, reruns tiles on group borders (default: whole volume, each tile once)",
    )
    p.add_argument("--batch-size", type=_shape, default=4, help="tiles per network batch")
    p.add_argument(
        "--half",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="autocast (float16 on CUDA); default: on CUDA only, as nnU-Net's predictor",
    )
    p.add_argument("--roi", default=None, help="z0:z1,y0:y1,x0:x1: predict this box only")
    p.add_argument("--mask", default=None, help="skip tiles where this mask volume is empty")
    p.add_argument("--threads", type=_shape, default=3, help="threads of the local scheduler")
    p.add_argument("--prob-reduction", default="mean", choices=["mean", "max", "nearest"])
    p.add_argument("--label-reduction", default="mode", choices=["mode", "max", "nearest"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing prediction")
    p.add_argument(
        "--ignore-spacing",
        action="store_true",
        help="predict even if the volume's spacing differs from the model's (no resampling)",
    )
    dist = p.add_argument_group("distributed (dask.distributed)")
    where = dist.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, help="address of a running dask scheduler")
    where.add_argument("--cluster", choices=["local", "local-cuda", "slurm"], default=None)
    dist.add_argument("--workers", type=_shape, default=2, help="local workers / SLURM jobs")
    dist.add_argument("--queue", default=None, help="SLURM partition")
    dist.add_argument("--account", default=None, help="SLURM account")
    dist.add_argument("--walltime", default="04:00:00", help="SLURM job walltime")
    dist.add_argument("--job-cores", type=_shape, default=8, help="cores per SLURM job")
    dist.add_argument("--job-memory", default="64GB", help="memory per SLURM job")
    dist.add_argument(
        "--job-extra", action="append", default=[], help="extra #SBATCH line, e.g. --gres=gpu:1"
    )


def _run_predict(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.predict_volume import open_client, predict_volume

    events = []
    lines = None if sys.stderr.isatty() else _LineProgress()

    def progress(ev) -> None:
        events.append(ev)
        if lines is not None:
            lines(ev)

    with open_client(
        scheduler=args.scheduler,
        cluster=args.cluster,
        workers=args.workers,
        queue=args.queue,
        account=args.account,
        walltime=args.walltime,
        job_cores=args.job_cores,
        job_memory=args.job_memory,
        job_extra=args.job_extra,
    ) as client:
        out = predict_volume(
            args.model,
            args.volume,
            args.out,
            progress=progress,
            bar=lines is None,
            folds=args.folds,
            checkpoint=args.checkpoint,
            device=args.device,
            step=args.step,
            mirror=args.mirror,
            half=args.half,
            batch_size=args.batch_size,
            chunk=args.chunk[0] if args.chunk and len(args.chunk) == 1 else args.chunk,
            superchunk=args.superchunk,
            roi=args.roi,
            mask=args.mask,
            overwrite=args.overwrite,
            ignore_spacing=args.ignore_spacing,
            prob_reduction=args.prob_reduction,
            label_reduction=args.label_reduction,
            num_workers=args.threads,
            client=client,
        )
    ev = events[-1]
    print(
        f"wrote {out}: {ev.chunks_total} chunks ({ev.chunks_resumed} resumed, "
        f"{ev.chunks_computed} computed now), {ev.tiles_total} tiles for {ev.grid_tiles} of "
        f"nnU-Net's grid ({ev.tiles_computed} run now, {ev.tiles_skipped} skipped by the "
        f"mask) in {ev.elapsed_s:.1f} s"
    )
    return 0


# -- export -------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    from napari_scrollseg.engine.dataset import ENDINGS, NORMS

    p = sub.add_parser("export", help="annotations -> nnU-Net v2 raw dataset Dataset<ID>_<Name>")
    p.add_argument("--image", action="append", required=True, help="image volume (repeatable)")
    p.add_argument(
        "--labels",
        action="append",
        required=True,
        help="annotation store or label volume for the --image in the same position",
    )
    p.add_argument(
        "--classes", required=True, help="class names for ids 1..K (air,papyrus,ink) or a .json"
    )
    p.add_argument("--out", required=True, help="nnU-Net raw folder (nnUNet_raw)")
    p.add_argument("--dataset-id", type=int, required=True)
    p.add_argument("--name", required=True, help="dataset name (letters, digits, '-')")
    p.add_argument(
        "--margin", type=int, nargs="+", default=None, help="voxels around the annotations (1 or 3)"
    )
    p.add_argument("--norm", choices=list(NORMS), default="CT")
    p.add_argument("--ending", choices=list(ENDINGS), default=".tif")
    p.add_argument("--append", action="store_true", help="add cases to an existing dataset")
    p.add_argument("--folds", type=int, default=None, help="fail if fewer cases than folds")
    p.add_argument("--verify", action="store_true", help="run nnU-Net's integrity check after")
    p.add_argument(
        "--ignore-spacing",
        action="store_true",
        help="export even if an image's and its labels' spacings differ (the image's is used)",
    )


def _run_export(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.annotations import ClassTable
    from napari_scrollseg.engine.dataset import export_dataset, verify_dataset

    if len(args.image) != len(args.labels):
        raise ScrollsegError(
            f"{len(args.image)} --image but {len(args.labels)} --labels: give one --labels per --image"
        )
    if args.classes.endswith(".json"):
        classes = ClassTable.from_json(args.classes)
    else:
        classes = ClassTable.from_names(args.classes)
    margin = None
    if args.margin is not None:
        if len(args.margin) not in (1, 3):
            raise ScrollsegError("--margin takes one value or three (z y x)")
        margin = args.margin[0] if len(args.margin) == 1 else tuple(args.margin)
    out = export_dataset(
        list(zip(args.image, args.labels)),
        out_dir=args.out,
        dataset_id=args.dataset_id,
        name=args.name,
        classes=classes,
        margin=margin,
        norm=args.norm,
        ending=args.ending,
        append=args.append,
        folds=args.folds,
        on_case=lambda i, name: print(f"case {i + 1}/{len(args.image)}: {name}", flush=True),
        ignore_spacing=args.ignore_spacing,
    )
    if args.verify:
        verify_dataset(out)
        print("nnU-Net integrity check passed")
    print(f"wrote {out}")
    return 0


# -- train --------------------------------------------------------------------------------
def _fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fold is a number or 'all', got {text!r}") from None


def _add_train(sub: argparse._SubParsersAction) -> None:
    from napari_scrollseg.engine.train import PLANNERS

    p = sub.add_parser(
        "train",
        help="plan, preprocess and train nnU-Net on an exported dataset (sparse-aware)",
        description="Plan, preprocess and train nnU-Net v2 on an exported Dataset<ID>_<Name> "
        "folder. The model folder (stock nnU-Net layout) is printed at the end.",
    )
    p.add_argument("dataset", help="the Dataset<ID>_<Name> folder written by `scrollseg export`")
    p.add_argument("--out", required=True, help="results folder (nnUNet_results)")
    p.add_argument("--config", default="3d_fullres", help="nnU-Net configuration (%(default)s)")
    p.add_argument(
        "--fold",
        nargs="+",
        type=_fold,
        default=[0],
        help="fold(s) to train, or 'all' (0; 'all' by itself when there is only one case)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None, help="default: best")
    p.add_argument("--epochs", type=_shape, default=None, help="epochs (nnU-Net: 1000)")
    p.add_argument("--iterations", type=_shape, default=None, help="iterations/epoch (250)")
    p.add_argument("--planner", choices=PLANNERS, default="default")
    p.add_argument(
        "-np",
        "--num-processes",
        type=_shape,
        default=2,
        dest="num_processes",
        help="processes for fingerprint and preprocessing (%(default)s)",
    )
    p.add_argument(
        "--da-processes",
        type=int,
        default=None,
        help="data-augmentation processes (0: in the training process)",
    )
    p.add_argument(
        "--resume",
        "--continue",
        "--c",
        action="store_true",
        dest="resume",
        help="continue from the latest checkpoint",
    )
    p.add_argument(
        "--plans-overrides",
        default=None,
        metavar="JSON",
        help='network/patch changes, e.g. \'{"n_stages": 3, "features_per_stage": '
        '[4, 8, 16], "patch_size": [32, 64, 64]}\'',
    )
    p.add_argument("--plans-name", default=None, help="name of the overridden plans")
    p.add_argument(
        "--validate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run nnU-Net's validation of each fold at the end (default: on; --no-validate "
        "skips it: faster, but no validation Dice)",
    )
    p.add_argument("--preprocessed", default=None, help="nnUNet_preprocessed (default: OUT/...)")


def _run_train(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    from napari_scrollseg.engine.train import train

    overrides = None
    if args.plans_overrides:
        try:
            overrides = json.loads(args.plans_overrides)
        except json.JSONDecodeError as exc:
            raise ScrollsegError(f"--plans-overrides is not valid JSON: {exc}") from exc
        if not isinstance(overrides, dict):
            raise ScrollsegError("--plans-overrides must be a JSON object")
    bar = None
    try:
        for ev in train(
            args.dataset,
            results_dir=args.out,
            configuration=args.config,
            folds=args.fold,
            device=args.device,
            epochs=args.epochs,
            iterations=args.iterations,
            planner=args.planner,
            num_processes=args.num_processes,
            da_processes=args.da_processes,
            resume=args.resume,
            validate=args.validate,
            plans_overrides=overrides,
            plans_name=args.plans_name,
            preprocessed_dir=args.preprocessed,
        ):
            if not sys.stderr.isatty():  # a log file: plain lines, no \r bar
                print(ev, flush=True)
            elif ev.kind == "epoch":
                if bar is None:
                    bar = tqdm(
                        total=ev.epochs, initial=ev.epoch, unit="epoch", desc=f"fold {ev.fold}"
                    )
                bar.update(ev.epoch + 1 - bar.n)
                bar.set_postfix(loss=f"{ev.train_loss:.3f}", val=f"{ev.val_loss:.3f}")
                tqdm.write(str(ev))
            else:
                if bar is not None and ev.kind in ("fold_done", "done"):
                    bar.close()
                    bar = None
                tqdm.write(str(ev))
    finally:
        if bar is not None:
            bar.close()
    return 0


# -- evaluate -----------------------------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice, F0.5, precision, recall and confusion matrix per class of a prediction",
        description="Score a prediction (a `scrollseg predict` output or a label volume) "
        "against ground truth labels (ids 1..K; 0 = unlabeled and the dtype's maximum = "
        "ignore are skipped). Streams block by block.",
    )
    p.add_argument("pred", help="`scrollseg predict` output (.zarr) or a label volume")
    p.add_argument("truth", help="truth labels, e.g. PHANTOM.zarr/labels/truth or a label TIFF")
    p.add_argument("--roi", default=None, help="z0:z1,y0:y1,x0:x1: score this box only")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the scores as JSON")
    p.add_argument("--threads", type=_shape, default=None, help="reading threads")


def _run_evaluate(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.evaluate import evaluate, format_table, write_json

    result = evaluate(args.pred, args.truth, roi=args.roi, num_workers=args.threads)
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0


# -- models -------------------------------------------------------------------------------
def _add_models(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("models", help="list the built-in models: NAME PATH")


def _run_models(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.builtin import builtin_models

    for name, path in builtin_models().items():
        print(f"{name} {path}")
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "info": (_add_info, _run_info),
    "phantom": (_add_phantom, _run_phantom),
    "demo": (_add_demo, _run_demo),
    "predict": (_add_predict, _run_predict),
    "export": (_add_export, _run_export),
    "train": (_add_train, _run_train),
    "models": (_add_models, _run_models),
    "evaluate": (_add_evaluate, _run_evaluate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scrollseg",
        description="Segment huge 3D X-ray CT scans with nnU-Net v2 (napari-scrollseg engine).",
    )
    parser.add_argument("--version", action="version", version=f"scrollseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.verbose or args.debug):  # dask.distributed's INFO lines only with -v
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        if "dask" in sys.modules:
            sys.modules["dask"].config.refresh()
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    run = COMMANDS[args.command][1]
    try:
        return run(args)
    except ScrollsegError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
