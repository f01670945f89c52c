"""Whole-volume prediction: a task graph over output chunks, resumable, bounded memory.

The answer equals nnU-Net's ``nnUNetPredictor`` on the whole volume: one global
sliding-window grid (:meth:`~napari_scrollseg.engine.model.LoadedModel.grid`), the
gaussian importance map, the division by the summed weights, softmax and argmax
(:func:`~napari_scrollseg.engine.predict.finalize`, as for a region). Chunking only
decides how that sum is organised (:mod:`.plan`: every tile runs once); the tasks
(:mod:`.tasks`) pass partial sums in memory within a budget on one machine (:mod:`.partials`),
through files past it and on a dask.distributed cluster (:mod:`.schedule`; the output and the
volume must then be on storage the workers share). A rerun of the same command resumes
from the done markers and partial sums of the output store (:mod:`.store`).

A run first checks its inputs (errors come before any event), yields a ``"prepare"``
event, then makes its whole-volume passes (nonzero box, normalization statistics, the
mask index) off the caller's thread, cancellable, then a ``"predict"`` event per chunk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_scrollseg.engine.annotations import ClassTable
from napari_scrollseg.engine.config import PredictConfig, parse_roi
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.fingerprint import (
    check_resume_fingerprints,
    input_fingerprint,
    loaded_model_fingerprint,
)
from napari_scrollseg.engine.predict import store
from napari_scrollseg.engine.predict.events import BEAT_S, PredictProgress, Tally, bar_state
from napari_scrollseg.engine.predict.partials import PartialSums, budget, place
from napari_scrollseg.engine.predict.plan import Plan, plan
from napari_scrollseg.engine.predict.pyramid import PyramidFront
from napari_scrollseg.engine.predict.schedule import (
    CancelEvent,
    iter_in_thread,
    run_distributed,
    run_windowed,
)
from napari_scrollseg.engine.predict.session import ModelRef, Predictor
from napari_scrollseg.engine.predict.tasks import Job, build_graph, source_of
from napari_scrollseg.engine.safe_write import run_lock
from napari_scrollseg.engine.volumes import input_cache

if TYPE_CHECKING:
    from napari_scrollseg.engine.tiling import Grid
    from napari_scrollseg.engine.volumes import Volume

log = logging.getLogger(__name__)

__all__ = ["PredictProgress", "iter_predict_volume", "predict_volume", "prepare_output"]


@dataclass(frozen=True)
class _Run:
    """What a run knows after its cheap checks, before any whole-volume pass."""

    out: Path
    vol: Volume
    mask: Volume | None
    shape: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    info: dict  # provenance, written into the output's attributes
    resume: bool
    was_complete: bool

    @property
    def state(self) -> Path:
        return self.out / store.STATE_DIR


def _check(
    session: Predictor, model_ref: ModelRef, volume: Any, out: Any, cfg: PredictConfig
) -> _Run:
    """Open and check the inputs and the output (no whole-volume pass)."""
    from napari_scrollseg import __version__
    from napari_scrollseg.engine.volumes import open_volume

    out = Path(out).absolute()
    store.check_location(out)
    loaded = session.model
    vol = volume if hasattr(volume, "levels") else open_volume(volume)
    shape = tuple(int(s) for s in vol.data.shape[-3:])
    roi = cfg.roi
    spans = roi if roi is not None and not isinstance(roi, str) else parse_roi(roi, shape)
    spans = tuple((int(a), int(b)) for a, b in spans)
    loaded.check_volume(vol, ignore_spacing=cfg.ignore_spacing)
    mask = None
    if cfg.mask is not None:
        mask = cfg.mask if hasattr(cfg.mask, "levels") else open_volume(cfg.mask)
    config = cfg.provenance(
        model=model_ref.path,
        model_sha256=loaded.sha256,
        configuration=loaded.configuration,
        folds=[str(f) for f in loaded.folds],
        mirror_axes=list(loaded.mirror_axes) if cfg.mirror else [],
        volume=source_of(vol),
        volume_shape=list(shape),
        roi=[list(s) for s in spans],
        mask=None if mask is None else source_of(mask),
        label_ids="class",  # labels/prediction holds class k for nnU-Net label k-1
    )
    # the paths stay out of the hash: the fingerprints tell a moved scan or model from another
    config_hash = store.config_hash(
        {k: v for k, v in config.items() if k not in ("model", "volume")}
    )
    model_fp = loaded_model_fingerprint(loaded)  # file hashes only: no pass over the volume
    if not cfg.overwrite:  # a changed model is named as such, before the hash check
        recorded = (store.scrollseg_info(out) or {}).get("fingerprints")
        check_resume_fingerprints(out, recorded, {"model": model_fp})
    # earlier versions hashed the paths too: their unfinished runs still resume
    resume = store.check_resume(out, config_hash, cfg.overwrite, [store.config_hash(config)])
    info = {
        "kind": "prediction",
        "version": __version__,
        "config_hash": config_hash,
        "complete": False,
        "labels": {  # class ids of labels/prediction (nnU-Net's label k-1 is class k)
            str(c.id): c.name for c in ClassTable.from_dataset_json(loaded.dataset_json).classes
        },
        **config,
        "fingerprints": {"model": model_fp},  # the input's is added after the first event
    }
    was_complete = resume and bool((store.scrollseg_info(out) or {}).get("complete"))
    return _Run(out, vol, mask, shape, spans, info, resume, was_complete)


def _fingerprints(run: _Run, cfg: PredictConfig) -> None:
    """Add the input's fingerprint to the model's; a resume on a changed input would mix
    both, so it is refused (a bounded sample of chunks is read)."""
    fingerprints = {**run.info["fingerprints"], "input": input_fingerprint(run.vol)}
    if not cfg.overwrite:
        recorded = (store.scrollseg_info(run.out) or {}).get("fingerprints")
        check_resume_fingerprints(run.out, recorded, fingerprints)
    run.info["fingerprints"] = fingerprints


def _passes(session: Predictor, run: _Run, cfg: PredictConfig) -> tuple[Grid, Any, Plan]:
    """The whole-volume passes (nonzero box, statistics, mask index) and the plan."""
    from napari_scrollseg.engine.predict.mask import mask_filter

    grid = session.grid(run.vol, cfg.step)
    normalizer = session.normalizer(run.vol)  # whole-volume statistics where needed
    patch = tuple(int(p) for p in grid.patch)
    keep = mask_filter(run.mask, run.shape, patch) if run.mask is not None else None
    starts = [tuple(int(o + s) for s in st) for o, st in zip(grid.offset, grid.starts)]
    the_plan = plan(starts, patch, run.spans, cfg.chunks, superchunk=cfg.superchunk, keep=keep)
    return grid, normalizer, the_plan


def _open_output(session: Predictor, run: _Run, cfg: PredictConfig) -> None:
    """Create the output (unless resuming) and its state folder."""
    if not run.resume:
        spacing = tuple(float(s) for s in run.vol.spacing)
        origin = getattr(run.vol, "origin", (0.0,) * 3)
        store.create_output(
            run.out,
            model=session.model,
            shape=tuple(b - a for a, b in run.spans),
            chunks=cfg.chunks,
            spacing=spacing,
            origin=tuple(float(o) + a * s for o, (a, _), s in zip(origin, run.spans, spacing)),
            attrs=run.info,
        )
    (run.state / "done").mkdir(parents=True, exist_ok=True)
    (run.state / "partial").mkdir(parents=True, exist_ok=True)
    (run.state / "config.json").write_text(json.dumps(run.info, indent=1))


def _iter_run(
    session: Predictor,
    model_ref: ModelRef,
    volume: Any,
    out: Any,
    cfg: PredictConfig,
    client: Any,
) -> Iterator[PredictProgress]:
    t0 = time.perf_counter()
    run = _check(session, model_ref, volume, out, cfg)
    tally = Tally(run.out)
    yield tally.event("prepare")
    _fingerprints(run, cfg)
    t1 = time.perf_counter()
    grid, normalizer, the_plan = yield from iter_in_thread(
        lambda: _passes(session, run, cfg), beat=lambda: tally.event("prepare")
    )
    t2 = time.perf_counter()
    _open_output(session, run, cfg)
    session.stats.add("prepare", (t1 - t0) + (time.perf_counter() - t2))
    session.stats.add("passes", t2 - t1)
    with run_lock(run.state):
        # one machine keeps partial sums in memory; a cluster exchanges them through files
        channels = session.model.n_classes + (run.mask is not None)
        held = budget(cfg.chunks, grid.patch, channels) if client is None else 0
        cancel = CancelEvent()  # set when the run stops: running blocks end after a batch
        session.stats.partial_budget = held
        job = Job(
            model=model_ref if client is not None else session,
            volume=source_of(run.vol) if client is not None else run.vol,
            grid=grid,
            normalizer=normalizer,
            probs_path=str(run.out / "0"),
            labels_path=str(run.out / "labels" / store.LABELS_NAME / "0"),
            state=str(run.state),
            roi=run.spans,
            n_classes=session.model.n_classes,
            mirror=cfg.mirror,
            batch_size=cfg.batch_size,
            half=cfg.half,
            mask=None if run.mask is None else (source_of(run.mask) if client else run.mask),
            volume_shape=run.shape,
            run=uuid.uuid4().hex,
            partials=PartialSums(held, place(session.device, held)),
            cancel=cancel,
            inputs=None if client is not None else input_cache(run.vol, cfg.chunks, grid.patch),
        )
        done = {c.index for c in the_plan.chunks if store.marker_path(run.state, c.index).exists()}
        pending = [c.index for c in the_plan.chunks if c.index not in done]
        graph = build_graph(the_plan, job, pending, run.info["config_hash"][:8])
        _start(tally, the_plan, graph.block_keys, len(done))
        log.info(
            "predict %s -> %s: %d chunks (%d done before), %d tiles (%d skipped by the mask), "
            "%d block tasks, partial sums in memory up to %.0f MiB",
            run.info["volume"],
            run.out,
            tally.chunks_total,
            tally.chunks_resumed,
            tally.tiles_total,
            tally.tiles_skipped,
            tally.blocks_total,
            held / 2**20,
        )
        yield tally.event("predict")
        if run.was_complete and not graph.keys:  # a finished output: nothing to redo
            yield tally.event("done")
            return run.out
        front = PyramidFront(  # coarser levels while the chunks land
            [
                (run.out, cfg.prob_reduction),
                (run.out / "labels" / store.LABELS_NAME, cfg.label_reduction),
            ],
            stats=session.stats,
        )
        with contextlib.closing(front):
            for index in sorted(done):  # written by an earlier run
                front.chunk_done(index)
            if graph.keys:
                passes0 = session.forward_passes  # threaded: the tasks run in this session
                runner = (
                    run_windowed(
                        graph.chunk_order, graph.dsk, cfg.num_workers, cancel, every=BEAT_S
                    )
                    if client is None
                    else run_distributed(client, graph.dsk, graph.keys)
                )
                with contextlib.closing(runner):
                    for key, result in runner:
                        if key is None:  # a beat: count the tiles of blocks still running
                            moved = tally.beat(session.forward_passes - passes0)
                        else:
                            moved = tally.add(key, result)
                            if "chunk" in result:
                                front.chunk_done(result["chunk"])
                        if moved:
                            yield tally.event("predict")
            if tally.chunks_done < tally.chunks_total:  # pragma: no cover - runners finish all
                raise ScrollsegError(
                    f"only {tally.chunks_done} of {tally.chunks_total} chunks were written; "
                    "run again"
                )
            yield tally.event("pyramid")  # the coarser chunks still queued
            front.finish()
        shutil.rmtree(run.state / "partial", ignore_errors=True)
        store.write_attrs(run.out, {**run.info, "complete": True})
        yield tally.event("done")
        return run.out


def _start(tally: Tally, the_plan: Plan, to_run: dict, resumed: int) -> None:
    """Set the counts of a run about to start (the clock too)."""
    tally.chunks_total = len(the_plan.chunks)
    tally.chunks_resumed = tally.chunks_done = resumed
    tally.tiles_total = the_plan.tiles_total
    tally.tiles_skipped = the_plan.tiles_skipped
    tally.grid_tiles = the_plan.grid_tiles
    tally.blocks_total = len(to_run)
    tally.tiles_done = sum(len(b.tiles) for b in the_plan.blocks.values()) - sum(
        len(the_plan.blocks[b].tiles) for b in to_run
    )
    tally.t0 = time.perf_counter()


def _session_for(
    model: str | os.PathLike | Predictor, cfg: PredictConfig, client: Any
) -> tuple[Predictor, ModelRef, bool]:
    """The run's session, how workers load the model, and whether the run owns the session."""
    if isinstance(model, Predictor):
        if (
            cfg.folds is not None
            or cfg.device is not None
            or cfg.checkpoint != model.model.checkpoint
        ):
            raise ScrollsegError("give folds, checkpoint and device to the Predictor, not with it")
        return model, model.ref(), False
    # in the driver, a distributed run only needs the model's metadata
    device = "cpu" if client is not None else cfg.device
    session = Predictor(
        model, folds=cfg.folds, checkpoint=cfg.checkpoint, device=device, cache=None
    )
    return session, ModelRef(session.path, cfg.folds, cfg.checkpoint, cfg.device), True


def iter_predict_volume(
    model: str | os.PathLike | Predictor,
    volume: str | os.PathLike | Volume,
    out: str | os.PathLike,
    config: PredictConfig | None = None,
    *,
    client: Any = None,
    **options: Any,
) -> Iterator[PredictProgress]:
    """Predict a whole volume chunk by chunk, yielding a :class:`PredictProgress` per chunk.

    Parameters
    ----------
    model
        nnU-Net v2 trained-model folder or exported zip, or a warm
        :class:`~napari_scrollseg.engine.predict.Predictor` (then without ``folds``,
        ``checkpoint`` and ``device``: the session has them).
    volume
        Path/URL of the volume (anything :func:`~napari_scrollseg.engine.volumes.open_volume`
        reads) or an open :class:`Volume`. Distributed runs need a path the workers can open.
    out
        Output OME-Zarr (the prediction layout). Rerunning with the same options resumes.
    config, options
        A :class:`~napari_scrollseg.engine.config.PredictConfig` and/or its fields as
        keywords (``step``, ``mirror``, ``folds``, ``chunk``, ``roi``, ``mask``, ...;
        their meaning is documented there).
    client
        A ``distributed.Client``: run the graph on its cluster instead of dask's threaded
        scheduler.

    Returns (as the generator's value) the output path. Closing the generator cancels.
    """
    cfg = (config or PredictConfig()).replace(**options) if options else config or PredictConfig()
    session, model_ref, owned = _session_for(model, cfg, client)
    try:
        return (yield from _iter_run(session, model_ref, volume, out, cfg, client))
    finally:
        if owned:
            session.close()


def prepare_output(
    model: str | os.PathLike | Predictor,
    volume: str | os.PathLike | Volume,
    out: str | os.PathLike,
    config: PredictConfig | None = None,
    **options: Any,
) -> Path:
    """Check a run's inputs and create its output before the run: every array and pyramid
    level (unwritten chunks read as 0), the provenance and the state folder, so a viewer
    can open the output first. :func:`iter_predict_volume` with the same arguments then
    fills it (it resumes into the prepared store). An output already holding this run is
    left as it is. Arguments as :func:`iter_predict_volume` (``overwrite`` replaces the
    output here: run without it then). Returns the output path.
    """
    cfg = (config or PredictConfig()).replace(**options) if options else config or PredictConfig()
    session, model_ref, owned = _session_for(model, cfg, None)
    try:
        run = _check(session, model_ref, volume, out, cfg)
        _fingerprints(run, cfg)
        _open_output(session, run, cfg)
        return run.out
    finally:
        if owned:
            session.close()


def predict_volume(
    model: str | os.PathLike | Predictor,
    volume: str | os.PathLike | Volume,
    out: str | os.PathLike,
    config: PredictConfig | None = None,
    *,
    progress: Callable[[PredictProgress], None] | None = None,
    bar: bool | None = None,
    **options: Any,
) -> Path:
    """Run :func:`iter_predict_volume` to the end and return the output path.

    ``progress`` receives every event. ``bar`` shows a tqdm bar on the terminal
    (chunks, tiles, voxels/s, ETA); by default only when there is no ``progress``.
    Other arguments as :func:`iter_predict_volume`.
    """
    from napari_scrollseg.engine.progress import drive

    events = iter_predict_volume(model, volume, out, config, **options)
    show = bool(bar or (bar is None and progress is None))
    return Path(drive(events, progress, bar=bar_state if show else None))
