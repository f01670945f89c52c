"""Progress events of a whole-volume run and the counts behind them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BEAT_S", "PredictProgress", "Tally", "bar_state"]

#: how often a threaded run looks at its tile count between finished tasks (seconds):
#: progress moves once per batch of tiles, at most this often
BEAT_S = 0.25


@dataclass(frozen=True)
class PredictProgress:
    """One progress event of :func:`iter_predict_volume`.

    Yielded once per finished block of tiles and output chunk and, on the threaded
    scheduler, once per batch of tiles the network ran (at most every :data:`BEAT_S`).

    ``stage`` is ``"prepare"`` while the whole-volume passes run (counts are still 0),
    ``"predict"`` while chunks are computed, ``"pyramid"`` while the coarser levels are
    written and ``"done"`` at the end. Counts cover the whole output; ``chunks_resumed``
    chunks were already done by an earlier run and ``tiles_skipped`` tiles were left out
    because the mask is empty there. ``tiles_computed`` counts the tiles this run sent
    through the network (forward passes, one per tile whatever the TTA),
    ``chunks_computed`` the chunks it wrote and ``blocks_total`` the block tasks of its
    graph. ``grid_tiles`` is the number of tiles of nnU-Net's grid that touch the output:
    ``tiles_total / grid_tiles`` is 1 without super-chunks (every tile runs once).
    """

    stage: str
    out: Path
    chunks_done: int
    chunks_total: int
    chunks_resumed: int
    tiles_done: int
    tiles_total: int
    tiles_skipped: int
    tiles_computed: int
    chunks_computed: int
    blocks_total: int
    grid_tiles: int
    voxels_per_s: float
    elapsed_s: float
    eta_s: float | None

    @property
    def fraction(self) -> float:
        """Fraction of chunks done, 0..1."""
        if not self.chunks_total:
            return 1.0 if self.stage == "done" else 0.0
        return self.chunks_done / self.chunks_total

    @property
    def tiles_per_s(self) -> float:
        """Tiles this run sent through the network per second."""
        return self.tiles_computed / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Tally:
    """The running counts of a run, turned into :class:`PredictProgress` events."""

    out: Path
    chunks_total: int = 0
    chunks_resumed: int = 0
    chunks_done: int = 0
    chunks_computed: int = 0
    tiles_total: int = 0
    tiles_skipped: int = 0
    tiles_done: int = 0
    tiles_computed: int = 0
    blocks_total: int = 0
    grid_tiles: int = 0
    voxels: int = 0
    passes: int = 0  # tiles the network ran in this run, finished blocks or not
    t0: float = field(default_factory=time.perf_counter)

    def add(self, key: tuple, result: dict) -> bool:
        """Count a finished task (a block of tiles or a chunk); True when an event is due."""
        if key[0].startswith("scrollseg-block"):
            self.tiles_done += result["tiles"]
            self.tiles_computed += result["computed"]
            return result["computed"] > 0 or result["tiles"] > 0
        self.chunks_done += 1
        self.chunks_computed += 1
        self.voxels += result["voxels"]
        return True

    def beat(self, passes: int) -> bool:
        """Tiles run so far in this run (the session's forward passes); True if they moved."""
        moved = passes > self.passes
        self.passes = max(self.passes, passes)
        return moved

    def event(self, stage: str) -> PredictProgress:
        elapsed = time.perf_counter() - self.t0
        now = self.chunks_done - self.chunks_resumed
        # tiles of blocks not finished yet (bounded: a shared session may run others too)
        left = self.tiles_total - self.tiles_skipped - self.tiles_done
        running = min(max(0, self.passes - self.tiles_computed), max(0, left))
        return PredictProgress(
            stage=stage,
            out=self.out,
            chunks_done=self.chunks_done,
            chunks_total=self.chunks_total,
            chunks_resumed=self.chunks_resumed,
            tiles_done=self.tiles_done + running,
            tiles_total=self.tiles_total - self.tiles_skipped,
            tiles_skipped=self.tiles_skipped,
            tiles_computed=self.tiles_computed + running,
            chunks_computed=self.chunks_computed,
            blocks_total=self.blocks_total,
            grid_tiles=self.grid_tiles,
            voxels_per_s=self.voxels / elapsed if elapsed > 0 else 0.0,
            elapsed_s=elapsed,
            eta_s=elapsed / now * (self.chunks_total - self.chunks_done) if now else None,
        )


def bar_state(ev: PredictProgress) -> dict | None:
    """The tqdm bar's state for an event: tiles, with chunks and tiles/s (None while
    preparing: errors come before the bar)."""
    if ev.stage == "prepare":
        return None
    return {
        "unit": "tile",
        "desc": "predict",
        "total": ev.tiles_total,
        "n": ev.tiles_done,
        "postfix": {
            "stage": ev.stage,
            "chunks": f"{ev.chunks_done}/{ev.chunks_total}",
            "tiles_s": f"{ev.tiles_per_s:.3g}",
        },
    }
