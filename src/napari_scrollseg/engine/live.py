"""Live inference: predict the region on screen, the full run's answer there, fast.

A :class:`LivePredictor` owns one worker thread (which alone uses the device), a warm
prediction session (:class:`~napari_scrollseg.engine.predict.Predictor`: the model, its
lock and forward-pass count) and a :class:`~napari_scrollseg.engine.predict.TileCache`.
A request is a box of the volume (the view: one slice of a 2D view, or the visible box
of a 3D view), run by the session's region generator (:func:`~napari_scrollseg.engine.predict.iter_predict_region`):

* the box is cut into *blocks* (the tile grid's patch size, on a grid aligned with the
  volume) that run nearest the box centre first; each block lands (an event with its
  probabilities and labels) as soon as every tile touching it has run;
* the tiles are those of nnU-Net's global grid over the whole volume that touch the
  box, so the answer there equals the full run's (:mod:`.predict_volume`);
* finished tiles (and each block's answer) are kept in the cache, keyed by model,
  checkpoint, folds, device, volume level, step, TTA and precision: panning back, or
  stepping a slice within the same tiles, runs no forward pass;
* a new request cancels the running one (its queued batches are dropped; the batch on
  the device finishes and its tiles are cached); :meth:`LivePredictor.view_moved`
  drops only the blocks the view has left;
* ``max_tiles`` caps the tiles one request runs (blocks nearest the centre first), and
  :meth:`LivePredictor.estimate` says what a request would cost before it runs.
* on a pyramid, a view whose request at the model's level exceeds ``max_tiles`` runs on
  the finest coarser level whose request fits: a coarse preview (``exact=False``, placed
  at that level's scale and origin); zoomed in, the model's level runs, exactly.

Models whose normalisation uses the input's own statistics (``zscore``, ...) get the
statistics of the whole volume (one dask reduction, cached), so live still equals full.
No Qt here: a script uses it as the widget does.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    from napari_scrollseg.engine.model import LoadedModel
    from napari_scrollseg.engine.predict import Predictor, TileCache
    from napari_scrollseg.engine.tiling import Grid

log = logging.getLogger(__name__)

__all__ = [
    "Estimate",
    "LiveEvent",
    "LiveOptions",
    "LivePredictor",
    "LiveRequest",
    "choose_level",
    "view_blocks",
]

Box = tuple[slice, ...]
# a view in world units: (low corner, high corner, plane axis or None); a 2D view is the
# plane through low[axis] == high[axis]
WorldBox = tuple[tuple[float, ...], tuple[float, ...], int | None]
PRECISIONS = ("auto", "half", "float")


# -- pure helpers -----------------------------------------------------------------------------
def choose_level(level_spacings: Sequence[Sequence[float]], model_spacing: Sequence[float]) -> int:
    """The pyramid level whose voxel size is closest to the model's (log-ratio distance).

    ``model_spacing`` of a 2D model is in-plane ``(y, x)``: only the last axes compare.
    """
    target = np.log(np.asarray(model_spacing, float))
    best, best_d = 0, math.inf
    for i, sp in enumerate(level_spacings):
        s = np.log(np.asarray(sp, float)[-len(target) :])
        d = float(np.abs(s - target).sum())
        if d < best_d - 1e-9:
            best, best_d = i, d
    return best


def view_blocks(box: Box, block: Sequence[int]) -> list[Box]:
    """``box`` cut along a global grid of ``block``-sized cells, nearest its centre first."""
    per_axis = []
    for sl, b in zip(box, block, strict=True):
        first = (sl.start // b) * b
        per_axis.append(
            [slice(max(s, sl.start), min(s + b, sl.stop)) for s in range(first, sl.stop, b)]
        )
    centre = np.array([(sl.start + sl.stop) / 2 for sl in box])
    blocks = [tuple(p) for p in itertools.product(*per_axis)]
    return sorted(
        blocks,
        key=lambda bl: float(
            np.linalg.norm(np.array([(s.start + s.stop) / 2 for s in bl]) - centre)
        ),
    )


def _as_box(box: Any, shape: Sequence[int]) -> Box:
    """Clip ``box`` (slices or (start, stop) pairs) to the volume; refuse an empty one."""
    if len(box) != len(shape):
        raise ScrollsegError(f"view box {box} needs {len(shape)} axes (z, y, x)")
    out = []
    for b, n in zip(box, shape):
        start, stop = (b.start, b.stop) if isinstance(b, slice) else (b[0], b[1])
        start, stop = max(int(start or 0), 0), min(int(n if stop is None else stop), int(n))
        if start >= stop:
            raise ScrollsegError(
                f"the view {tuple(box)} does not overlap the volume of shape {tuple(shape)}: "
                "move the view over the scan"
            )
        out.append(slice(start, stop))
    return tuple(out)


def _intersects(a: Box, b: Box) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


# -- public records ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveOptions:
    """Settings of live prediction; every field except ``max_tiles`` keys the tile cache.

    ``precision``: ``"auto"`` (nnU-Net's: autocast on CUDA only), ``"half"`` or
    ``"float"``. ``level``: pyramid level to predict on, or None for the level whose
    voxel size is closest to the model's spacing. ``max_tiles``: cap on the tiles one
    request runs (None: no cap).
    """

    folds: tuple[int | str, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    device: str | None = None
    step: float = 0.5
    mirror: bool = True
    precision: str = "auto"
    batch_size: int = 4
    max_tiles: int | None = 256
    level: int | None = None
    ignore_spacing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ScrollsegError(
                f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}"
            )
        if not 0 < self.step <= 1:
            raise ScrollsegError(f"step {self.step} must be in (0, 1]")
        if self.batch_size < 1:
            raise ScrollsegError(f"batch size must be at least 1, got {self.batch_size}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ScrollsegError(f"max_tiles must be at least 1 (or None), got {self.max_tiles}")

    @property
    def half(self) -> bool | None:
        """The ``half`` argument of :meth:`LoadedModel.forward`."""
        return {"auto": None, "half": True, "float": False}[self.precision]


@dataclass(frozen=True)
class Estimate:
    """What a request would cost: tiles touching the box, already cached, to run, the
    tiles the cap lets run, and seconds at the last measured rate (None before any)."""

    tiles: int
    cached: int
    to_run: int
    capped_to: int
    seconds: float | None

    @property
    def capped(self) -> bool:
        """True if the cap leaves some of the box without a prediction."""
        return self.capped_to < self.to_run


@dataclass(frozen=True)
class LiveEvent:
    """One block of a request has landed (or the request ended: ``block`` is None).

    ``box``/``block`` are in the coordinates of level ``level``; ``probs`` float32
    ``(n_classes, *block shape)`` and ``labels`` (class ids 1..K, as the full run writes)
    cover ``block``.
    ``error`` is set when the request failed (a :class:`ScrollsegError`).
    """

    request: LiveRequest
    block: Box | None
    probs: np.ndarray | None
    labels: np.ndarray | None
    final: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class LiveRequest:
    """A submitted view box; filled in by the worker thread.

    ``probs``/``labels`` cover ``box`` (level coordinates) once blocks land (zeros /
    label 0 where none has yet, or where the cap or a cancel stopped it). ``level`` is
    the pyramid level it ran on; ``exact`` is False for a coarse preview (a view whose
    request at the model's level would exceed the tile cap ran on a coarser level).
    Times: ``compute_s`` in the network, ``finish_s`` placing landed blocks, ``read_s`` the
    rest (reading not hidden behind the network, summing, softmax).
    """

    id: int
    box: Box
    level: int
    tiles: int = 0
    tiles_run: int = 0
    tiles_cached: int = 0
    tiles_dropped: int = 0
    blocks_total: int = 0
    blocks_done: int = 0
    read_s: float = 0.0
    compute_s: float = 0.0
    finish_s: float = 0.0
    total_s: float = 0.0
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    scale: tuple[float, ...] = (1.0, 1.0, 1.0)
    translate: tuple[float, ...] = (0.0, 0.0, 0.0)
    capped: bool = False
    error: BaseException | None = None
    visible: Box | None = None
    world: WorldBox | None = None
    visible_world: WorldBox | None = None
    load_only: bool = False  # :meth:`LivePredictor.submit_load`: load, predict nothing
    exact: bool = True  # False: a coarse preview on a pyramid level coarser than the model's
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Drop the blocks not yet run (the batch on the device finishes)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        """Whether the worker has finished with this request (complete, cancelled, failed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> LiveRequest:
        """Block until the request ends; re-raise its error. Returns self."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"live request {self.id} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self


# -- the predictor ----------------------------------------------------------------------------
class LivePredictor:
    """Requests for the region on screen, run on one worker thread that owns the device.

    Parameters
    ----------
    model
        Trained-model folder or zip, or a :class:`LoadedModel` (then ``options.folds``,
        ``checkpoint`` and ``device`` are the model's own).
    volume
        A :class:`~napari_scrollseg.engine.volumes.Volume` (any level can be predicted),
        a path/URL, or a ``(z, y, x)`` / ``(c, z, y, x)`` array.
    options
        :class:`LiveOptions`.
    cache
        A shared :class:`TileCache` (e.g. kept by a widget across setting changes);
        by default one of ``cache_mb`` MB.
    on_event
        Called on the worker thread with each :class:`LiveEvent`.
    """

    def __init__(
        self,
        model: str | os.PathLike | LoadedModel,
        volume: Any,
        options: LiveOptions | None = None,
        *,
        cache: TileCache | None = None,
        cache_mb: float = 1024,
        on_event: Callable[[LiveEvent], None] | None = None,
    ) -> None:
        from napari_scrollseg.engine.predict import TileCache

        self.options = options or LiveOptions()
        self._model_arg = model
        self._volume_arg = volume
        self.cache = cache if cache is not None else TileCache(int(cache_mb * 2**20))
        self.on_event = on_event
        self.model: LoadedModel | None = None
        self.session: Predictor | None = None
        self.rate: float | None = None  # tiles per second, last request that ran tiles
        self._volume: Any = None
        self._levels: dict[int, tuple[Any, Grid]] = {}
        self._ids = itertools.count(1)
        self._queue: queue.Queue[LiveRequest | None] = queue.Queue()
        self._current: LiveRequest | None = None
        self._lock = threading.Lock()  # guards _current (short holds only)
        self._load_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="scrollseg-live", daemon=True)
        self._thread.start()

    # -- set-up (worker thread, or a caller that wants to wait for it) --------------------
    def load(self) -> LoadedModel:
        """Load the model (once) and open the volume; raise :class:`ScrollsegError`."""
        with self._load_lock:
            if self.session is None:
                from napari_scrollseg.engine.predict import Predictor

                o = self.options
                # the session runs on our tile cache (maybe shared across settings)
                self.session = Predictor(
                    self._model_arg, folds=o.folds, checkpoint=o.checkpoint, device=o.device,
                    cache=self.cache,
                )  # fmt: skip
                self.model = self.session.model
            if self._volume is None:
                v = self._volume_arg
                if isinstance(v, str | os.PathLike):
                    from napari_scrollseg.engine.volumes import open_volume

                    v = open_volume(v)
                self._volume = v
            return self.model

    @property
    def forward_passes(self) -> int:
        """Tiles this predictor's session has run through the network."""
        return self.session.forward_passes if self.session is not None else 0

    @property
    def level_spacings(self) -> list[tuple[float, ...]]:
        """Spacing of each level of the volume (one entry for a plain array)."""
        v = self._volume
        if hasattr(v, "levels"):
            return [tuple(v.level_spacing(i)) for i in range(len(v.levels))]
        return [tuple(getattr(v, "spacing", None) or (1.0, 1.0, 1.0))]

    def level(self) -> int:
        """The level requests run on: ``options.level``, else the closest to the model."""
        model = self.load()
        if self.options.level is not None:
            n = len(self.level_spacings)
            if not 0 <= self.options.level < n:
                raise ScrollsegError(f"the volume has levels 0..{n - 1}, not {self.options.level}")
            return self.options.level
        return choose_level(self.level_spacings, model.spacing)

    def geometry(self, level: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(scale, translate) of a level in world units, for placing result layers."""
        self.load()
        lv = self.level() if level is None else level
        v = self._volume
        scale = self.level_spacings[lv]
        origins = getattr(v, "level_origins", ()) or ()
        if lv < len(origins):
            origin = origins[lv]
        else:  # the centre of the level-0 voxels a coarser voxel pools (OME-Zarr's way)
            origin0, scale0 = getattr(v, "origin", None) or (0.0,) * 3, self.level_spacings[0]
            origin = [o + (s - s0) / 2 for o, s, s0 in zip(origin0, scale, scale0)]
        return tuple(float(s) for s in scale), tuple(float(o) for o in origin)

    def _level(self, lv: int) -> tuple[Any, Grid]:
        """The level's volume and its global grid (checked against the model once)."""
        if lv not in self._levels:
            model = self.load()
            v = self._volume
            if hasattr(v, "levels") and lv:
                from napari_scrollseg.engine.volumes import _from_level

                v = _from_level(v, lv)
            # a level coarser than the model's, chosen for a preview, is coarse on purpose
            preview = self.options.level is None and lv > self.level()
            model.check_volume(v, ignore_spacing=self.options.ignore_spacing or preview)
            self._levels[lv] = (v, model.grid(v, self.options.step))
        return self._levels[lv]

    def shape(self, level: int | None = None) -> tuple[int, ...]:
        """Spatial shape of a level."""
        from napari_scrollseg.engine.volumes import as_czyx

        self.load()
        lv = self.level() if level is None else level
        v = self._volume
        data = v.levels[lv] if hasattr(v, "levels") else v
        return tuple(int(s) for s in as_czyx(data)[0].shape[1:])

    @property
    def normalization_note(self) -> str | None:
        """A sentence for the user when the model normalises with the input's statistics."""
        model = self.load()
        if not model.needs_volume_stats:
            return None
        return (
            f"this model normalises with the input's own statistics "
            f"({', '.join(model.normalization_schemes)}): they are computed once over the "
            "whole volume, so live results equal the full run's"
        )

    def _key(self) -> tuple:
        """What the tile cache keys by besides the model's weights, device, volume, TTA and
        precision (:func:`~napari_scrollseg.engine.predict.region.cache_prefix`)."""
        model = self.load()
        return tuple(str(f) for f in model.folds), model.checkpoint, self.options.step

    def _prefix(self, lv: int) -> tuple:
        from napari_scrollseg.engine.predict.region import cache_prefix

        v, grid = self._level(lv)
        o = self.options
        return (*cache_prefix(self.load(), v, grid, mirror=o.mirror, half=o.half), *self._key())

    # -- planning -----------------------------------------------------------------------
    def _plan(self, box: Box, lv: int) -> tuple[list[Box], list[list[tuple[int, ...]]]]:
        """The view's blocks (nearest the centre first) and the tiles touching each."""
        _, grid = self._level(lv)
        blocks = view_blocks(box, [min(p, b.stop - b.start) or 1 for p, b in zip(grid.patch, box)])
        return blocks, [grid.tiles_intersecting(b) for b in blocks]

    def estimate(self, box: Any, level: int | None = None) -> Estimate:
        """Tiles a request for ``box`` would touch, find cached and run (no forward pass;
        the region's own plan, looking the cache up without using it)."""
        from napari_scrollseg.engine.predict.region import block_keys, plan_tiles

        lv = self.level() if level is None else level
        box = _as_box(box, self.shape(lv))
        blocks, tiles_of = self._plan(box, lv)
        prefix = self._prefix(lv)
        keys = block_keys(prefix, blocks)
        whole = plan_tiles(self.cache.peek, prefix, tiles_of, keys, None)
        cap = self.options.max_tiles
        capped = whole if cap is None else plan_tiles(self.cache.peek, prefix, tiles_of, keys, cap)
        seconds = len(capped.to_run) / self.rate if self.rate else None
        return Estimate(
            whole.tiles_total, whole.tiles_cached, len(whole.to_run), len(capped.to_run), seconds
        )

    # -- requests -----------------------------------------------------------------------
    def submit(self, box: Any, level: int | None = None) -> LiveRequest:
        """Queue a request for ``box`` (level coordinates); cancels every earlier request.

        Errors (a model that does not load, a box outside the volume) come back in the
        request (``error``, and :meth:`LiveRequest.wait` raises them).
        """
        return self._enqueue(LiveRequest(0, tuple(box), -1 if level is None else level))

    def submit_load(self) -> LiveRequest:
        """Load the model and open the volume on the worker, predicting nothing (e.g. so
        a viewer can make its result layers before the first request). Its final event
        carries the level's ``scale``/``translate``, or the load's ``error``. It cancels
        no request; a request submitted after it drops it (the request loads too)."""
        return self._enqueue(LiveRequest(0, (), -1, load_only=True))

    def _enqueue(self, req: LiveRequest) -> LiveRequest:
        if self._closed:
            raise ScrollsegError("this live predictor is closed: make a new one")
        req.id = next(self._ids)
        if req.load_only:
            self._queue.put(req)
            return req
        with self._lock:
            current = self._current
        if current is not None:
            current.cancel()
        while True:  # drop queued requests
            try:
                old = self._queue.get_nowait()
            except queue.Empty:
                break
            if old is not None:
                old.cancel()
                old._done.set()
        self._queue.put(req)
        return req

    def submit_world(
        self, low: Sequence[float], high: Sequence[float], plane_axis: int | None = None
    ) -> LiveRequest:
        """:meth:`submit` for a view in world units (what a viewer's camera shows).

        ``low``/``high`` are the view's corners ``(z, y, x)`` in world units (the scan's
        spacing and origin); with ``plane_axis`` the view is the one voxel thick plane at
        ``low[plane_axis]`` (a 2D view). Converted on the worker thread, at the level the
        request runs on.
        """
        world = (tuple(map(float, low)), tuple(map(float, high)), plane_axis)
        return self._enqueue(LiveRequest(0, (), -1, world=world))

    def view_level(self, world: WorldBox) -> int:
        """The level a view (world units) runs on: the model's level (:meth:`level`) when
        its request fits ``max_tiles``, else the finest coarser pyramid level whose request
        fits (a coarse preview), else the coarsest. A set ``options.level`` always wins."""
        base = self.level()
        cap, n = self.options.max_tiles, len(self.level_spacings)
        if self.options.level is not None or cap is None or n == 1:
            return base
        for lv in range(base, n):
            box = _as_box(self.world_to_box(world, lv), self.shape(lv))
            if not self.estimate(box, lv).capped:
                return lv
        return n - 1

    def world_to_box(self, world: WorldBox, level: int) -> Box:
        """The voxel box of ``level`` covering a world-unit view (not clipped)."""
        low, high, plane = world
        scale, translate = self.geometry(level)
        box = []
        for axis, (lo, hi, s, t) in enumerate(zip(low, high, scale, translate, strict=True)):
            a, b = (lo - t) / s, (hi - t) / s
            if axis == plane:
                start = math.floor(a + 0.5)  # the slice napari shows at this position
                box.append(slice(start, start + 1))
            else:
                box.append(slice(math.floor(min(a, b)), math.ceil(max(a, b))))
        return tuple(box)

    def predict(self, box: Any, level: int | None = None, timeout: float | None = None):
        """Submit a request and wait for it (scripts, benchmarks). Returns the request."""
        return self.submit(box, level).wait(timeout)

    def view_moved(self, box: Any = None, *, world: WorldBox | None = None) -> None:
        """The view now shows ``box`` (level coordinates) or ``world`` (see
        :meth:`submit_world`): the running request drops the blocks it left (and is
        cancelled when none is left in view)."""
        with self._lock:
            current = self._current
        if current is not None and not current.done:
            if world is not None:
                current.visible_world = world
            else:
                current.visible = tuple(box)

    def close(self) -> None:
        """Cancel everything and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            current = self._current
        if current is not None:
            current.cancel()
        self._queue.put(None)
        self._thread.join(timeout=60)
        if self.session is not None:
            self.session.cache = None  # the cache may outlive us (shared): keep its tiles
            self.session.close()

    def __enter__(self) -> LivePredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker ---------------------------------------------------------------------
    def _emit(self, event: LiveEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a display error must not kill the worker
                log.exception("live event handler failed")

    def _loop(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            if req.cancelled:
                req._done.set()
                continue
            with self._lock:
                self._current = req
            t0 = time.perf_counter()
            try:
                self._run(req)
            except ScrollsegError as exc:
                req.error = exc
            except Exception as exc:  # a bug: keep the worker alive, report it
                log.exception("live request %d failed", req.id)
                req.error = exc
            finally:
                req.total_s = time.perf_counter() - t0
                with self._lock:
                    self._current = None
                req._done.set()
                self._emit(LiveEvent(req, None, None, None, final=True, error=req.error))

    def _run(self, req: LiveRequest) -> None:
        from napari_scrollseg.engine.predict.region import iter_predict_region
        from napari_scrollseg.engine.predict.tiles import label_dtype

        model = self.load()
        if req.level >= 0:
            lv = req.level
        elif req.world is not None and not req.load_only:
            lv = self.view_level(req.world)
        else:
            lv = self.level()
        req.level, req.exact = lv, lv == self.level()
        if req.load_only:
            req.scale, req.translate = self.geometry(lv)
            return
        if req.world is not None:
            req.box = self.world_to_box(req.world, lv)
        req.box = _as_box(req.box, self.shape(lv))
        req.scale, req.translate = self.geometry(lv)
        volume, grid = self._level(lv)
        blocks, tiles_of = self._plan(req.box, lv)
        req.blocks_total = len(blocks)
        req.tiles = len({t for tiles in tiles_of for t in tiles})
        shape = tuple(b.stop - b.start for b in req.box)
        req.probs = np.zeros((model.n_classes, *shape), np.float32)
        req.labels = np.zeros(shape, label_dtype(model.n_classes))

        def keep(pending: list[Box]) -> list[Box]:
            """Before each batch: nothing once cancelled, else the blocks still in view."""
            if req.cancelled:
                return []
            if req.visible_world is not None:
                req.visible = self.world_to_box(req.visible_world, lv)
            if req.visible is None:
                return pending
            kept = [b for b in pending if _intersects(b, req.visible)]
            if not kept:
                req.cancel()
            return kept

        o = self.options
        network = self.session.stats.seconds  # type: ignore[union-attr]
        network_before, t_run = network.get("network", 0.0), time.perf_counter()
        for ev in iter_predict_region(
            self.session,  # type: ignore[arg-type]
            volume,
            req.box,
            step=o.step,
            mirror=o.mirror,
            batch_size=o.batch_size,
            half=o.half,
            ignore_spacing=True,  # checked once per level (_level)
            bbox=grid.data,
            blocks=blocks,
            max_tiles=o.max_tiles,
            keep=keep,
            key=self._key(),
        ):
            req.tiles_run, req.tiles_cached = ev.tiles_done, ev.tiles_cached
            req.capped, req.tiles_dropped = ev.capped, ev.tiles_capped
            if ev.block is not None:
                t0 = time.perf_counter()
                local = tuple(
                    slice(s.start - r.start, s.stop - r.start) for s, r in zip(ev.block, req.box)
                )
                labels = ev.labels + 1  # the annotation's class ids, as the full run writes them
                req.probs[(slice(None), *local)] = ev.probs
                req.labels[local] = labels
                req.blocks_done += 1
                req.finish_s += time.perf_counter() - t0
                self._emit(LiveEvent(req, ev.block, ev.probs, labels))
        elapsed = time.perf_counter() - t_run
        req.compute_s = network.get("network", 0.0) - network_before
        req.read_s = max(elapsed - req.compute_s - req.finish_s, 0.0)
        if req.tiles_run:
            self.rate = req.tiles_run / max(elapsed, 1e-6)
        log.debug(
            "live request %d: %d tiles run, %d cached, %d blocks of %d",
            req.id,
            req.tiles_run,
            req.tiles_cached,
            req.blocks_done,
            req.blocks_total,
        )
