"""Watching the GUI thread: gaps between the ticks of a 10 ms QTimer (shared by widget tests)."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from pathlib import Path

from qtpy.QtCore import QTimer


def _schedstat() -> tuple[float, float] | None:
    """This (GUI) thread's time on a CPU and waiting for one, in s (Linux schedstat)."""
    try:
        run, wait, _ = Path("/proc/thread-self/schedstat").read_text().split()
    except (OSError, ValueError):
        return None
    return int(run) / 1e9, int(wait) / 1e9


class TickGaps:
    """Longest gap between the ticks of a 10 ms QTimer: how long the GUI thread stalled.

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
        self.split: list[tuple[float, float, float]] = []  # (gap, on CPU, runqueue wait) s
        self._sched: tuple[float, float] | None = None
        self._main = threading.main_thread().ident
        self._done = threading.Event()

    def _tick(self) -> None:
        now = time.perf_counter()
        sched = _schedstat()
        gap = now - self.last
        if gap > 0.05 and self._sched is not None and sched is not None:
            # of the gap: on the CPU (our work), waiting for a CPU (the machine's load)
            self.split.append((gap, sched[0] - self._sched[0], sched[1] - self._sched[1]))
        self._sched = sched
        self.gaps.append(gap)
        self.at.append(now)
        self.last = now

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            late = time.perf_counter() - self.last
            if late > 0.1:
                frames = sys._current_frames()
                frame = frames.pop(self._main, None)
                stack = traceback.format_stack(frame)[-4:] if frame is not None else []
                others = [
                    "".join(traceback.format_stack(f)[-1:]) for f in frames.values()
                ]  # who else holds the GIL now and then
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
        """Longest gap less the GUI thread's wait for a CPU (other processes' load)."""
        return max((gap - wait for gap, _, wait in self.split), default=0.0)

    def worst(self, n: int = 5) -> list[tuple[float, float]]:
        """The ``n`` longest gaps as (end time, gap) in seconds."""
        return sorted(zip(self.at, self.gaps), key=lambda t: -t[1])[:n]
