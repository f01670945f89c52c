"""Subprocess entry point that runs nnU-Net for :mod:`napari_scrollseg.engine.train`.

``python -m napari_scrollseg.engine._train_worker plan|train ...`` with the
``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` environment set by the
parent. Progress goes to stdout as lines ``MARKER + json``; everything else nnU-Net
prints passes through. SIGTERM stops training at the next iteration and saves
``checkpoint_latest.pth`` so that a resume continues from there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from napari_scrollseg.nnunet_trainers.sampling import SAMPLINGS

if TYPE_CHECKING:
    from collections.abc import Sequence

MARKER = "\x1escrollseg-event "
#: the parent sends this to leave the worker running alone (see :func:`_detach`)
DETACH_SIGNAL = getattr(signal, "SIGUSR1", None)  # None: not on this system (Windows)
#: ``fold_X/<PID_FILE>``: the process training that fold, while it runs
PID_FILE = "training.pid"
#: tests only: ``oom`` makes the first training step raise torch.OutOfMemoryError
FAULT_ENV = "SCROLLSEG_TRAIN_FAULT"
_detached = threading.Event()
PLANNERS = {
    "default": "ExperimentPlanner",
    "resenc-m": "nnUNetPlannerResEncM",
    "resenc-l": "nnUNetPlannerResEncL",
    "resenc-xl": "nnUNetPlannerResEncXL",
}
log = logging.getLogger(__name__)


def emit(kind: str, **fields) -> None:
    """Write one progress event line for the parent process (once detached, to the log,
    where :func:`napari_scrollseg.engine.train_follow.follow` reads it)."""
    sys.stdout.write(MARKER + json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def _plan(args: argparse.Namespace) -> int:
    import nnunetv2
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    emit("step", message="checking the dataset and extracting its fingerprint")
    extract_fingerprint_dataset(
        args.dataset_id,
        num_processes=args.num_processes,
        check_dataset_integrity=True,
        clean=True,
        verbose=False,
        show_progress_bar=False,
    )
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    from napari_scrollseg.engine.intensity_stats import clip_window, fix_fingerprint

    stats = fix_fingerprint(
        os.path.join(nnUNet_raw, args.dataset_name),
        os.path.join(nnUNet_preprocessed, args.dataset_name, "dataset_fingerprint.json"),
    )
    lo, hi = clip_window(stats["annotated"])
    lo0, hi0 = clip_window(stats["nnunet"])
    emit(
        "step",
        message=f"intensity statistics over every annotated voxel: CT clip window "
        f"[{lo:.4g}, {hi:.4g}] (nnU-Net's foreground-only window: [{lo0:.4g}, {hi0:.4g}])",
    )
    planner = recursive_find_python_class(
        os.path.join(nnunetv2.__path__[0], "experiment_planning"),
        PLANNERS[args.planner],
        current_module="nnunetv2.experiment_planning",
    )
    emit("step", message=f"planning with {PLANNERS[args.planner]}")
    _, identifier = plan_experiment_dataset(args.dataset_id, planner)
    emit("step", message=f"preprocessing {args.configuration} ({identifier})")
    preprocess_dataset(
        args.dataset_id,
        identifier,
        configurations=(args.configuration,),
        num_processes=(args.num_processes,),
        show_progress_bar=False,
    )
    emit("planned", plans=identifier)
    return 0


def _pick_device(name: str | None):
    import torch

    if name in (None, "", "auto"):
        name = (
            "cuda"
            if torch.cuda.is_available()
            else "mps"
            if torch.backends.mps.is_available()
            else "cpu"
        )
    if name == "cpu":  # all cores, unless OMP_NUM_THREADS says how many (a shared machine)
        omp = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(omp) if omp.isdigit() and int(omp) > 0 else os.cpu_count() or 1)
    elif name == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


def _seed(seed: int) -> None:
    """Seed every generator the training draws from (weights, patches, augmentation)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train(args: argparse.Namespace) -> int:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    from napari_scrollseg.engine.train import write_curves
    from napari_scrollseg.nnunet_trainers.sparse import nnUNetTrainerSparse

    stop = {"requested": False, "in_loop": False}

    def on_term(signum, frame):
        stop["requested"] = True
        if not stop["in_loop"]:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    device = _pick_device(args.device)
    base = os.path.join(str(nnUNet_preprocessed), args.dataset_name)
    plans = load_json(os.path.join(base, args.plans + ".json"))
    plans["continue_training"] = args.resume
    fold = args.fold if args.fold == "all" else int(args.fold)
    if args.seed is not None:  # before the trainer: its network's weights are drawn too
        _seed(args.seed)
    trainer = nnUNetTrainerSparse(
        plans=plans,
        configuration=args.configuration,
        fold=fold,
        dataset_json=load_json(os.path.join(base, "dataset.json")),
        device=device,
    )
    if args.epochs is not None:
        trainer.num_epochs = args.epochs
    if args.learning_rate is not None:  # before initialize(), which makes the optimizer
        trainer.initial_lr = args.learning_rate
    trainer.sampling = args.sampling
    if args.iterations is not None:
        trainer.num_iterations_per_epoch = args.iterations
        trainer.num_val_iterations_per_epoch = max(1, round(args.iterations / 5))
    if os.environ.get(FAULT_ENV) == "oom":

        def out_of_memory(batch: dict) -> dict:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 64.00 GiB ({FAULT_ENV}=oom)"
            )

        trainer.train_step = out_of_memory
    parent = os.getppid()  # stop too if the calling process died without asking
    trainer.should_stop = lambda: (
        stop["requested"] or (not _detached.is_set() and os.getppid() != parent)
    )

    def on_epoch(record: dict) -> None:
        curves = None
        try:  # the curves here, not in the caller (e.g. napari: its GUI would stall)
            written = write_curves(trainer.output_folder_base)
            curves = str(written[1]) if written else None
        except Exception as exc:  # a plot must not end a training
            log.warning("could not draw the training curves: %s", exc)
        emit("epoch", **record, curves=curves)

    trainer.epoch_callback = on_epoch
    emit(
        "step",
        message=f"fold {fold}: training on {device.type}, {trainer.num_epochs} epochs x "
        f"{trainer.num_iterations_per_epoch} iterations"
        + (f", seed {args.seed}" if args.seed is not None else ""),
        output_folder=trainer.output_folder_base,
    )
    start = None
    if args.resume:
        for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
            path = os.path.join(trainer.output_folder, name)
            if os.path.isfile(path):
                start = path
                break
    if start is not None:
        trainer.load_checkpoint(start)
        emit("resumed", checkpoint=start, epoch=trainer.current_epoch)
    elif args.pretrained_weights:
        _load_pretrained(trainer, args.pretrained_weights)
    pid_file = os.path.join(trainer.output_folder, PID_FILE)
    os.makedirs(trainer.output_folder, exist_ok=True)
    record = {"pid": os.getpid(), "started": time.time(), "epochs": trainer.num_epochs}
    record["iterations"] = trainer.num_iterations_per_epoch
    with open(pid_file + ".tmp", "w") as f:  # readers see all of it or nothing
        json.dump({**record, "log": os.environ.get("SCROLLSEG_WORKER_LOG")}, f)
    os.replace(pid_file + ".tmp", pid_file)
    stop["in_loop"] = True
    try:
        return _run(trainer, args, fold, stop)
    finally:
        stop["in_loop"] = False
        with contextlib.suppress(OSError):
            os.remove(pid_file)


def _load_pretrained(trainer, path: str) -> None:
    """Start from another model's weights (fine-tuning): nnU-Net's
    ``load_pretrained_weights`` (it checks that the networks match and leaves the
    segmentation heads out), then the heads too when they have the same shapes (same
    classes), so that the fine-tuning starts from the whole model."""
    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    if not trainer.was_initialized:
        trainer.initialize()
    with contextlib.redirect_stdout(sys.stderr):  # its listing is not an event
        load_pretrained_weights(trainer.network, path, verbose=False)
    weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    net = getattr(trainer.network, "_orig_mod", trainer.network)
    own = net.state_dict()
    heads = {
        k: v
        for k, v in weights.items()
        if ".seg_layers." in k and k in own and own[k].shape == v.shape
    }
    own.update(heads)
    net.load_state_dict(own)
    emit(
        "step",
        message=f"fine-tuning from {path} ({'with' if heads else 'without'} its "
        "segmentation heads)",
    )


def _run(trainer, args: argparse.Namespace, fold: int | str, stop: dict) -> int:
    from napari_scrollseg.nnunet_trainers.sparse import TrainingCancelled

    try:
        trainer.run_training()
    except TrainingCancelled:
        path = trainer.save_interrupted()
        emit("cancelled", checkpoint=path, epoch=trainer.current_epoch)
        return 0
    finally:
        stop["in_loop"] = False
    if stop["requested"]:
        return 128 + signal.SIGTERM
    if args.validate:
        emit("step", message=f"fold {fold}: validating on the held-out cases")
        trainer.perform_actual_validation(False)
    emit("fold_done", fold=fold, output_folder=trainer.output_folder)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the worker's arguments and run ``plan`` or ``train``."""
    parser = argparse.ArgumentParser(prog="scrollseg-train-worker")
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--dataset-id", type=int, required=True)
    p.add_argument("--dataset-name", required=True)
    p.add_argument("--configuration", required=True)
    p.add_argument("--planner", choices=sorted(PLANNERS), default="default")
    p.add_argument("--num-processes", type=int, default=2)
    t = sub.add_parser("train")
    t.add_argument("--dataset-name", required=True)
    t.add_argument("--configuration", required=True)
    t.add_argument("--plans", required=True)
    t.add_argument("--fold", required=True)
    t.add_argument("--device", default=None)
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--iterations", type=int, default=None)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--pretrained-weights", default=None)
    t.add_argument("--learning-rate", type=float, default=None)
    t.add_argument("--sampling", choices=sorted(SAMPLINGS), default="balanced")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--no-validate", action="store_false", dest="validate")
    args = parser.parse_args(argv)
    if DETACH_SIGNAL is not None:
        signal.signal(DETACH_SIGNAL, _detach)
    _watch_parent()
    return _plan(args) if args.step == "plan" else _train(args)


def _detach(signum: int, frame: object) -> None:
    """Go on alone: answer the parent, then write output to the log, not its pipe, and
    no longer stop when the parent exits."""
    # os.write, not sys.stdout: this may interrupt a write of sys.stdout (PYTHONUNBUFFERED
    # is set, so nothing waits in its buffer) in the middle of a line, hence the newline
    # first: the event starts a line of its own
    event = json.dumps({"kind": "detached", "pid": os.getpid()})
    os.write(1, ("\n" + MARKER + event + "\n").encode())
    fd = os.open(
        os.environ.get("SCROLLSEG_WORKER_LOG", os.devnull),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    )
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _detached.set()


def _watch_parent(every_s: float = 2.0) -> None:
    """SIGTERM ourselves when the calling process is gone (killed without asking us),
    unless we were detached."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent or _detached.is_set():
            if _detached.is_set():
                return
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)  # training saves a checkpoint and stops

    threading.Thread(target=watch, daemon=True, name="scrollseg-parent-watch").start()


if __name__ == "__main__":
    sys.exit(main())
