"""The ``scrollseg`` command: a thin shell over the engine.

Each subcommand has an ``_add_<name>`` (its arguments) and a ``_run_<name>``
(one engine call). Errors the user can fix (:class:`ScrollsegError`) are printed
as one ``error: ...`` line on stderr with exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

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
    from napari_scrollseg.engine.volumes import check_chunks, describe, open_volume

    volume = open_volume(args.path)
    check_chunks(volume)  # a damaged first or last chunk shows here, not in a long run
    print(describe(volume))
    return 0


def _dask_progress():
    """dask's progress bar on a terminal; on a log file, nothing (no \\r updates)."""

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    from napari_scrollseg.engine.dask_compute import thread_callbacks

    return thread_callbacks(ProgressBar(minimum=2, dt=0.5, out=sys.stderr))


class _Lines:
    """Plain progress lines, at most one every ``every`` seconds (for logs and pipes)."""

    def __init__(self, every: float = 10.0) -> None:
        import time

        self._clock = time.monotonic
        self.every, self._last = every, -float("inf")

    def due(self, final: bool = False) -> bool:
        """True when a line is due: the first, a final one, or ``every`` s after the last."""
        now = self._clock()
        if not final and now - self._last < self.every:
            return False
        self._last = now
        return True


class _LineProgress(_Lines):
    """``scrollseg predict`` off a terminal: chunks, tiles and tiles/s as plain lines."""

    def __call__(self, ev) -> None:
        last_chunk = ev.stage == "predict" and ev.chunks_done == ev.chunks_total
        if not self.due(final=ev.stage in ("pyramid", "done") or last_chunk):
            return
        print(
            f"predict {ev.stage}: {ev.chunks_done}/{ev.chunks_total} chunks, "
            f"{ev.tiles_done}/{ev.tiles_total} tiles, {ev.tiles_per_s:.2f} tiles/s, "
            f"{ev.elapsed_s:.0f} s",
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


# -- options from the engine's config classes -------------------------------------------------
def _argtype(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``parse`` for argparse: its ValueError message becomes argparse's error."""
    if parse in (int, float, str):
        return parse

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def add_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, config: type) -> None:
    """One option per field of an engine config class (flag, type, default, help)."""
    from napari_scrollseg.engine.config import options

    for opt in options(config):
        kw: dict = {"help": opt.help, "dest": opt.name}
        if opt.required:
            kw["required"] = True
        else:
            kw["default"] = opt.default
        if opt.switch:  # --x / --no-x, or --x alone when off by default
            kw["action"] = "store_true" if opt.default is False else argparse.BooleanOptionalAction
        else:
            kw["metavar"] = opt.flag.removeprefix("--").upper().replace("-", "_")
            if opt.parse is not None:
                kw["type"] = _argtype(opt.parse)
            if opt.choices:
                kw["choices"] = list(opt.choices)
                del kw["metavar"]
            if opt.nargs:
                kw["nargs"] = opt.nargs
        p.add_argument(*opt.aliases[:1], opt.flag, *opt.aliases[1:], **kw)


# -- predict ------------------------------------------------------------------------------
def _add_predict(sub: argparse._SubParsersAction) -> None:
    from napari_scrollseg.engine.config import PredictConfig
    from napari_scrollseg.engine.predict.schedule import CLUSTERS

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
    add_options(p, PredictConfig)
    dist = p.add_argument_group("distributed (dask.distributed)")
    where = dist.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, help="address of a running dask scheduler")
    where.add_argument("--cluster", choices=list(CLUSTERS), default=None)
    dist.add_argument("--workers", type=_shape, default=2, help="local workers / SLURM jobs")
    dist.add_argument("--queue", default=None, help="SLURM partition")
    dist.add_argument("--account", default=None, help="SLURM account")
    dist.add_argument("--walltime", default="04:00:00", help="SLURM job walltime")
    dist.add_argument("--job-cores", type=_shape, default=8, help="cores per SLURM job")
    dist.add_argument("--job-memory", default="64GB", help="memory per SLURM job")
    dist.add_argument(
        "--job-extra", action="append", default=[], help="extra #SBATCH line, e.g. --gres=gpu:1"
    )


def _config_from(args: argparse.Namespace, config: type) -> object:
    """The config object of the parsed options (validated: a bad value is one error)."""
    from napari_scrollseg.engine.config import options

    return config(**{opt.name: getattr(args, opt.name) for opt in options(config)})


def _run_predict(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.config import PredictConfig
    from napari_scrollseg.engine.predict import predict_volume
    from napari_scrollseg.engine.predict.schedule import open_client

    config = _config_from(args, PredictConfig)
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
            config,
            progress=progress,
            bar=lines is None,
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
    from napari_scrollseg.engine.config import ExportConfig

    p = sub.add_parser("export", help="annotations -> nnU-Net v2 raw dataset Dataset<ID>_<Name>")
    p.add_argument("--image", action="append", required=True, help="image volume (repeatable)")
    p.add_argument(
        "--labels",
        action="append",
        required=True,
        help="annotation store or label volume for the --image in the same position",
    )
    add_options(p, ExportConfig)
    p.add_argument("--verify", action="store_true", help="run nnU-Net's integrity check after")


def _run_export(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.config import ExportConfig
    from napari_scrollseg.engine.dataset import export_dataset, verify_dataset

    if len(args.image) != len(args.labels):
        raise ScrollsegError(
            f"{len(args.image)} --image but {len(args.labels)} --labels: give one --labels per --image"
        )
    out = export_dataset(
        list(zip(args.image, args.labels)),
        _config_from(args, ExportConfig),
        on_case=lambda i, name: print(f"case {i + 1}/{len(args.image)}: {name}", flush=True),
    )
    if args.verify:
        verify_dataset(out)
        print("nnU-Net integrity check passed")
    print(f"wrote {out}")
    return 0


# -- train --------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    from napari_scrollseg.engine.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="plan, preprocess and train nnU-Net on an exported dataset (sparse-aware)",
        description="Plan, preprocess and train nnU-Net v2 on an exported Dataset<ID>_<Name> "
        "folder. The model folder (stock nnU-Net layout) is printed at the end.",
    )
    p.add_argument("dataset", help="the Dataset<ID>_<Name> folder written by `scrollseg export`")
    p.add_argument("--out", required=True, help="results folder (nnUNet_results)")
    p.add_argument(
        "--follow",
        action="store_true",
        help="follow this dataset's training left running (napari's 'Leave it running') "
        "instead of starting one: its epochs so far, then new ones until it ends; Ctrl-C "
        "stops following, the training goes on",
    )
    add_options(p, TrainConfig)


def _run_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from napari_scrollseg.engine.config import TrainConfig
    from napari_scrollseg.engine.progress import drive
    from napari_scrollseg.engine.train import train

    config = _config_from(args, TrainConfig)

    def bar(ev: object) -> dict | None:
        if not sys.stderr.isatty():  # a log file: plain lines, no \r bar
            print(ev, flush=True)
            return None
        tqdm.write(str(ev))
        if ev.kind == "epoch":
            return {
                "unit": "epoch",
                "desc": f"fold {ev.fold}",
                "total": ev.epochs,
                "n": ev.epoch + 1,
                "postfix": {"loss": f"{ev.train_loss:.3f}", "val": f"{ev.val_loss:.3f}"},
            }
        return {"close": True} if ev.kind in ("fold_done", "done") else None

    if args.follow:
        from napari_scrollseg.engine.train_follow import follow

        events = follow(args.dataset, args.out)
    else:
        events = train(args.dataset, results_dir=args.out, **config.kwargs())
    drive(events, bar=bar)
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

    with _evaluate_progress() as progress:
        result = evaluate(
            args.pred, args.truth, roi=args.roi, num_workers=args.threads, progress=progress
        )
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0


@contextlib.contextmanager
def _evaluate_progress():
    """A progress callback for :func:`evaluate`: a tqdm bar on a terminal, else plain lines."""
    import time

    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        with tqdm(unit="block", desc="evaluate", dynamic_ncols=True) as bar:

            def update(done: int, total: int) -> None:
                bar.total, bar.n = total, done
                bar.refresh()

            yield update
        return
    lines, t0 = _Lines(), time.monotonic()

    def line(done: int, total: int) -> None:
        if lines.due(final=done == total):
            print(f"evaluate: {done}/{total} blocks, {time.monotonic() - t0:.0f} s", flush=True)

    yield line


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
    previous = _on_sigterm()
    try:
        return run(args)
    except ScrollsegError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        print("error: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that workers are stopped and outputs left whole."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _on_sigterm() -> Any:
    """Turn SIGTERM into :class:`_Terminated` (main thread only); return the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
