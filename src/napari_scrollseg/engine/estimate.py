"""What a whole-volume run will cost, before it starts (no forward pass, no data pass).

Counts come from the same plan the run uses (:func:`~napari_scrollseg.engine.predict.plan.
plan`) over the grid of the whole volume (the nonzero box is not computed here: an
upper bound when the volume has an all-zero border).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RunEstimate", "estimate_volume_run"]

Span = tuple[int, int]


@dataclass(frozen=True)
class RunEstimate:
    """Tiles, network passes (tiles x TTA x folds), output bytes (uint8 probabilities
    and labels, uncompressed), the partial sums one slab of blocks holds on disk, and
    seconds at ``rate`` tiles/s (None when no rate was measured yet)."""

    tiles: int
    network_passes: int
    chunks: int
    output_bytes: int
    partial_bytes: int
    seconds: float | None

    def describe(self) -> str:
        """One line for a widget or a log."""
        eta = f", ~{self.seconds:.0f} s" if self.seconds is not None else ""
        return (
            f"{self.tiles} tiles ({self.network_passes} network passes), {self.chunks} chunks, "
            f"output {_human(self.output_bytes)}, partial sums ~{_human(self.partial_bytes)}"
            f"{eta}"
        )


def estimate_volume_run(
    model: str | os.PathLike,
    volume: Any,
    *,
    roi: Sequence[Span] | None = None,
    chunk: int = 128,
    step: float = 0.5,
    mirror: bool = True,
    folds: Any = None,
    rate: float | None = None,
) -> RunEstimate:
    """Estimate :func:`~napari_scrollseg.engine.predict.iter_predict_volume`'s cost.

    ``model`` loads on the CPU (metadata and grid only); ``volume`` is a path or an open
    volume; ``rate`` is tiles per second measured earlier on the chosen device.
    """
    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.predict.plan import plan
    from napari_scrollseg.engine.tiling import tta_transforms
    from napari_scrollseg.engine.volumes import open_volume

    m = load_model(model, folds=folds, device="cpu")
    vol = volume if hasattr(volume, "levels") else open_volume(volume)
    shape = tuple(int(s) for s in vol.data.shape[-3:])
    spans = [tuple(map(int, s)) for s in roi] if roi is not None else [(0, n) for n in shape]
    grid = m.grid(vol, step, bbox=tuple(slice(0, n) for n in shape))
    starts = [tuple(int(o + s) for s in st) for o, st in zip(grid.offset, grid.starts)]
    chunks = (int(chunk),) * 3
    p = plan(starts, grid.patch, spans, chunks)
    passes = len(
        tta_transforms(
            "mirror" if mirror else "none",
            mirror_axes=m.mirror_axes,
            n_spatial=len(m.patch_size),
        )
    )
    voxels = math.prod(b - a for a, b in spans)
    n_chunks = [math.ceil((b - a) / c) for (a, b), c in zip(spans, chunks)]
    slab = n_chunks[1] * n_chunks[2] * 2  # two z rows of blocks are alive at a time
    block = m.n_classes * 4 * math.prod(c + pp for c, pp in zip(chunks, grid.patch))
    return RunEstimate(
        tiles=p.grid_tiles,
        network_passes=p.grid_tiles * passes * len(m.folds),
        chunks=len(p.chunks),
        output_bytes=voxels * (m.n_classes + 1),
        partial_bytes=min(slab, len(p.blocks)) * block,
        seconds=p.grid_tiles / rate if rate else None,
    )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
