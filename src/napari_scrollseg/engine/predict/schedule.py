"""Run a task graph: dask's threaded scheduler or a dask.distributed cluster, yielding each
finished task as it lands; closing the iterator cancels what has not started.
:func:`iter_in_thread` runs a whole-volume pass off the caller's thread, cancellable."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

from napari_scrollseg.engine.errors import ScrollsegError

CLUSTERS = ("local", "local-cuda", "slurm")
T = TypeVar("T")


class _Cancelled(Exception):
    pass


def run_threaded(
    dsk: dict, keys: list, num_workers: int, cancel: threading.Event, every: float | None = None
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(key, result)`` per finished task; with ``every``, also ``(None, None)``
    after each ``every`` seconds in which no task finished (a beat)."""
    from concurrent.futures import ThreadPoolExecutor

    from dask.callbacks import Callback
    from dask.threaded import get

    events: queue.Queue = queue.Queue()

    class _Events(Callback):
        def _pretask(self, key, dsk, state):
            if cancel.is_set():
                raise _Cancelled

        def _posttask(self, key, result, dsk, state, worker_id):
            events.put(("task", key, result))

    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="scrollseg-task")

    def target() -> None:
        try:
            get(dsk, keys, num_workers=num_workers, pool=pool, callbacks=[_Events()._callback])
            events.put(("end", None, None))
        except BaseException as exc:  # handed to the consuming thread
            events.put(("error", None, exc))

    thread = threading.Thread(target=target, name="scrollseg-predict", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, key, value = events.get(timeout=every)
            except queue.Empty:  # nothing finished for ``every`` seconds: a beat
                yield None, None
                continue
            if kind == "task":
                yield key, value
            elif kind == "end" or isinstance(value, _Cancelled):
                return
            else:
                raise value
    finally:
        cancel.set()
        thread.join()
        pool.shutdown(wait=True)  # tasks already running finish; none is left behind


def run_distributed(client, dsk: dict, keys: list) -> Iterator[tuple[Any, Any]]:
    from distributed import as_completed

    futures = client.get(dsk, keys, sync=False)
    try:
        for future in as_completed(futures):
            yield future.key, future.result()
    finally:
        client.cancel(futures)


@contextlib.contextmanager
def open_client(
    *,
    scheduler: str | None = None,
    cluster: str | None = None,
    workers: int = 2,
    threads_per_worker: int = 1,
    queue: str | None = None,
    account: str | None = None,
    walltime: str = "04:00:00",
    job_cores: int = 8,
    job_memory: str = "64GB",
    job_extra: Sequence[str] = (),
):
    """A dask.distributed client for ``scheduler`` (address) or a new ``cluster``.

    ``cluster`` is ``"local"`` (LocalCluster of ``workers`` processes), ``"local-cuda"``
    (dask-cuda, one worker per GPU) or ``"slurm"`` (dask-jobqueue SLURMCluster scaled
    to ``workers`` jobs). Yields ``None`` when neither is given (threaded scheduler).
    """
    if scheduler and cluster:
        raise ScrollsegError("give either --scheduler or --cluster, not both")
    if not scheduler and not cluster:
        yield None
        return
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ScrollsegError(
                f"cannot reach the dask scheduler at {scheduler} ({exc}); check the address"
            ) from None
        with client:
            yield client
        return
    if cluster == "local":
        from distributed import LocalCluster

        made = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        )
    elif cluster == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ScrollsegError(
                "--cluster local-cuda needs dask-cuda: pip install dask-cuda"
            ) from None
        made = LocalCUDACluster(dashboard_address=None)
    elif cluster == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ScrollsegError(
                "--cluster slurm needs dask-jobqueue: pip install 'napari-scrollseg[cluster]'"
            ) from None
        made = SLURMCluster(
            queue=queue,
            account=account,
            walltime=walltime,
            cores=job_cores,
            memory=job_memory,
            processes=1,
            job_extra_directives=list(job_extra),
        )
        made.scale(jobs=workers)
    else:
        raise ScrollsegError(f"unknown cluster {cluster!r}; use one of {', '.join(CLUSTERS)}")
    with made, Client(made) as client:
        yield client


def iter_in_thread(
    fn: Callable[[], T], *, beat: Callable[[], Any] = lambda: None, every: float = 0.2
) -> Generator[Any, None, T]:
    """Run ``fn()`` in a thread, yielding ``beat()`` every ``every`` seconds until it
    returns; the generator's value is ``fn()``'s.

    Closing the generator stops ``fn``'s dask computations at their next task (raising
    inside that thread) and waits for the thread.
    """
    from dask.callbacks import Callback

    cancel = threading.Event()
    result: dict[str, Any] = {}

    class _Stop(Callback):
        def _pretask(self, key, dsk, state):
            if cancel.is_set() and threading.current_thread() is thread:
                raise _Cancelled

    def target() -> None:
        try:
            with _Stop():
                result["value"] = fn()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=target, name="scrollseg-prepare", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(every)
            if thread.is_alive():
                yield beat()
    finally:
        cancel.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
