"""Watching the GUI thread: gaps between the ticks of a 10 ms QTimer (shared by widget tests).

A gap has three possible causes: work on the GUI thread, a Python thread holding the
GIL, or the machine (the GUI thread, or the GL/X threads it waits for, waiting for a
CPU taken by other processes). Linux's per-thread ``schedstat`` tells them apart:
``split`` records, for each gap over 50 ms, the GUI thread's time on a CPU and
waiting for one, and the CPU time of the process's other Python threads (the only
ones that can hold the GIL). ``own`` is the part of the worst gap that is ours.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from pathlib import Path

from qtpy.QtCore import QTimer


def _schedstat(tid: int | str = "thread-self") -> tuple[float, float] | None:
    """A thread's time on a CPU and waiting for one, in s (Linux schedstat)."""
    path = (
        "/proc/thread-self/schedstat"
        if tid == "thread-self"
        else f"/proc/self/task/{tid}/schedstat"
    )
    try:
        run, wait, _ = Path(path).read_text().split()
    except (OSError, ValueError):
        return None
    return int(run) / 1e9, int(wait) / 1e9


class TickGaps:
    """Gaps between the ticks of a 10 ms QTimer: how long the GUI thread stalled, and why.

    A watchdog thread samples the GUI thread's stack while a tick is more than 100 ms
    late (``stalls``: the innermost frames of each sample), to say where it was.
    """

    def __init__(self) -> None:
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.gaps: list[float] = []
        self.at: list[float] = []
        self.last = time.perf_counter()
        self.timer.timeout.connect(self._tick)
        self.stalls: list[tuple[float, str]] = []
        #: (gap, GUI thread on a CPU, GUI thread waiting for a CPU, Python threads on a CPU)
        self.split: list[tuple[float, float, float, float]] = []
        self._sched: tuple[float, float] | None = None
        self._others: dict[int, float] = {}
        self._main = threading.main_thread().ident
        self._watchdog: int | None = None
        self._done = threading.Event()

    def _python_threads(self) -> dict[int, float]:
        out = {}
        for t in threading.enumerate():
            if t.native_id is None or t.ident in (self._main, self._watchdog):
                continue
            stat = _schedstat(t.native_id)
            if stat is not None:
                out[t.native_id] = stat[0]
        return out

    def _tick(self) -> None:
        now = time.perf_counter()
        sched = _schedstat()
        others = self._python_threads()
        gap = now - self.last
        if gap > 0.05 and self._sched is not None and sched is not None:
            busy = sum(run - self._others[t] for t, run in others.items() if t in self._others)
            self.split.append(
                (gap, sched[0] - self._sched[0], sched[1] - self._sched[1], min(busy, gap))
            )
        self._sched, self._others = sched, others
        self.gaps.append(gap)
        self.at.append(now)
        self.last = now

    def _watch(self) -> None:
        self._watchdog = threading.get_ident()
        while not self._done.wait(0.05):
            late = time.perf_counter() - self.last
            if late > 0.1:
                frames = sys._current_frames()
                frame = frames.pop(self._main, None)
                stack = traceback.format_stack(frame)[-4:] if frame is not None else []
                others = ["".join(traceback.format_stack(f)[-1:]) for f in frames.values()]
                self.stalls.append((late, "".join(stack) + "others:\n" + "".join(others)))

    def __enter__(self) -> TickGaps:
        self.last = time.perf_counter()
        self.timer.start()
        threading.Thread(target=self._watch, daemon=True, name="tick-watchdog").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.timer.stop()

    @property
    def longest(self) -> float:
        return max(self.gaps)

    @property
    def own(self) -> float:
        """The most of one gap that is ours: the GUI thread on a CPU plus the other Python
        threads on a CPU (holding the GIL), at most the gap."""
        return max((min(gap, cpu + py) for gap, cpu, _, py in self.split), default=0.0)

    def report(self, n: int = 8) -> str:
        """The ``n`` longest gaps, split by cause, one line each."""
        return "\n".join(
            f"gap {gap * 1000:.0f} ms: GUI thread on a CPU {cpu * 1000:.0f} ms, waiting for "
            f"one {wait * 1000:.0f} ms; other Python threads on a CPU {py * 1000:.0f} ms"
            for gap, cpu, wait, py in sorted(self.split, reverse=True)[:n]
        )

    def worst(self, n: int = 5) -> list[tuple[float, float]]:
        """The ``n`` longest gaps as (end time, gap) in seconds."""
        return sorted(zip(self.at, self.gaps), key=lambda t: -t[1])[:n]
