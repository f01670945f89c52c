"""One validated, frozen options object per action: defaults and help text in one place.

The command line builds its options from these classes (:func:`options`), the Python API
takes them (or their fields as keywords), and what a run hashes for resume comes from
them. A bad value raises one :class:`~napari_scrollseg.engine.errors.ScrollsegError`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.dataset import ENDINGS, NORMS
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.train import PLANNERS
from napari_scrollseg.nnunet_trainers.sampling import SAMPLINGS

if TYPE_CHECKING:
    from napari_scrollseg.engine.volumes import Volume

__all__ = [
    "DEFAULT_CHUNK",
    "ExportConfig",
    "Option",
    "PredictConfig",
    "TrainConfig",
    "options",
    "parse_folds",
    "parse_roi",
    "positive_int",
]

DEFAULT_CHUNK = 128
PROB_REDUCTIONS = ("mean", "max", "nearest")
LABEL_REDUCTIONS = ("mode", "max", "nearest")
Span = tuple[int, int]


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line (``parse`` converts its text)."""

    name: str
    default: Any
    help: str
    flag: str
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a yes/no option (``bool`` or ``bool | None``)
    required: bool = False
    nargs: str | None = None
    aliases: tuple[str, ...] = ()


def _opt(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    nargs: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    meta = {
        "help": help,
        "flag": flag,
        "parse": parse,
        "choices": choices,
        "nargs": nargs,
        "aliases": aliases,
    }
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def options(config: type) -> list[Option]:
    """The command-line options of a config class, in field order."""
    return [
        Option(
            name=f.name,
            default=f.default,
            help=f.metadata["help"],
            flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"),
            parse=f.metadata["parse"],
            choices=f.metadata["choices"],
            switch=str(f.type) in ("bool", "bool | None"),
            required=f.default is dataclasses.MISSING,
            nargs=f.metadata["nargs"],
            aliases=f.metadata["aliases"],
        )
        for f in dataclasses.fields(config)
        if "help" in f.metadata
    ]


# -- parsers shared by the configs and the command line --------------------------------------
def positive_int(value: Any) -> int:
    """An int >= 1 (text or number); ``ValueError`` otherwise (argparse reports it)."""
    n = int(value)
    if n < 1 or n != float(value):
        raise ValueError(f"must be a positive integer, got {value}")
    return n


def parse_folds(text: str | Sequence[int | str] | None) -> tuple[int | str, ...] | None:
    """``"0,1"`` / ``"all"`` / ``[0, 1]`` to a folds tuple (``None`` = every fold found)."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    folds: list[int | str] = []
    for item in items:
        item = str(item).strip()
        if item == "all":
            folds.append("all")
        elif item.isdigit():
            folds.append(int(item))
        else:
            raise ScrollsegError(f"fold {item!r} is neither a number nor 'all'")
    return tuple(folds)


def parse_roi(text: str | None, shape: Sequence[int]) -> tuple[Span, ...]:
    """``"z0:z1,y0:y1,x0:x1"`` (ends may be empty or negative) to spans inside ``shape``."""
    if not text:
        return tuple((0, int(s)) for s in shape)
    parts = text.split(",")
    if len(parts) != len(shape):
        raise ScrollsegError(
            f"--roi {text!r} needs {len(shape)} ranges like z0:z1,y0:y1,x0:x1 (one per axis)"
        )
    spans = []
    for part, size in zip(parts, shape):
        try:
            sl = slice(*(int(v) if v.strip() else None for v in part.split(":")))
        except (ValueError, TypeError):
            raise ScrollsegError(f"--roi range {part!r} is not start:stop with integers") from None
        if any(v is not None and not -size <= v <= size for v in (sl.start, sl.stop)):
            raise ScrollsegError(
                f"--roi range {part!r} reaches beyond the volume's axis of size {size}; "
                "give a box inside the volume"
            )
        start, stop, step = sl.indices(int(size))
        if step != 1 or stop <= start:
            raise ScrollsegError(
                f"--roi range {part!r} is empty or stepped inside an axis of size {size}"
            )
        spans.append((start, stop))
    return tuple(spans)


def chunk_shape(chunk: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """One chunk size or ``ndim`` of them (default :data:`DEFAULT_CHUNK`) as a tuple."""
    if chunk is None:
        chunk = DEFAULT_CHUNK
    chunks = (int(chunk),) * ndim if np.isscalar(chunk) else tuple(int(c) for c in chunk)
    if len(chunks) != ndim or min(chunks) < 1:
        raise ScrollsegError(f"chunk {chunk!r} must be one positive size or {ndim} of them")
    return chunks


def _chunk_text(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected N or Z,Y,X, got {text!r}") from None
    if len(values) not in (1, 3) or min(values) < 1:
        raise ValueError(f"expected N or Z,Y,X positive sizes, got {text!r}")
    return values[0] if len(values) == 1 else values


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ScrollsegError(message)


# -- prediction ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictConfig:
    """Options of a whole-volume prediction (:func:`~napari_scrollseg.engine.predict.
    iter_predict_volume`); each field's one-line help is its command-line help.

    ``folds``, ``checkpoint``, ``device``, ``step``, ``mirror``, ``half`` and
    ``batch_size`` are as nnU-Net's predictor (``folds`` normalised to a tuple; None:
    every fold found; ``half`` None autocasts on CUDA devices only, as nnU-Net, each
    worker deciding for its own device). ``chunk`` is the output chunk (one size or
    three), also the size of the blocks of tiles. ``superchunk`` shares partial sums only
    inside groups of that many chunks per axis: tiles straddling two groups run once for
    each, which bounds the scratch disk held by partial sums (whole volume: about one
    slab of blocks) at the cost of extra tiles (``tiles_total / grid_tiles``). ``roi``
    (text or spans) predicts a box only, with tiles from the whole grid. ``mask`` (a
    volume of the same shape or a coarser level of it) skips tiles under an all-zero
    mask; voxels where it is zero get no prediction. ``overwrite`` replaces a scrollseg
    prediction made with other options; ``ignore_spacing`` predicts although the
    volume's spacing differs from the model's (no resampling). ``prob_reduction`` and
    ``label_reduction`` make the pyramid (:func:`~napari_scrollseg.engine.omezarr.
    write_pyramid`); ``num_workers`` are the threads of the local scheduler (reading and
    writing overlap the forward pass).
    """

    step: float = _opt(0.5, "tile step (fraction of the patch)", parse=float)
    mirror: bool = _opt(True, "nnU-Net's mirroring test-time augmentation (default: on)")
    folds: tuple[int | str, ...] | None = _opt(None, "folds to ensemble, e.g. 0,1 or all")
    checkpoint: str = _opt("checkpoint_final.pth", "checkpoint file of each fold (%(default)s)")
    device: str | None = _opt(None, "cpu, cuda, cuda:N, mps (default: best)")
    chunk: int | tuple[int, ...] | None = _opt(
        None, f"output chunk: N or Z,Y,X (default: {DEFAULT_CHUNK})", parse=_chunk_text
    )
    superchunk: int | None = _opt(
        None,
        "share partial sums only within groups of N chunks per axis: bounds scratch disk, "
        "reruns tiles on group borders (default: whole volume, each tile once)",
        parse=positive_int,
    )
    batch_size: int = _opt(4, "tiles per network batch", parse=positive_int)
    half: bool | None = _opt(
        None, "autocast (float16 on CUDA); default: on CUDA only, as nnU-Net's predictor"
    )
    roi: str | tuple[Span, ...] | None = _opt(None, "z0:z1,y0:y1,x0:x1: predict this box only")
    mask: str | os.PathLike | Volume | None = _opt(
        None, "skip tiles where this mask volume is empty"
    )
    num_workers: int = _opt(
        3, "threads of the local scheduler", flag="--threads", parse=positive_int
    )
    prob_reduction: str = _opt(
        "mean", "pyramid reduction of the probabilities", choices=PROB_REDUCTIONS
    )
    label_reduction: str = _opt("mode", "pyramid reduction of the labels", choices=LABEL_REDUCTIONS)
    overwrite: bool = _opt(False, "replace an existing prediction")
    ignore_spacing: bool = _opt(
        False, "predict even if the volume's spacing differs from the model's (no resampling)"
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "folds", parse_folds(self.folds))
        _check(
            isinstance(self.step, (int, float)) and 0 < self.step <= 1,
            f"step must be in (0, 1], got {self.step}",
        )
        _check(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        _check(self.num_workers >= 1, f"threads must be at least 1, got {self.num_workers}")
        _check(
            self.superchunk is None or self.superchunk >= 1,
            f"superchunk must be at least 1, got {self.superchunk}",
        )
        if self.chunk is not None and not np.isscalar(self.chunk):
            set_(self, "chunk", tuple(int(c) for c in self.chunk))
        chunk_shape(self.chunk, 3)
        for name, allowed in (
            ("prob_reduction", PROB_REDUCTIONS),
            ("label_reduction", LABEL_REDUCTIONS),
        ):
            value = getattr(self, name)
            _check(value in allowed, f"unknown {name} {value!r}; use one of {', '.join(allowed)}")

    @property
    def chunks(self) -> tuple[int, int, int]:
        """The output chunk shape ``(z, y, x)``."""
        return chunk_shape(self.chunk, 3)  # type: ignore[return-value]

    def replace(self, **changes: Any) -> PredictConfig:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def provenance(self, **run: Any) -> dict:
        """What a run hashes for resume and records in its output: these options that
        change the answer or the layout, with the run's facts ``run`` (model, volume,
        ROI spans, mask source)."""
        return {
            **run,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "tta": "mirror" if self.mirror else "none",
            "half": "auto" if self.half is None else self.half,  # auto: on CUDA workers
            "chunk": list(self.chunks),
            "superchunk": self.superchunk,
        }


# -- export ----------------------------------------------------------------------------------
REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class ExportConfig:
    """Options of an export to an nnU-Net raw dataset (:func:`~napari_scrollseg.engine.
    dataset.export_dataset`); ``classes`` becomes a :class:`ClassTable` (from names, a
    comma-separated text or a ``.json`` class table)."""

    classes: Any = _opt(REQUIRED, "class names for ids 1..K (air,papyrus,ink) or a .json")
    out_dir: str | os.PathLike = _opt(REQUIRED, "nnU-Net raw folder (nnUNet_raw)", flag="--out")
    dataset_id: int = _opt(REQUIRED, "nnU-Net dataset ID, 1..999", parse=int)
    name: str = _opt(REQUIRED, "dataset name (letters, digits, '-')")
    margin: int | tuple[int, ...] | None = _opt(
        None, "voxels around the annotations (1 or 3)", parse=int, nargs="+"
    )
    norm: str = _opt("CT", "nnU-Net normalization of the channel", choices=tuple(NORMS))
    ending: str = _opt(".tif", "file format of the images", choices=ENDINGS)
    append: bool = _opt(False, "add cases to an existing dataset")
    folds: int | None = _opt(None, "fail if fewer cases than folds", parse=int)
    ignore_spacing: bool = _opt(
        False, "export even if an image's and its labels' spacings differ (the image's is used)"
    )

    def __post_init__(self) -> None:
        from napari_scrollseg.engine.annotations import ClassTable
        from napari_scrollseg.engine.dataset import _check_options, _margins

        classes = self.classes
        if isinstance(classes, str):
            is_json = classes.endswith(".json")
            classes = ClassTable.from_json(classes) if is_json else ClassTable.from_names(classes)
        elif not isinstance(classes, ClassTable):
            classes = ClassTable.from_names(list(classes))
        object.__setattr__(self, "classes", classes)
        margin = self.margin
        if isinstance(margin, (list, tuple)) and len(margin) == 1:
            margin = margin[0]
        if isinstance(margin, list):
            margin = tuple(margin)
        if margin is not None and np.ndim(margin) and len(margin) not in (1, 3):
            raise ScrollsegError("--margin takes one value or three (z y x)")
        object.__setattr__(self, "margin", margin)
        _check_options(
            classes, dataset_id=self.dataset_id, name=self.name, norm=self.norm, ending=self.ending
        )
        _margins(margin)
        _check(self.folds is None or self.folds >= 1, f"folds must be at least 1, got {self.folds}")

    def kwargs(self) -> dict:
        """The options as keywords of :func:`~napari_scrollseg.engine.dataset.
        iter_export_dataset`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# -- training --------------------------------------------------------------------------------
TRAIN_DEVICES = ("cpu", "cuda", "mps")


def _fold(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"a fold is a number or 'all', got {text!r}") from None


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class TrainConfig:
    """Options of a training run (:func:`~napari_scrollseg.engine.train.train`);
    ``plans_overrides`` may be given as JSON text."""

    configuration: str = _opt("3d_fullres", "nnU-Net configuration (%(default)s)", flag="--config")
    folds: tuple[int | str, ...] = _opt(
        (0,),
        "fold(s) to train, or 'all' (0; 'all' by itself when there are fewer cases than folds)",
        flag="--fold",
        parse=_fold,
        nargs="+",
    )
    device: str | None = _opt(None, "default: best", choices=TRAIN_DEVICES)
    epochs: int | None = _opt(None, "epochs (nnU-Net: 1000)", parse=positive_int)
    iterations: int | None = _opt(None, "iterations/epoch (250)", parse=positive_int)
    planner: str = _opt("default", "nnU-Net experiment planner", choices=PLANNERS)
    num_processes: int = _opt(
        2,
        "processes for fingerprint and preprocessing (%(default)s)",
        parse=positive_int,
        aliases=("-np",),
    )
    da_processes: int | None = _opt(
        None, "data-augmentation processes (0: in the training process)", parse=int
    )
    resume: bool = _opt(False, "continue from the latest checkpoint", aliases=("--continue", "--c"))
    validate: bool = _opt(True, "nnU-Net's validation of each fold at the end (default: on)")
    plans_overrides: dict | None = _opt(
        None,
        'network/patch changes, e.g. \'{"n_stages": 3, "features_per_stage": '
        '[4, 8, 16], "patch_size": [32, 64, 64]}\'',
    )
    plans_name: str | None = _opt(None, "name of the overridden plans")
    preprocessed_dir: str | os.PathLike | None = _opt(
        None, "nnUNet_preprocessed (default: OUT/...)", flag="--preprocessed"
    )
    pretrained_weights: str | os.PathLike | None = _opt(
        None,
        "checkpoint to fine-tune from (nnU-Net's -pretrained_weights; the segmentation "
        "heads too when the classes match)",
    )
    learning_rate: float | None = _opt(None, "initial learning rate (nnU-Net: 0.01)", parse=float)
    sampling: str = _opt(
        "balanced",
        "random patches' anchors with sparse labels: balanced (every class as often, for "
        "rare classes) or nnunet (nnU-Net's shares: a rare class over-predicted less)",
        choices=tuple(SAMPLINGS),
    )
    seed: int | None = _opt(
        None,
        "seed the training's random generators (reproducible with --da-processes 0)",
        parse=int,
    )

    def __post_init__(self) -> None:
        import json

        set_ = object.__setattr__
        folds = [self.folds] if isinstance(self.folds, (int, str)) else self.folds
        set_(self, "folds", tuple(f if f == "all" else int(f) for f in folds))
        for name in ("epochs", "iterations"):
            value = _optional_int(getattr(self, name))
            _check(value is None or value >= 1, f"{name} must be at least 1, got {value}")
        _check(
            self.device in (None, "auto", *TRAIN_DEVICES),
            f"unknown device {self.device!r}: use cpu, cuda or mps",
        )
        overrides = self.plans_overrides
        if isinstance(overrides, str):
            try:
                overrides = json.loads(overrides)
            except json.JSONDecodeError as exc:
                raise ScrollsegError(f"--plans-overrides is not valid JSON: {exc}") from exc
            _check(isinstance(overrides, dict), "--plans-overrides must be a JSON object")
            set_(self, "plans_overrides", overrides)

    def kwargs(self) -> dict:
        """The options as keywords of :func:`~napari_scrollseg.engine.train.train`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
