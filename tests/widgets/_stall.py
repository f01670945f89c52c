"""GUI-stall meter for widget tests: the longest gap between ticks of a 10 ms QTimer.

Each gap is measured twice: wall time (what the user feels; on a loaded 2-core box the
timer alone is late by 100+ ms) and the GUI thread's own CPU time in it
(``time.thread_time``: the work the GUI thread did, whatever the machine's load). Gaps
in which napari added a layer (``viewer.layers.events.inserted``: napari builds the
layer's vispy visual, overlays and Qt controls, ~0.3-0.6 s of CPU per layer here, once
per widget) are kept apart as ``add_layer_gaps``. While a gap is open longer than
``sample_after`` a watchdog thread samples the GUI thread's stack
(``sys._current_frames``): ``meter.report()`` says where the GUI thread was.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback

TARGET_S = 0.1  # the bound on a GUI stall
ADD_LAYER_CPU_S = 1.5  # napari's add_layer of one layer (measured 0.2-0.75 s under load)


class StallMeter:
    """Longest gap between ticks of a 10 ms QTimer: how long the GUI thread was busy."""

    def __init__(self, viewer: object = None, sample_after: float = 0.05) -> None:
        from qtpy.QtCore import QTimer

        self.longest = 0.0  # wall seconds
        self.longest_cpu = 0.0  # GUI-thread CPU seconds, gaps with a layer added apart
        self.gaps: list[float] = []  # every gap over TARGET_S
        self.add_layer_gaps: list[tuple[float, float]] = []  # (wall, cpu) with a layer added
        self._added = False
        if viewer is not None:
            viewer.layers.events.inserted.connect(self._layer_added)
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()
        self._main = threading.main_thread().ident
        self._samples: collections.Counter[str] = collections.Counter()
        self._sample_after = sample_after
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, daemon=True)
        self._watch.start()
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _layer_added(self, _event: object = None) -> None:
        self._added = True

    def _tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        gap, gap_cpu = now - self._last, cpu - self._last_cpu
        if self._added:
            self.add_layer_gaps.append((gap, gap_cpu))
            self._added = False
        else:
            self.longest_cpu = max(self.longest_cpu, gap_cpu)
        self.longest = max(self.longest, gap)
        if gap > TARGET_S:
            self.gaps.append(gap)
        self._last, self._last_cpu = now, cpu

    def _watchdog(self) -> None:
        while not self._stop.wait(0.02):
            if time.perf_counter() - self._last > self._sample_after:
                frame = sys._current_frames().get(self._main)
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-40:]
                    self._samples["".join(traceback.format_list(stack))] += 1

    def stop(self) -> float:
        """Stop measuring; the longest gap in seconds."""
        self.timer.stop()
        self._stop.set()
        self._watch.join()
        return self.longest

    def summary(self) -> str:
        """One line: the longest gaps, wall and GUI CPU, and the add-layer gaps apart."""
        adds = ", ".join(f"{w * 1000:.0f}/{c * 1000:.0f}" for w, c in self.add_layer_gaps)
        return (
            f"longest GUI gap {self.longest * 1000:.0f} ms wall; longest GUI-thread CPU in a "
            f"gap {self.longest_cpu * 1000:.0f} ms (add_layer gaps apart, wall/cpu ms: "
            f"[{adds}])"
        )

    def report(self, top: int = 3) -> str:
        """The GUI thread's most frequent stacks while it was stalled (20 ms samples)."""
        lines = [self.summary(), f"wall gaps > 100 ms: {[round(g * 1000) for g in self.gaps]}"]
        total = sum(self._samples.values())
        lines.append(f"{total} samples of the stalled GUI thread")
        leaves: collections.Counter[str] = collections.Counter()
        for stack, n in self._samples.items():
            leaves["\n".join(stack.splitlines()[-6:])] += n
        for leaf, n in leaves.most_common(top * 2):
            lines.append(f"--- leaf, {n} samples:\n{leaf}")
        for stack, n in self._samples.most_common(top):
            lines.append(f"--- {n} samples ({n * 20} ms):\n{stack}")
        return "\n".join(lines)
