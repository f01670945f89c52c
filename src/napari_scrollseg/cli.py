"""The ``scrollseg`` command: a thin shell over the engine.

Each subcommand has an ``_add_<name>`` (its arguments) and a ``_run_<name>``
(one engine call). Errors the user can fix (:class:`ScrollsegError`) are printed
as one ``error: ...`` line on stderr with exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
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
    p.add_argument("path", help="OME-Zarr / zarr (path or URL), slice-TIFF folder, TIFF, file.h5:/dataset")


def _run_info(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.volumes import describe, open_volume

    print(describe(open_volume(args.path)))
    return 0


# -- phantom ------------------------------------------------------------------------------
def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write the synthetic scroll phantom as OME-Zarr")
    p.add_argument("out", help="output .zarr path")
    p.add_argument("--shape", nargs=3, type=_shape, metavar=("Z", "Y", "X"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _run_phantom(args: argparse.Namespace) -> int:
    from napari_scrollseg.engine.phantom import DEFAULT_SHAPE, write_phantom

    out = write_phantom(
        args.out, args.shape or DEFAULT_SHAPE, seed=args.seed, overwrite=args.overwrite
    )
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


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "info": (_add_info, _run_info),
    "phantom": (_add_phantom, _run_phantom),
    "demo": (_add_demo, _run_demo),
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
