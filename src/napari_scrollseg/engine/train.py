"""Plan, preprocess and train nnU-Net v2 on an exported dataset, with progress events.

nnU-Net runs in a subprocess (:mod:`napari_scrollseg.engine._train_worker`): torch
stays out of the calling process (the napari GUI), the nnU-Net path variables are
set for that process only, and cancelling is a signal. The functions here are
generators that yield :class:`TrainEvent` objects; closing the generator (or
``worker.quit()`` in napari) stops the training at the next iteration and leaves a
``checkpoint_latest.pth`` that ``resume=True`` continues from.

Training uses :class:`napari_scrollseg.nnunet_trainers.sparse.nnUNetTrainerSparse`
(annotated voxels at random positions within the patches) and writes a stock
nnU-Net model folder ``<results>/<Dataset>/nnUNetTrainer__<plans>__<configuration>``
that plain nnU-Net loads. Curves: ``progress.csv`` and ``progress.png`` in the
model folder; the per-class Dice pooled over the validation cases of all trained
folds in ``dice_summary.json``.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from napari_scrollseg.engine._train_worker import DETACH_SIGNAL, MARKER, PID_FILE
from napari_scrollseg.engine._train_worker import PLANNERS as _WORKER_PLANNERS
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.nnunet_trainers.sampling import SAMPLINGS

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

PLANNERS = tuple(_WORKER_PLANNERS)  # the names --planner takes
_PLANS_IDENTIFIER = {
    "default": "nnUNetPlans",
    "resenc-m": "nnUNetResEncUNetMPlans",
    "resenc-l": "nnUNetResEncUNetLPlans",
    "resenc-xl": "nnUNetResEncUNetXLPlans",
}
STOCK_TRAINER = "nnUNetTrainer"
_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")
#: what a training process prints when memory runs out (torch on CUDA or CPU, Python)
_OOM_RE = re.compile(
    r"OutOfMemoryError|CUDA out of memory|\bMemoryError\b|can't allocate memory|"
    r"not enough memory|MPS backend out of memory"
)
#: a class whose pseudo Dice in the last epoch is below this is reported as not learned
UNLEARNED_DICE = 0.05
OOM_HINT = "out of memory: lower the batch size or patch size, or use the small CPU preset"


@dataclass(frozen=True)
class TrainEvent:
    """One progress report of :func:`train` or :func:`plan_and_preprocess`.

    ``kind`` is ``"step"`` (a stage begins; see ``message``), ``"planned"`` (``plans``
    names the plans used), ``"epoch"`` (an epoch finished; ``curves`` is the
    ``progress.png`` the training process has just drawn), ``"resumed"``,
    ``"fold_done"`` (``model_folder`` and the fold's validation ``dice``), ``"done"``
    (the last event; it has ``model_folder`` and ``dice``), ``"stopped"`` (the last
    event after ``stop`` was set) or ``"detached"`` (the last event after ``detach``
    was set: the training goes on without the caller). A ``"fold_done"`` whose last
    epoch, or whose validation, left a class all but unpredicted says so in ``warning``
    (see :func:`unlearned_classes`).
    """

    kind: str
    message: str = ""
    fold: int | str | None = None
    epoch: int | None = None
    epochs: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    pseudo_dice: dict[str, float] = field(default_factory=dict)
    epoch_time: float | None = None
    model_folder: Path | None = None
    dice: dict[str, float] = field(default_factory=dict)
    plans: str | None = None
    curves: Path | None = None
    warning: str = ""

    def __str__(self) -> str:
        if self.kind == "epoch":
            dice = ", ".join(f"{k} {v:.3f}" for k, v in self.pseudo_dice.items())
            return (
                f"fold {self.fold} epoch {self.epoch + 1}/{self.epochs}: train loss "
                f"{self.train_loss:.4f}, val loss {self.val_loss:.4f}, pseudo Dice [{dice}], "
                f"{self.epoch_time:.1f} s"
            )
        if self.kind == "done":
            dice = ", ".join(f"{k} {v:.3f}" for k, v in self.dice.items())
            return f"model: {self.model_folder} (validation Dice: {dice or 'n/a'})"
        return self.message


@dataclass(frozen=True)
class _Dataset:
    raw: Path  # the Dataset###_Name folder
    dataset_id: int
    name: str  # Dataset###_Name
    json: dict
    cases: tuple[str, ...]


def _dataset(dataset_dir: str | os.PathLike) -> _Dataset:
    raw = Path(dataset_dir).expanduser().resolve()
    m = _DATASET_RE.match(raw.name)
    if m is None or not raw.is_dir():
        raise ScrollsegError(
            f"{dataset_dir} is not an nnU-Net raw dataset folder: expected a folder named "
            "Dataset<ID>_<Name> (three-digit ID), as `scrollseg export` writes"
        )
    meta = raw / "dataset.json"
    if not meta.is_file():
        raise ScrollsegError(
            f"{raw} has no dataset.json: export the dataset with `scrollseg export`"
        )
    try:
        info = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ScrollsegError(
            f"{meta} is not valid JSON ({exc}); export the dataset again with `scrollseg export`"
        ) from None
    missing = [k for k in ("labels", "channel_names", "file_ending") if k not in info]
    if not isinstance(info, dict) or missing:
        raise ScrollsegError(
            f"{meta} lacks {', '.join(missing) or 'its entries'}: not an nnU-Net dataset.json; "
            "export the dataset again with `scrollseg export`"
        )
    ending = info.get("file_ending", ".nii.gz")
    labels = raw / "labelsTr"
    cases = (
        sorted(p.name[: -len(ending)] for p in labels.glob(f"*{ending}")) if labels.is_dir() else []
    )
    if not cases:
        raise ScrollsegError(
            f"{raw} has no training cases in labelsTr/: export some annotations first"
        )
    return _Dataset(raw, int(m.group(1)), raw.name, info, tuple(cases))


def _env(results_dir: Path, preprocessed_dir: Path, raw_parent: Path, num_processes: int) -> dict:
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(raw_parent),
        nnUNet_preprocessed=str(preprocessed_dir),
        nnUNet_results=str(results_dir),
        nnUNet_def_n_proc=str(max(1, num_processes)),
        PYTHONUNBUFFERED="1",
    )
    return env


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """Ask the worker to stop (SIGTERM: it saves a checkpoint), then kill what is left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("training worker did not stop within %.0f s: killing it", grace)
    if os.name == "posix":
        with suppress(ProcessLookupError, PermissionError):  # data-augmentation processes
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _run_worker(
    args: Sequence[str],
    *,
    env: dict,
    log_path: Path,
    what: str,
    grace: float = 120.0,
    stop: threading.Event | None = None,
    detach: threading.Event | None = None,
    nice: int = 0,
    resumable: bool = False,
) -> Iterator[dict]:
    """Run the worker, yield its events as dicts; raise ScrollsegError if it fails.

    When ``stop`` is set (from any thread) the worker is stopped as on close (it saves
    a checkpoint) and this returns quietly. When ``detach`` is set the worker is told
    to go on alone (its output goes to ``log_path``, it no longer stops when this
    process exits): a last ``{"kind": "detached", "pid": ...}`` is yielded. ``nice``
    lowers the worker's CPU priority (POSIX; its data-augmentation processes inherit
    it). ``resumable``: a failure says that a resume continues from the last checkpoint.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "napari_scrollseg.engine._train_worker", *args]
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        env={**env, "SCROLLSEG_WORKER_LOG": str(log_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=os.name == "posix",  # no terminal signal reaches it; can outlive us
    )
    if nice > 0 and hasattr(os, "setpriority"):
        with suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    tail: list[str] = []
    finished = False
    detaching: float | None = None  # when the worker was asked to go on alone
    ready = False  # the worker has said something (before that, a signal could kill it)
    try:
        with open(log_path, "a") as out:
            while True:
                if stop is not None and stop.is_set():
                    log.info("%s: stop requested", what)
                    return  # the finally below stops the worker
                if detach is not None and detach.is_set() and detaching is None and ready:
                    if DETACH_SIGNAL is None:
                        raise ScrollsegError(
                            f"{what}: leaving a training running needs a POSIX system; stop it"
                        )
                    detaching = time.monotonic()
                    proc.send_signal(DETACH_SIGNAL)
                if detaching is not None and time.monotonic() - detaching > 30:
                    raise ScrollsegError(f"{what}: the worker did not answer the detach request")
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if line is None:
                    if detaching is not None and proc.poll() is None:  # gone on alone
                        finished = True
                        yield {"kind": "detached", "pid": proc.pid}
                        return
                    break
                text, event = split_event(line)
                if event is not None:
                    if text.strip():
                        out.write(text + "\n")
                    ready = True  # its first event: it handles the detach signal now
                    if event["kind"] == "detached":
                        finished = True  # it goes on: leave it alone
                        yield event
                        return
                    yield event
                    continue
                out.write(line)
                out.flush()
                text = line.strip()
                if text:
                    tail = [*tail[-40:], text]
                    log.debug("%s", text)
        rc = proc.wait()
        finished = True
    finally:
        if not finished:
            _stop(proc, grace)
    if rc != 0:
        raise ScrollsegError(_failure(what, rc, tail, log_path, resumable))


def split_event(line: str) -> tuple[str, dict | None]:
    """A worker's output line -> (plain output, its event or None). An event may follow
    the start of a line it interrupted (a signal handler's write in a ``print``)."""
    text, marker, body = line.partition(MARKER)
    return (text, json.loads(body)) if marker else (line, None)


def _failure(what: str, rc: int, tail: Sequence[str], log_path: Path, resumable: bool) -> str:
    """One message for a worker that ended with ``rc`` (its last output lines ``tail``)."""
    again = "; Resume (--resume) continues from its latest checkpoint" if resumable else ""
    where = f" -- full output in {log_path}"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        oom = ": by hand, or by the system when memory ran out" if -rc == signal.SIGKILL else ""
        return f"{what} was killed ({name}{oom}){again}{where}"
    if any(_OOM_RE.search(t) for t in tail[-10:]):
        return f"{what} failed: {OOM_HINT}{again}{where}"
    reason = next((t for t in reversed(tail) if not t.startswith(("File ", "^", "~"))), "")
    return f"{what} failed (exit {rc}): {reason[:400]}{where}"


def running_worker(fold_folder: str | os.PathLike) -> int | None:
    """The process id of a training still running in ``fold_folder`` (e.g. one left
    running when napari closed), or None."""
    record = running_record(fold_folder)
    return None if record is None else record["pid"]


def running_record(fold_folder: str | os.PathLike) -> dict | None:
    """``fold_folder``'s ``training.pid`` record (``pid``, ``started``, ``epochs``,
    ``iterations``, ``log``) while its process runs, else None."""
    path = Path(fold_folder) / PID_FILE
    try:
        record = json.loads(path.read_text())
        pid = record["pid"] = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return record
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        with suppress(OSError):
            if b"_train_worker" not in cmdline.read_bytes():
                return None  # the id was reused
    return record


def _preprocessed_ok(pre: Path, plans: str, configuration: str, cases: Sequence[str]) -> bool:
    from napari_scrollseg.engine.intensity_stats import NNUNET_KEY

    plans_file = pre / f"{plans}.json"
    fingerprint = pre / "dataset_fingerprint.json"
    if not plans_file.is_file() or not fingerprint.is_file():
        return False
    if NNUNET_KEY not in json.loads(fingerprint.read_text()):
        return False  # planned before the statistics covered every annotated class: redo
    conf = json.loads(plans_file.read_text())["configurations"].get(configuration)
    if conf is None:
        return False
    data = pre / conf.get("data_identifier", f"{plans}_{configuration}")
    done = {p.name.split(".")[0] for p in data.glob("*.pkl")} if data.is_dir() else set()
    return set(cases) <= done


def apply_plans_overrides(
    plans: dict, configuration: str, overrides: dict, plans_name: str
) -> dict:
    """A copy of nnU-Net ``plans`` with another network size or patch for ``configuration``.

    Parameters
    ----------
    plans
        The planner's plans (``nnUNetPlans.json`` content).
    configuration
        The configuration to change, e.g. ``"3d_fullres"``.
    overrides
        Any of ``n_stages`` (fewer resolution stages), ``features_per_stage``,
        ``patch_size``, ``batch_size``.
    plans_name
        Name of the new plans (the model folder is ``nnUNetTrainer__<plans_name>__<config>``).

    The data identifier is kept, so the preprocessed data are reused.
    """
    unknown = set(overrides) - {"n_stages", "features_per_stage", "patch_size", "batch_size"}
    if unknown:
        raise ScrollsegError(
            f"unknown plans override(s) {sorted(unknown)}: use n_stages, features_per_stage, "
            "patch_size, batch_size"
        )
    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    if configuration not in out["configurations"]:
        raise ScrollsegError(f"configuration {configuration!r} is not in the plans")
    conf = out["configurations"][configuration]
    arch = conf["architecture"]["arch_kwargs"]
    n = int(overrides.get("n_stages", arch["n_stages"]))
    if not 3 <= n <= arch["n_stages"]:
        # nnU-Net's deep-supervision loss drops the lowest output: with 2 stages nothing is left
        raise ScrollsegError(f"n_stages must be 3..{arch['n_stages']} for this plan, got {n}")
    arch["n_stages"] = n
    for key in ("kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in arch:
            arch[key] = arch[key][:n]
    if "n_conv_per_stage_decoder" in arch:
        arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][: n - 1]
    features = overrides.get("features_per_stage")
    features = arch["features_per_stage"][:n] if features is None else [int(f) for f in features]
    if len(features) != n:
        raise ScrollsegError(f"features_per_stage needs {n} values (one per stage), got {features}")
    arch["features_per_stage"] = list(features)
    if "patch_size" in overrides:
        patch = [int(p) for p in overrides["patch_size"]]
        if len(patch) != len(conf["patch_size"]):
            raise ScrollsegError(f"patch_size needs {len(conf['patch_size'])} values, got {patch}")
        conf["patch_size"] = patch
    divisor = [1] * len(conf["patch_size"])
    for stride in arch["strides"]:
        divisor = [d * s for d, s in zip(divisor, stride, strict=False)]
    if any(p % d for p, d in zip(conf["patch_size"], divisor, strict=False)):
        raise ScrollsegError(
            f"patch_size {conf['patch_size']} must be divisible by {divisor}, the product of the "
            f"strides of {n} stages: choose another patch size or number of stages"
        )
    if "batch_size" in overrides:
        conf["batch_size"] = int(overrides["batch_size"])
    return out


def _ensure_splits(pre: Path, cases: Sequence[str], folds: Sequence[int | str]) -> None:
    """Leave-one-out splits when there are 2..4 cases (nnU-Net's default 5-fold split needs 5)."""
    splits_file = pre / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
        known = {c for s in splits for part in ("train", "val") for c in s[part]}
        if known == set(cases):
            return
        log.info("cases changed since %s was written: making a new split", splits_file)
        splits_file.unlink()
    numeric = [f for f in folds if f != "all"]
    if len(cases) >= 5 or not numeric:
        return
    if len(cases) < 2:
        raise ScrollsegError(
            "only one training case: cross-validation folds need at least 2; "
            "train with folds=('all',) (--fold all) or export more annotated volumes"
        )
    if max(int(f) for f in numeric) >= len(cases):
        raise ScrollsegError(
            f"{len(cases)} cases give folds 0..{len(cases) - 1}; asked for folds {list(folds)}"
        )
    splits = [{"train": [c for c in cases if c != v], "val": [v]} for v in cases]
    splits_file.write_text(json.dumps(splits, indent=1))
    log.info("wrote a %d-fold leave-one-out split to %s", len(cases), splits_file)


def plan_and_preprocess(
    dataset_dir: str | os.PathLike,
    *,
    results_dir: str | os.PathLike,
    configuration: str = "3d_fullres",
    planner: str = "default",
    num_processes: int = 2,
    plans_overrides: dict | None = None,
    plans_name: str | None = None,
    preprocessed_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    stop: threading.Event | None = None,
    detach: threading.Event | None = None,
    nice: int = 0,
) -> Iterator[TrainEvent]:
    """Check the dataset, plan and preprocess it with nnU-Net (skipped when already done).

    Parameters
    ----------
    dataset_dir
        The exported ``Dataset<ID>_<Name>`` folder (nnU-Net raw format).
    results_dir
        Where models go (``nnUNet_results``); preprocessed data default to
        ``results_dir/nnUNet_preprocessed``.
    configuration
        nnU-Net configuration to preprocess (``3d_fullres``, ``2d``, ...).
    planner
        ``"default"`` or a residual-encoder preset ``"resenc-m"``, ``"resenc-l"``, ``"resenc-xl"``.
    num_processes
        Worker processes for fingerprinting and preprocessing (nnU-Net's ``-np``).
    plans_overrides
        Network/patch changes, see :func:`apply_plans_overrides`.
    plans_name
        Name of the overridden plans (default: the planner's name + ``"Scrollseg"``).
    preprocessed_dir
        ``nnUNet_preprocessed`` folder.
    overwrite
        Plan and preprocess again even if done.
    stop, detach, nice
        See :func:`train`.

    Yields
    ------
    TrainEvent
        ``step`` events, then one ``planned`` event naming the plans identifier.
    """
    ds = _dataset(dataset_dir)
    if planner not in PLANNERS:
        raise ScrollsegError(f"unknown planner {planner!r}: choose one of {', '.join(PLANNERS)}")
    results = Path(results_dir).expanduser().resolve()
    pre_root = (
        Path(preprocessed_dir).expanduser().resolve()
        if preprocessed_dir
        else results / "nnUNet_preprocessed"
    )
    pre = pre_root / ds.name
    base = _PLANS_IDENTIFIER[planner]
    if overwrite or not _preprocessed_ok(pre, base, configuration, ds.cases):
        env = _env(results, pre_root, ds.raw.parent, num_processes)
        args = [
            "plan",
            f"--dataset-id={ds.dataset_id}",
            f"--dataset-name={ds.name}",
            f"--configuration={configuration}",
            f"--planner={planner}",
            f"--num-processes={num_processes}",
        ]
        t0 = time.perf_counter()
        log_path = results / "logs" / f"{ds.name}_plan.log"
        with closing(
            _run_worker(
                args,
                env=env,
                log_path=log_path,
                what="nnU-Net planning",
                stop=stop,
                detach=detach,
                nice=nice,
            )
        ) as events:
            for ev in events:
                if ev["kind"] == "step":
                    yield TrainEvent("step", message=ev["message"])
                elif ev["kind"] == "detached":
                    yield TrainEvent(
                        "detached",
                        message=f"planning and preprocessing go on in process {ev['pid']}; "
                        "no training starts: train again later (the preprocessed data are "
                        f"reused); log: {log_path}",
                    )
                    return
        if stop is not None and stop.is_set():
            yield TrainEvent("stopped", message="stopped during planning and preprocessing")
            return
        yield TrainEvent(
            "step", message=f"planned and preprocessed in {time.perf_counter() - t0:.0f} s"
        )
    else:
        yield TrainEvent("step", message=f"reusing preprocessed data in {pre}")
    identifier = base
    if plans_overrides:
        identifier = plans_name or f"{base}Scrollseg"
        plans = json.loads((pre / f"{base}.json").read_text())
        custom = apply_plans_overrides(plans, configuration, dict(plans_overrides), identifier)
        model_folder = results / ds.name / f"{STOCK_TRAINER}__{identifier}__{configuration}"
        _check_same_plans(model_folder, custom, configuration)
        (pre / f"{identifier}.json").write_text(json.dumps(custom, indent=2))
    yield TrainEvent("planned", message=f"plans: {identifier}", plans=identifier)


def _check_same_plans(model_folder: Path, plans: dict, configuration: str) -> None:
    """Refuse new plans under the name of a model trained with other ones: its folder
    (checkpoints, resume) would be mixed with a different network."""
    trained = model_folder / "plans.json"
    if not trained.is_file():
        return
    old = json.loads(trained.read_text()).get("configurations", {}).get(configuration)
    new = plans["configurations"][configuration]
    if old is None or old == new:
        return
    changed = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    raise ScrollsegError(
        f"{model_folder} was trained with other {configuration} plans named "
        f"{plans['plans_name']} ({', '.join(changed)} differ): give the new network another "
        "plans name (plans_name=...), or train into another results folder"
    )


def train(
    dataset_dir: str | os.PathLike,
    *,
    results_dir: str | os.PathLike,
    configuration: str = "3d_fullres",
    folds: Sequence[int | str] = (0,),
    device: str | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    planner: str = "default",
    num_processes: int = 2,
    da_processes: int | None = None,
    resume: bool = False,
    validate: bool = True,
    plans_overrides: dict | None = None,
    plans_name: str | None = None,
    preprocessed_dir: str | os.PathLike | None = None,
    stop: threading.Event | None = None,
    detach: threading.Event | None = None,
    nice: int = 0,
    pretrained_weights: str | os.PathLike | None = None,
    learning_rate: float | None = None,
    sampling: str = "balanced",
    seed: int | None = None,
) -> Iterator[TrainEvent]:
    """Plan/preprocess if needed, then train ``folds`` with the sparse-aware trainer.

    Parameters
    ----------
    dataset_dir
        The exported ``Dataset<ID>_<Name>`` folder.
    results_dir
        ``nnUNet_results``: the model folder is
        ``results_dir/<Dataset>/nnUNetTrainer__<plans>__<configuration>``.
    configuration
        nnU-Net configuration.
    folds
        Folds to train, one after the other (``"all"`` trains on every case).
    device
        ``"cuda"``, ``"mps"``, ``"cpu"``, or None for the best available.
    epochs, iterations
        Number of epochs and training iterations per epoch (nnU-Net: 1000 x 250).
    planner, num_processes, plans_overrides, plans_name, preprocessed_dir
        As :func:`plan_and_preprocess`.
    da_processes
        Data-augmentation processes (nnU-Net's ``nnUNet_n_proc_DA``); 0 runs it in
        the training process. None: nnU-Net's default.
    resume
        Continue each fold from its latest checkpoint (nnU-Net's ``--c``).
    validate
        Run nnU-Net's validation of each fold at the end (needed for the Dice summary).
    stop
        A ``threading.Event``: set it from another thread (a GUI's Cancel) to stop
        without waiting for the next event; as on closing the generator the worker
        stops after its current iteration and saves ``checkpoint_latest.pth``, then a
        last ``stopped`` event is yielded instead of ``done``.
    detach
        A ``threading.Event``: set it to leave the running training process alone (e.g.
        when napari closes): it no longer stops when the caller exits, writes its output
        to the log and its curves (``progress.png``/``.csv``) and checkpoints to the
        model folder as before; a last ``detached`` event is yielded. Only the fold
        being trained finishes; :func:`running_worker` finds the process again, and
        ``train`` refuses to start the same fold while it runs.
    nice
        Lower the training processes' CPU priority by this much (POSIX ``nice``), e.g.
        so that a GUI in the calling process stays responsive on a small machine.
    pretrained_weights
        A checkpoint (``checkpoint_final.pth``) of a model with the same network to
        start from: fine-tuning, as nnU-Net's ``-pretrained_weights`` (here the
        segmentation heads are loaded too when the classes match). Not with ``resume``.
    learning_rate
        Initial learning rate (nnU-Net's ``initial_lr``, 1e-2; it decays to 0 over the
        epochs), e.g. lower for fine-tuning. None: nnU-Net's.
    sampling
        How a random (not forced-foreground) patch picks its anchor with sparse labels
        (:data:`~napari_scrollseg.nnunet_trainers.sampling.SAMPLINGS`): ``"balanced"``,
        each annotated class, the background included, as likely as "any annotated
        voxel" (a rare class is seen far more often); ``"nnunet"``, nnU-Net's
        foreground shares plus the background key (a rare class is over-predicted less).
    seed
        Seed Python's, NumPy's and torch's random generators in the training process
        (weights, patches, augmentation): with ``da_processes=0`` two runs on the same
        machine and torch build give the same curves. None: nnU-Net's (unseeded).

    Yields
    ------
    TrainEvent
        ``step``/``resumed`` events, one ``epoch`` event per epoch, ``fold_done`` per
        fold (with its validation Dice), and finally ``done`` with the model folder and
        the validation Dice pooled over the folds (or ``stopped``).
    """
    for name, value in (("epochs", epochs), ("iterations", iterations)):
        if value is not None and value < 1:
            raise ScrollsegError(f"{name} must be at least 1, got {value}")
    if device not in (None, "auto", "cpu", "cuda", "mps"):
        raise ScrollsegError(f"unknown device {device!r}: use cpu, cuda or mps")
    if learning_rate is not None and not learning_rate > 0:
        raise ScrollsegError(f"learning_rate must be above 0, got {learning_rate}")
    if sampling not in SAMPLINGS:
        raise ScrollsegError(f"unknown sampling {sampling!r}: use {' or '.join(SAMPLINGS)}")
    if pretrained_weights is not None:
        pretrained_weights = Path(pretrained_weights).expanduser().resolve()
        if not pretrained_weights.is_file():
            raise ScrollsegError(f"pretrained weights {pretrained_weights} not found")
        if resume:
            raise ScrollsegError("resume continues a checkpoint: not with pretrained weights")
    folds = [f if f == "all" else int(f) for f in folds]
    ds = _dataset(dataset_dir)
    folds, note = _check_folds(ds, folds)
    if note:
        yield TrainEvent("step", message=note)
    results = Path(results_dir).expanduser().resolve()
    pre_root = (
        Path(preprocessed_dir).expanduser().resolve()
        if preprocessed_dir
        else results / "nnUNet_preprocessed"
    )
    identifier = None
    for ev in plan_and_preprocess(
        ds.raw,
        results_dir=results,
        configuration=configuration,
        planner=planner,
        num_processes=num_processes,
        plans_overrides=plans_overrides,
        plans_name=plans_name,
        preprocessed_dir=pre_root,
        stop=stop,
        detach=detach,
        nice=nice,
    ):
        if ev.kind == "planned":
            identifier = ev.plans
        yield ev
        if ev.kind in ("stopped", "detached"):
            return
    _ensure_splits(pre_root / ds.name, ds.cases, folds)
    model_folder = results / ds.name / f"{STOCK_TRAINER}__{identifier}__{configuration}"
    env = _env(results, pre_root, ds.raw.parent, num_processes)
    if da_processes is not None:
        env["nnUNet_n_proc_DA"] = str(da_processes)
    for fold in folds:
        pid = running_worker(model_folder / f"fold_{fold}")
        if pid is not None:
            raise ScrollsegError(
                f"fold {fold} is still being trained by process {pid} (left running, e.g. when "
                f"napari closed); its curves: {model_folder / 'progress.png'}. Follow it (the "
                f"train widget's Follow), wait for it to finish, or stop it (kill {pid}: it "
                "saves a checkpoint), then resume"
            )
        args = [
            "train",
            f"--dataset-name={ds.name}",
            f"--configuration={configuration}",
            f"--plans={identifier}",
            f"--fold={fold}",
        ]
        args += [f"--device={device}"] if device else []
        args += [f"--epochs={epochs}"] if epochs else []
        args += [f"--iterations={iterations}"] if iterations else []
        args += ["--resume"] if resume else []
        args += [f"--pretrained-weights={pretrained_weights}"] if pretrained_weights else []
        args += [f"--learning-rate={learning_rate}"] if learning_rate else []
        args += [f"--sampling={sampling}"] if sampling != "balanced" else []
        args += [f"--seed={seed}"] if seed is not None else []
        args += [] if validate else ["--no-validate"]
        log_path = results / "logs" / f"{ds.name}_{identifier}_{configuration}_fold{fold}.log"
        events = _run_worker(
            args,
            env=env,
            log_path=log_path,
            what=f"training fold {fold}",
            stop=stop,
            detach=detach,
            nice=nice,
            resumable=True,
        )
        with closing(events):
            for event in _fold_events(events, fold, model_folder, log_path):
                yield event
                if event.kind == "detached":
                    return
        if stop is not None and stop.is_set():
            yield TrainEvent(
                "stopped",
                fold=fold,
                model_folder=model_folder,
                message=f"training of fold {fold} stopped; resume to continue from its "
                "latest checkpoint",
            )
            return
    dice = dice_summary(model_folder)
    yield TrainEvent("done", model_folder=model_folder, dice=dice.get("per_class", {}))


def _check_folds(ds: _Dataset, folds: list[int | str]) -> tuple[list[int | str], str]:
    """Before any work: fold ``all`` when there are too few cases for folds; bad folds refused.

    nnU-Net makes 5 folds from 5+ cases; scrollseg a leave-one-out split from 2..4.
    """
    n = len(ds.cases)
    numeric = [int(f) for f in folds if f != "all"]
    if not numeric:
        return folds, ""
    if n < 2:
        return ["all"], (
            f"only {n} training case: cross-validation folds need at least 2, so fold 'all' "
            "is trained (on every case, without validation cases)"
        )
    n_folds = 5 if n >= 5 else n
    if max(numeric) >= n_folds:
        raise ScrollsegError(
            f"{n} cases give folds 0..{n_folds - 1}; asked for folds {folds}: train one of "
            "those, or 'all' (--fold all)"
        )
    return folds, ""


def _fold_events(
    events: Iterator[dict], fold: int | str, model_folder: Path, log_path: Path
) -> Iterator[TrainEvent]:
    for ev in events:
        kind = ev.pop("kind")
        if kind == "epoch":
            yield TrainEvent(
                "epoch",
                fold=ev["fold"],
                epoch=ev["epoch"],
                epochs=ev["epochs"],
                train_loss=ev["train_loss"],
                val_loss=ev["val_loss"],
                pseudo_dice=ev["pseudo_dice"],
                epoch_time=ev["epoch_time"],
                model_folder=model_folder,
                curves=Path(ev["curves"]) if ev.get("curves") else None,
            )
        elif kind == "resumed":
            yield TrainEvent(
                "resumed",
                fold=fold,
                epoch=ev["epoch"],
                message=f"fold {fold}: resuming at epoch {ev['epoch'] + 1} from {ev['checkpoint']}",
            )
        elif kind == "fold_done":
            dice = dice_summary(model_folder, folds=[fold])["per_class"]
            text = ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
            warning = _unlearned_warning(model_folder, fold, dice)
            if warning:
                log.warning(warning)
            yield TrainEvent(
                "fold_done",
                fold=fold,
                message=f"fold {fold}: done"
                + (f" (validation Dice: {text})" if text else "")
                + (f"; {warning.removeprefix(f'fold {fold} ')}" if warning else ""),
                model_folder=model_folder,
                dice=dice,
                warning=warning,
            )
        elif kind == "step":
            yield TrainEvent("step", fold=fold, message=ev["message"])
        elif kind == "detached":
            yield TrainEvent(
                "detached",
                fold=fold,
                model_folder=model_folder,
                message=f"training of fold {fold} goes on in process {ev['pid']}; curves: "
                f"{model_folder / 'progress.png'}, log: {log_path}",
            )
        elif kind == "cancelled":
            raise ScrollsegError(
                f"training of fold {fold} was stopped from outside at epoch {ev['epoch'] + 1}; "
                f"{ev['checkpoint']} was saved: train again with resume=True (--resume) to continue"
            )


def unlearned_classes(model_folder: str | os.PathLike, fold: int | str) -> dict[str, float]:
    """Classes (background included) whose pseudo Dice in the fold's last epoch is below
    :data:`UNLEARNED_DICE`: the model predicts almost none of them, however healthy the
    loss looks (a rare class can sit at 0 for the first epochs, then rise)."""
    rows = [r for r in read_progress(model_folder) if r["fold"] == str(fold)]
    if not rows:
        return {}
    last = rows[-1]
    return {
        k.removeprefix("dice_"): v
        for k, v in last.items()
        if k.startswith("dice_") and v < UNLEARNED_DICE
    }


def _unlearned_warning(
    model_folder: Path, fold: int | str, validation: dict[str, float] | None = None
) -> str:
    """One warning for the classes the fold has not learned: last-epoch pseudo Dice, and
    validation Dice on the held-out cases (``validation``: per class, NaN where a class
    is not in them) below :data:`UNLEARNED_DICE`."""
    pseudo = unlearned_classes(model_folder, fold)
    held_out = {k: v for k, v in (validation or {}).items() if v == v and v < UNLEARNED_DICE}
    if not pseudo and not held_out:
        return ""
    names = []
    for name in [*pseudo, *(k for k in held_out if k not in pseudo)]:
        scores = [f"pseudo Dice {pseudo[name]:.3f}"] if name in pseudo else []
        scores += [f"validation Dice {held_out[name]:.3f}"] if name in held_out else []
        names.append(f"{name} ({', '.join(scores)})")
    return (
        f"fold {fold} has not learned {', '.join(names)} by its last epoch: the model "
        "predicts almost none of it. Train longer (more epochs) or annotate more of it"
    )


def read_progress(model_folder: str | os.PathLike) -> list[dict]:
    """All rows of the folds' ``progress.csv`` files, numbers as floats."""
    rows = []
    for path in sorted(Path(model_folder).glob("fold_*/progress.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append(
                    {
                        k: v if k == "fold" else int(v) if k == "epoch" else float(v)
                        for k, v in row.items()
                    }
                )
    return rows


def write_curves(model_folder: str | os.PathLike) -> tuple[Path, Path] | None:
    """Write ``progress.csv`` (all folds) and ``progress.png`` there: loss, pseudo Dice per
    class and epoch time per epoch, one line per fold.

    The training process calls this after each epoch (matplotlib then never runs in
    the calling process, e.g. napari's: drawing there would hold the GIL for about a
    second per epoch and stall its GUI thread).
    """
    from matplotlib import style

    model_folder = Path(model_folder)
    rows = read_progress(model_folder)
    if not rows:
        return None
    columns = list(rows[0])
    csv_path = model_folder / "progress.csv"
    with open(csv_path.with_suffix(".csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path.with_suffix(".csv.tmp"), csv_path)

    with style.context("default"):  # not nnU-Net's seaborn style (font scale 2.5)
        _draw_curves(rows, columns, model_folder / "progress.png")
    return csv_path, model_folder / "progress.png"


def _draw_curves(rows: list[dict], columns: list[str], png_path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 6.5), dpi=90)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.98, bottom=0.08, hspace=0.12)
    ax_loss, ax_dice, ax_time = fig.subplots(3, 1, sharex=True)
    dice_cols = [c for c in columns if c.startswith("dice_")]
    for fold in sorted({r["fold"] for r in rows}):
        fr = sorted((r for r in rows if r["fold"] == fold), key=lambda r: r["epoch"])
        x = [int(r["epoch"]) + 1 for r in fr]
        tag = f" f{fold}"
        ax_loss.plot(x, [r["train_loss"] for r in fr], "-o", ms=3, label="train" + tag)
        ax_loss.plot(x, [r["val_loss"] for r in fr], "--o", ms=3, label="val" + tag)
        for c in dice_cols:
            ax_dice.plot(x, [r[c] for r in fr], "-o", ms=3, label=c[5:] + tag)
        if "epoch_time" in columns:
            ax_time.plot(x, [r["epoch_time"] for r in fr], "-o", ms=3, label="epoch" + tag)
    ax_loss.set_ylabel("loss")
    ax_dice.set(ylabel="pseudo Dice", ylim=(0, 1))
    ax_time.set(ylabel="epoch (s)", xlabel="epoch")
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_dice):
        ax.legend(fontsize=7, loc="best")
    tmp = png_path.with_name("progress.tmp.png")  # readers never see half a PNG
    fig.savefig(tmp)
    os.replace(tmp, png_path)


def dice_summary(model_folder: str | os.PathLike, folds: Sequence[int | str] | None = None) -> dict:
    """Per-class Dice pooled over the validation cases of all folds: 2TP / (2TP + FP + FN).

    Reads ``fold_*/validation/summary.json`` (nnU-Net's validation) and writes
    ``dice_summary.json`` in the model folder. Returns ``{"per_class": {name: dice},
    "mean": float, "folds": [...], "cases": n}``; empty ``per_class`` when no fold
    has been validated yet. ``folds``: only these folds (nothing is written then).
    """
    from napari_scrollseg.engine.annotations import ClassTable

    model_folder = Path(model_folder)
    names = {}
    meta = model_folder / "dataset.json"
    if meta.is_file():
        table = ClassTable.from_dataset_json(json.loads(meta.read_text()))
        names = {str(c.id - 1): c.name for c in table.classes}
    totals: dict[str, list[float]] = {}
    n_cases = 0
    wanted = None if folds is None else {str(f) for f in folds}
    found: list[str] = []
    for fold in sorted(model_folder.glob("fold_*/validation")):
        name = fold.parent.name[len("fold_") :]
        summary = fold / "summary_all_classes.json"  # background included (scrollseg's trainer)
        summary = summary if summary.is_file() else fold / "summary.json"
        if (wanted is not None and name not in wanted) or not summary.is_file():
            continue
        found.append(name)
        for case in json.loads(summary.read_text())["metric_per_case"]:
            n_cases += 1
            for label, m in case["metrics"].items():
                t = totals.setdefault(label, [0.0, 0.0, 0.0])
                t[0] += m["TP"]
                t[1] += m["FP"]
                t[2] += m["FN"]
    per_class = {}
    for label, (tp, fp, fn) in sorted(totals.items(), key=lambda kv: int(kv[0])):
        denom = 2 * tp + fp + fn
        per_class[names.get(label, label)] = 2 * tp / denom if denom else float("nan")
    valid = [v for v in per_class.values() if v == v]
    result = {
        "per_class": per_class,
        "mean": sum(valid) / len(valid) if valid else float("nan"),
        "folds": found,
        "cases": n_cases,
    }
    if found and wanted is None:
        (model_folder / "dice_summary.json").write_text(json.dumps(result, indent=2))
    return result
