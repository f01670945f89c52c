"""GUI-stall meter for widget tests: the gaps between ticks of a 10 ms QTimer, and why.

Each gap is measured three ways:

- wall time (what the user feels; on a loaded 2-core box the timer alone is late by
  100+ ms);
- the GUI thread's own CPU time in it (``time.thread_time``: the work the GUI thread
  did, whatever the machine's load);
- for gaps over 50 ms, Linux's per-thread ``schedstat``: the GUI thread's time on a CPU
  and waiting for one, and the CPU time of the process's other Python threads (the only
  ones that can hold the GIL). ``own`` is the most of one gap that is ours.

Gaps in which napari added a layer (``viewer.layers.events.inserted``: napari builds the
layer's vispy visual, overlays and Qt controls, ~0.3-0.6 s of CPU per layer here, once
per widget) are kept apart as ``add_layer_gaps``. While a gap is open longer than
``sample_after`` a watchdog thread samples the GUI thread's stack
(``sys._current_frames``): ``report()`` says where the GUI thread was.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
from pathlib import Path

TARGET_S = 0.1  # the bound on a GUI stall
ADD_LAYER_CPU_S = 1.5  # napari's add_layer of one layer (measured 0.2-0.75 s under load)


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


class StallMeter:
    """Gaps between ticks of a 10 ms QTimer: how long the GUI thread stalled, and why.

    Starts measuring when built; ``stop()`` (or leaving a ``with`` block) ends it.
    """

    def __init__(self, viewer: object = None, sample_after: float = 0.05) -> None:
        from qtpy.QtCore import QTimer

        self.longest = 0.0  # wall seconds
        self.longest_cpu = 0.0  # GUI-thread CPU seconds, gaps with a layer added apart
        self.gaps: list[float] = []  # every gap, wall seconds
        self.at: list[float] = []  # when each gap ended (perf_counter)
        self.add_layer_gaps: list[tuple[float, float]] = []  # (wall, cpu) with a layer added
        #: (gap, GUI thread on a CPU, GUI thread waiting for a CPU, Python threads on a CPU)
        self.split: list[tuple[float, float, float, float]] = []
        self.stalls: list[tuple[float, str]] = []  # (late, GUI thread's stack) samples
        self._added = False
        if viewer is not None:
            viewer.layers.events.inserted.connect(self._layer_added)
        self._main = threading.main_thread().ident
        self._watchdog_ident: int | None = None
        self._sched = _schedstat()
        self._others = self._python_threads()
        self._sample_after = sample_after
        self._stop = threading.Event()
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()
        self._watch = threading.Thread(target=self._watchdog, daemon=True, name="stall-watch")
        self._watch.start()
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def __enter__(self) -> StallMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _layer_added(self, _event: object = None) -> None:
        self._added = True

    def _python_threads(self) -> dict[int, float]:
        out = {}
        for t in threading.enumerate():
            if t.native_id is None or t.ident in (self._main, self._watchdog_ident):
                continue
            stat = _schedstat(t.native_id)
            if stat is not None:
                out[t.native_id] = stat[0]
        return out

    def _tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        gap, gap_cpu = now - self._last, cpu - self._last_cpu
        sched, others = _schedstat(), self._python_threads()
        if gap > 0.05 and self._sched is not None and sched is not None:
            busy = sum(run - self._others[t] for t, run in others.items() if t in self._others)
            self.split.append(
                (gap, sched[0] - self._sched[0], sched[1] - self._sched[1], min(busy, gap))
            )
        self._sched, self._others = sched, others
        if self._added:
            self.add_layer_gaps.append((gap, gap_cpu))
            self._added = False
        else:
            self.longest_cpu = max(self.longest_cpu, gap_cpu)
        self.longest = max(self.longest, gap)
        self.gaps.append(gap)
        self.at.append(now)
        self._last, self._last_cpu = now, cpu

    def _watchdog(self) -> None:
        self._watchdog_ident = threading.get_ident()
        while not self._stop.wait(0.02):
            late = time.perf_counter() - self._last
            if late > self._sample_after and len(self.stalls) < 5000:
                frame = sys._current_frames().get(self._main)
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-40:]
                    self.stalls.append((late, "".join(traceback.format_list(stack))))

    def stop(self) -> float:
        """Stop measuring; the longest gap in seconds."""
        self.timer.stop()
        self._stop.set()
        self._watch.join()
        return self.longest

    @property
    def own(self) -> float:
        """The most of one gap that is ours: the GUI thread on a CPU plus the other Python
        threads on a CPU (holding the GIL, or running native code), at most the gap."""
        return max((min(gap, cpu + py) for gap, cpu, _, py in self.split), default=0.0)

    def worst(self, n: int = 5) -> list[tuple[float, float]]:
        """The ``n`` longest gaps as (end time, gap) in seconds."""
        return sorted(zip(self.at, self.gaps), key=lambda t: -t[1])[:n]

    def summary(self) -> str:
        """One line: the longest gaps, wall and GUI CPU, and the add-layer gaps apart."""
        adds = ", ".join(f"{w * 1000:.0f}/{c * 1000:.0f}" for w, c in self.add_layer_gaps)
        return (
            f"longest GUI gap {self.longest * 1000:.0f} ms wall; longest GUI-thread CPU in a "
            f"gap {self.longest_cpu * 1000:.0f} ms (add_layer gaps apart, wall/cpu ms: "
            f"[{adds}])"
        )

    def report(self, top: int = 3) -> str:
        """The summary, the longest gaps split by cause, and the GUI thread's most
        frequent stacks while it was stalled (20 ms samples)."""
        lines = [self.summary()]
        for gap, cpu, wait, py in sorted(self.split, reverse=True)[: top * 2]:
            lines.append(
                f"gap {gap * 1000:.0f} ms: GUI thread on a CPU {cpu * 1000:.0f} ms, waiting "
                f"for one {wait * 1000:.0f} ms; other Python threads on a CPU {py * 1000:.0f} ms"
            )
        samples = collections.Counter(stack for _, stack in self.stalls)
        lines.append(f"{len(self.stalls)} samples of the stalled GUI thread")
        leaves: collections.Counter[str] = collections.Counter()
        for stack, n in samples.items():
            leaves["\n".join(stack.splitlines()[-6:])] += n
        for leaf, n in leaves.most_common(top * 2):
            lines.append(f"--- leaf, {n} samples:\n{leaf}")
        for stack, n in samples.most_common(top):
            lines.append(f"--- {n} samples ({n * 20} ms):\n{stack}")
        return "\n".join(lines)
