"""Run a task graph: a bounded window of threads on one machine (:func:`run_windowed`) or a
dask.distributed cluster, yielding each
finished task as it lands; closing the iterator cancels what has not started.
:func:`iter_in_thread` runs a whole-volume pass off the caller's thread, cancellable."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

from napari_scrollseg.engine.errors import ScrollsegError

CLUSTERS = ("local", "local-cuda", "slurm")
T = TypeVar("T")


class _Cancelled(Exception):
    pass


class Cancelled(Exception):
    """Raised inside a task that stopped because its run was cancelled (nothing kept)."""


class CancelEvent(threading.Event):
    """A run's cancel flag: set when the run stops, read by its tasks between tile batches.

    Pickled for a dask.distributed worker it arrives as a new flag that is never set
    (an event cannot cross processes; there the cluster cancels tasks not yet started)."""

    def __reduce__(self) -> tuple:
        return (CancelEvent, ())


def run_windowed(
    chunks: Sequence[tuple[Any, tuple]],
    tasks: dict,
    num_workers: int,
    cancel: threading.Event,
    *,
    ahead: int | None = None,
    every: float | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Run chunk tasks in their order, each after the block tasks it reads, on
    ``num_workers`` threads, with a bounded amount of work in flight. Yields
    ``(key, result)`` per finished task; with ``every``, also ``(None, None)`` after each
    ``every`` seconds in which no task finished (a beat).

    ``chunks`` lists ``(chunk key, block keys it reads)`` in the order to finish them;
    ``tasks`` maps every key to ``(function, *args)`` where an argument that is a block key
    of that chunk stands for the block's result (the dask tuple form). At most
    ``num_workers + 1`` tasks are submitted at once, a ready chunk before any block (it frees
    the partial sums it read), and blocks are started only for the next ``ahead`` chunks
    after the oldest unfinished one (default ``4 * num_workers``): reading and normalising
    the next blocks, the network and writing finished chunks overlap, while what is held
    stays set by the chunk and patch sizes, not by the volume's.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    ahead = max(1, ahead if ahead is not None else 4 * num_workers)
    limit = max(1, num_workers) + 1
    results: dict = {}  # block key -> result, while a chunk still needs it
    readers: dict = {}  # block key -> chunks not yet finished that read it
    sources = dict(chunks)
    for blocks in sources.values():
        for b in blocks:
            readers[b] = readers.get(b, 0) + 1
    started: set = set()
    finished_chunks: set = set()
    oldest = 0  # index of the oldest unfinished chunk
    admitted = 0  # chunks [0, admitted) may have their blocks started
    running: dict = {}  # future -> key
    pool = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="scrollseg-task")

    def call(key: Any) -> Any:
        fn, *args = tasks[key]
        blocks = set(sources.get(key, ()))
        return fn(*(results[a] if isinstance(a, tuple) and a in blocks else a for a in args))

    def next_task() -> Any:
        nonlocal admitted
        while admitted < len(chunks) and admitted - oldest < ahead:
            admitted += 1
        for key, blocks in chunks[oldest:admitted]:  # a ready chunk first
            if key not in started and all(b in results for b in blocks):
                return key
        for _key, blocks in chunks[oldest:admitted]:  # then the earliest missing block
            for b in blocks:
                if b not in started:
                    return b
        return None

    try:
        while oldest < len(chunks):
            while not cancel.is_set() and len(running) < limit:
                key = next_task()
                if key is None:
                    break
                started.add(key)
                running[pool.submit(call, key)] = key
            if not running:
                return  # cancelled (nothing left to wait for)
            done, _ = wait(running, timeout=every, return_when=FIRST_COMPLETED)
            if not done:  # nothing finished for ``every`` seconds: a beat
                yield None, None
                continue
            for future in done:
                key = running.pop(future)
                value = future.result()  # an error ends the run (after the finally)
                if key in readers:
                    results[key] = value
                else:
                    finished_chunks.add(key)
                    for b in sources[key]:
                        readers[b] -= 1
                        if not readers[b]:
                            results.pop(b, None)
                yield key, value
            while oldest < len(chunks) and chunks[oldest][0] in finished_chunks:
                oldest += 1
    finally:
        cancel.set()  # running block tasks stop after their current tile batch
        pool.shutdown(wait=True, cancel_futures=True)  # queued ones never start


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

    Closing the generator stops ``fn``'s dask computations (made through
    :mod:`~napari_scrollseg.engine.dask_compute`) at their next task, raising inside that
    thread, and waits for the thread.
    """
    from dask.callbacks import Callback

    from napari_scrollseg.engine.dask_compute import thread_callbacks

    cancel = threading.Event()
    result: dict[str, Any] = {}

    class _Stop(Callback):
        def _pretask(self, key, dsk, state):
            if cancel.is_set() and threading.current_thread() is thread:
                raise _Cancelled

    def target() -> None:
        try:
            with thread_callbacks(_Stop()):
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
