"""A warm prediction session: one loaded model on one device, its lock and its caches."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.predict.cache import TileCache
from napari_scrollseg.engine.predict.stats import PipelineStats

if TYPE_CHECKING:
    import numpy as np
    import torch

    from napari_scrollseg.engine.model import LoadedModel
    from napari_scrollseg.engine.predict.region import RegionProgress
    from napari_scrollseg.engine.tiling import Grid

__all__ = ["DEFAULT_CACHE_BYTES", "ModelRef", "Predictor"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 1 << 30
Box = tuple[slice, ...]


@dataclass(frozen=True)
class ModelRef:
    """How to load a model again elsewhere (picklable: dask.distributed workers)."""

    path: str
    folds: tuple[int | str, ...] | None
    checkpoint: str
    device: str | None


class Predictor:
    """A prediction session: a loaded model, its device and one lock, the tile cache.

    Every forward pass goes through :meth:`forward`, which holds :attr:`lock` (one network
    call on the device at a time; reading and writing overlap it) and counts tiles in
    :attr:`forward_passes` (one per tile whatever the folds and TTA, so it compares with
    nnU-Net's number of sliding-window steps). Whole-volume passes (nonzero box,
    normalization statistics) are cached per volume on the model. Keep one session warm
    for live requests (:meth:`iter_predict_region`) and hand it to
    :func:`~napari_scrollseg.engine.predict.iter_predict_volume`; :meth:`close` frees it.

    Parameters
    ----------
    model
        A trained-model folder or zip (loaded with
        :func:`~napari_scrollseg.engine.model.load_model`), or a loaded model.
    folds, checkpoint, device, configuration
        As :func:`~napari_scrollseg.engine.model.load_model` (for a path only).
    cache
        The tile cache: a byte bound for a new :class:`TileCache`, a cache to use, or
        None / 0 for none.
    """

    def __init__(
        self,
        model: str | os.PathLike | LoadedModel,
        *,
        folds: Any = None,
        checkpoint: str = "checkpoint_final.pth",
        device: str | torch.device | None = None,
        configuration: str | None = None,
        cache: TileCache | int | None = DEFAULT_CACHE_BYTES,
    ) -> None:
        from napari_scrollseg.engine.model import LoadedModel, load_model

        if isinstance(model, LoadedModel):
            self.path = str(model.folder)
            self._device_arg: str | None = str(model.device)
            self._model: LoadedModel | None = model
        else:
            from napari_scrollseg.engine.builtin import resolve_model

            self.path = str(resolve_model(model).absolute())  # a built-in model's name too
            self._device_arg = None if device is None else str(device)
            self._model = load_model(
                self.path,
                folds=folds,
                checkpoint=checkpoint,
                device=device,
                configuration=configuration,
            )
        self.device = self._model.device
        self.lock = threading.RLock()
        self.cache: TileCache | None = (
            cache if isinstance(cache, TileCache) else TileCache(cache) if cache else None
        )
        self.forward_passes = 0
        self.batch_limit: int | None = None  # set by an out of memory (see forward)
        self._tile_bytes: int | None = None  # CUDA memory one tile took (see batch_for)
        self.stats = PipelineStats()  # time per stage of the whole-volume runs (benchmarks)

    # -- the model --------------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        """The loaded model; a :class:`ScrollsegError` once the session is closed."""
        if self._model is None:
            raise ScrollsegError("this prediction session is closed: open a new Predictor")
        return self._model

    @property
    def closed(self) -> bool:
        return self._model is None

    def ref(self) -> ModelRef:
        """How a worker process loads the same model (on the device asked for)."""
        m = self.model
        return ModelRef(self.path, m.folds, m.checkpoint, self._device_arg)

    def forward(self, batch: torch.Tensor, **options: Any) -> torch.Tensor:
        """:meth:`LoadedModel.forward` (same options) under the session's lock, counted.

        A batch the device has no memory for is run in halves (down to one tile; then a
        :class:`ScrollsegError` says what to do), and later batches are kept to the size
        that fitted (:meth:`batch_for`)."""
        with self.lock, self.stats.time("network"):
            return self._forward_fitting(batch, options)

    def _forward_fitting(self, batch: torch.Tensor, options: dict) -> torch.Tensor:
        import torch

        n = int(batch.shape[0])
        if self.batch_limit is None or n <= self.batch_limit:
            try:
                return self._forward_counted(batch, options)
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if n == 1:
                    raise ScrollsegError(
                        f"the device {self.device} ran out of memory on a single tile "
                        f"{tuple(batch.shape[2:])} of this model: free the device (close other "
                        "programs), turn mirroring off, or choose the cpu device"
                    ) from None
                self.batch_limit = n // 2
                log.warning("out of memory on %s: batches of %d tiles", self.device, n // 2)
        parts, done = [], 0
        while done < n:  # in pieces of what fits (smaller if a piece runs out too)
            step = self.batch_limit
            parts.append(self._forward_fitting(batch[done : done + step], options))
            done += step
        return torch.cat(parts)

    def _forward_counted(self, batch: torch.Tensor, options: dict) -> torch.Tensor:
        import torch

        n = int(batch.shape[0])
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        out = self.model.forward(batch, **options)
        if cuda:  # the device memory one tile of this run takes, at most
            peak = torch.cuda.max_memory_allocated(self.device) - before
            self._tile_bytes = max(self._tile_bytes or 0, -(-peak // n))
        self.forward_passes += n
        return out

    def batch_for(self, requested: int) -> int:
        """Tiles per network batch: ``requested``, at most what fitted after an out of
        memory, and on CUDA at most what the free device memory holds (from the memory a
        tile took so far; none measured yet: ``requested``). The CPU keeps ``requested``."""
        n = requested if self.batch_limit is None else max(1, min(requested, self.batch_limit))
        if self.device.type != "cuda" or not self._tile_bytes:
            return n
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(n, int(0.8 * free) // self._tile_bytes))

    # -- volumes ----------------------------------------------------------------------------
    def bbox(self, volume: Any) -> Box:
        """The volume's nonzero box (one pass over it, cached per volume)."""
        return self.model.bbox(volume)

    def grid(self, volume: Any, step: float = 0.5, *, bbox: Box | None = None) -> Grid:
        """nnU-Net's global tile grid over the volume (see :meth:`LoadedModel.grid`)."""
        return self.model.grid(volume, step, bbox=bbox)

    def normalizer(self, volume: Any, *, bbox: Box | None = None) -> Any:
        """The volume's normalization (statistics cached per volume)."""
        return self.model.normalizer(volume, bbox=bbox)

    # -- regions ----------------------------------------------------------------------------
    def iter_predict_region(
        self, volume: Any, box: Any, **options: Any
    ) -> Iterator[RegionProgress]:
        """See :func:`~napari_scrollseg.engine.predict.iter_predict_region`."""
        from napari_scrollseg.engine.predict.region import iter_predict_region

        return iter_predict_region(self, volume, box, **options)

    def predict_region(
        self, volume: Any, box: Any, **options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """See :func:`~napari_scrollseg.engine.predict.predict_region`."""
        from napari_scrollseg.engine.predict.region import predict_region

        return predict_region(self, volume, box, **options)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the model, its cached volume passes and the tile cache (idempotent)."""
        with self.lock:
            if self._model is None:
                return
            self._model.volumes.clear()
            self._model = None
            if self.cache is not None:
                self.cache.clear()
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.device}, {self.forward_passes} tiles run"
        return f"Predictor({self.path!r}, {state})"
