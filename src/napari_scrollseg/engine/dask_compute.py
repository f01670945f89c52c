"""Dask computations that leave dask's process-global callbacks alone.

dask's local schedulers (threads, sync, processes), given no ``callbacks=``, take the
process-global ``Callback.active`` set for the length of a compute, leave an empty set in
its place and put theirs back when done. napari registers its dask cache there while it
draws a dask-backed layer on the GUI thread; an engine compute on a worker thread at the
same time then runs napari's cache on the engine's tasks (``KeyError`` in its
``_posttask``) or puts back the empty set, dropping napari's cache for good.

Every engine computation goes through :func:`compute`, :func:`store` or
:func:`to_numpy`: they pass the callbacks of :func:`thread_callbacks` (this thread's
only) explicitly, so dask never reads or swaps the global set. A distributed client,
which runs no local callbacks, gets no ``callbacks=``. :func:`thread_scheduler` picks
this thread's default scheduler, where ``dask.config.set`` would change every thread's.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dask.callbacks import Callback

_local = threading.local()


@contextmanager
def thread_callbacks(*callbacks: Callback) -> Iterator[None]:
    """Run ``callbacks`` on this thread's computations made through this module."""
    before = getattr(_local, "callbacks", ())
    _local.callbacks = before + tuple(cb._callback for cb in callbacks)
    try:
        yield
    finally:
        _local.callbacks = before


@contextmanager
def thread_scheduler(scheduler: str) -> Iterator[None]:
    """Make ``scheduler`` the default of this thread's computations through this module."""
    before = getattr(_local, "scheduler", None)
    _local.scheduler = scheduler
    try:
        yield
    finally:
        _local.scheduler = before


def _scheduler_kwargs(collections: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus this thread's ``callbacks=`` when a local scheduler will run them."""
    import dask
    import dask.local
    import dask.multiprocessing
    import dask.threaded
    from dask.base import get_scheduler, is_dask_collection

    if kwargs.get("scheduler") is None and getattr(_local, "scheduler", None):
        kwargs = {**kwargs, "scheduler": _local.scheduler}
    dask_collections = [c for c in collections if is_dask_collection(c)]
    if (
        kwargs.get("scheduler") is None
        and dask_collections
        and "distributed" not in sys.modules
        and dask.config.get("scheduler", None) is None
    ):
        # No client can exist before distributed is imported: naming the collections'
        # default scheduler keeps dask from importing it (0.3 s here) to look for one.
        kwargs = {**kwargs, "scheduler": dask_collections[0].__dask_scheduler__}
    if "callbacks" in kwargs:
        return kwargs
    scheduler = get_scheduler(scheduler=kwargs.get("scheduler"), collections=dask_collections)
    local = (dask.threaded.get, dask.local.get_sync, dask.multiprocessing.get)
    if scheduler in local or getattr(scheduler, "func", None) is dask.local.get_async:
        return {**kwargs, "callbacks": getattr(_local, "callbacks", ())}
    return kwargs  # a distributed client (or a custom get): local callbacks do not apply


def compute(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """``dask.compute(*args, **kwargs)`` without touching dask's global callbacks."""
    import dask

    return dask.compute(*args, **_scheduler_kwargs(args, kwargs))


def to_numpy(arr: Any, **kwargs: Any) -> np.ndarray:
    """``arr`` as a numpy array, computed by :func:`compute` when it is a dask collection."""
    from dask.base import is_dask_collection

    if is_dask_collection(arr):
        (arr,) = compute(arr, **kwargs)
    return np.asarray(arr)


def store(sources: Any, targets: Any, **kwargs: Any) -> Any:
    """``dask.array.store(sources, targets, **kwargs)`` without the global callbacks."""
    import dask.array as da

    srcs = tuple(sources) if isinstance(sources, list | tuple) else (sources,)
    return da.store(sources, targets, **_scheduler_kwargs(srcs, kwargs))
