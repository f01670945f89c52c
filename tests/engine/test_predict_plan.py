"""The whole-volume planner alone: tile ownership for random shapes, chunks, ROIs, masks."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from napari_scrollseg.engine.predict.plan import plan
from napari_scrollseg.engine.tiling import make_grid


def _random_case(rng: np.random.Generator) -> dict:
    shape = tuple(int(s) for s in rng.integers(1, 60, size=3))
    patch = tuple(int(p) for p in rng.integers(1, 20, size=3))
    bbox_lo = [int(rng.integers(0, s)) for s in shape]
    bbox = tuple(slice(lo, int(rng.integers(lo + 1, s + 1))) for lo, s in zip(bbox_lo, shape))
    grid = make_grid(
        tuple(b.stop - b.start for b in bbox),
        patch,
        float(rng.choice([0.3, 0.5, 0.9, 1.0])),
        offset=tuple(b.start for b in bbox),
    )
    starts = [tuple(int(o + s) for s in st) for o, st in zip(grid.offset, grid.starts)]
    roi = []
    for s in shape:
        lo = int(rng.integers(0, s))
        roi.append((lo, int(rng.integers(lo + 1, s + 1))))
    chunks = tuple(int(c) for c in rng.integers(1, 25, size=3))
    dropped = {t for t in itertools.product(*starts) if rng.random() < 0.3}
    return {
        "starts": starts,
        "patch": tuple(int(p) for p in grid.patch),
        "roi": tuple(roi),
        "chunks": chunks,
        "keep": (lambda t: t not in dropped) if rng.random() < 0.5 else None,
        "dropped": dropped,
    }


def _touches(tile, patch, box) -> bool:
    return all(t < b1 and t + p > b0 for t, p, (b0, b1) in zip(tile, patch, box))


@pytest.mark.parametrize("seed", range(40))
def test_every_grid_tile_is_owned_exactly_once(seed: int) -> None:
    c = _random_case(np.random.default_rng(seed))
    superchunk = None if seed % 2 else int(np.random.default_rng(seed).integers(1, 4))
    p = plan(c["starts"], c["patch"], c["roi"], c["chunks"], superchunk=superchunk, keep=c["keep"])
    in_roi = [t for t in itertools.product(*c["starts"]) if _touches(t, c["patch"], c["roi"])]
    kept = [t for t in in_roi if c["keep"] is None or t not in c["dropped"]]
    owned = Counter(t for b in p.blocks.values() for t in b.tiles)
    assert p.grid_tiles == len(in_roi)
    assert p.tiles_skipped == (p.tiles_total - sum(owned.values()))
    if superchunk is None:  # one group: every kept tile exactly once, nothing else
        assert owned == Counter(kept)
        assert p.tiles_total == p.grid_tiles
    else:  # groups: a tile runs once per group it touches
        assert set(owned) == set(kept)
    # the chunks tile the ROI exactly
    covered = np.zeros([b - a for a, b in c["roi"]], int)
    for chunk in p.chunks:
        covered[tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(chunk.box, c["roi"]))] += 1
    assert (covered == 1).all()
    # every kept tile reaching a chunk reaches it through exactly one of its source blocks,
    # whose extended box (its partial sum) holds all of the tile inside the chunk
    for chunk in p.chunks:
        seen = Counter(
            t
            for b in chunk.sources
            for t in p.blocks[b].tiles
            if _touches(t, c["patch"], chunk.box)
        )
        need = [t for t in kept if _touches(t, c["patch"], chunk.box)]
        assert seen == Counter(need), chunk
        for b in chunk.sources:
            assert chunk.index in p.consumers[b]
            for t in p.blocks[b].tiles:
                for s, q, (e0, e1), (c0, c1) in zip(t, c["patch"], p.blocks[b].ext, chunk.box):
                    lo, hi = max(s, c0), min(s + q, c1)
                    assert lo >= hi or e0 <= lo <= hi <= e1


def test_plan_counts_on_a_known_grid() -> None:
    # one axis of 3 tiles (starts 0, 4, 8; patch 8) over 16 voxels, chunks of 8
    starts = [(0, 4, 8), (0,), (0,)]
    p = plan(starts, (8, 1, 1), ((0, 16), (0, 1), (0, 1)), (8, 1, 1))
    assert [c.box for c in p.chunks] == [((0, 8), (0, 1), (0, 1)), ((8, 16), (0, 1), (0, 1))]
    assert p.blocks[(0, 0, 0, 0, 0, 0)].tiles == ((0, 0, 0), (4, 0, 0))
    assert p.blocks[(0, 0, 0, 1, 0, 0)].tiles == ((8, 0, 0),)
    assert p.blocks[(0, 0, 0, 0, 0, 0)].ext == ((0, 12), (0, 1), (0, 1))
    # the first block reaches into the second chunk, the second does not reach back
    assert p.chunks[1].sources == ((0, 0, 0, 0, 0, 0), (0, 0, 0, 1, 0, 0))
    assert p.chunks[0].sources == ((0, 0, 0, 0, 0, 0),)
    masked = plan(starts, (8, 1, 1), ((0, 16), (0, 1), (0, 1)), (8, 1, 1), keep=lambda t: t[0] != 8)
    assert (masked.tiles_total, masked.tiles_skipped) == (3, 1)
    assert list(masked.blocks) == [(0, 0, 0, 0, 0, 0)]


def test_the_task_graph_holds_about_a_kilobyte_per_chunk() -> None:
    """The graph of a scroll-sized run fits in memory: each chunk's task refers to its
    blocks' shared tuples instead of copying their readers (tuples of done markers per
    chunk and block took 9.1 KB per chunk here, 590 MB for Scroll 4's 64 k chunks of 128^3;
    now 1.3 KB)."""
    import tracemalloc
    from types import SimpleNamespace

    from napari_scrollseg.engine.predict.tasks import build_graph

    shape, patch = (2794, 860, 835), (128, 128, 128)  # 1078 chunks of nnU-Net's patch
    grid = make_grid(shape, patch, 0.5)
    the_plan = plan([list(s) for s in grid.starts], patch, [(0, n) for n in shape], patch)
    pending = [c.index for c in the_plan.chunks]
    tracemalloc.start()
    try:
        graph = build_graph(the_plan, SimpleNamespace(state="/x/.scrollseg"), pending, "t")
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_chunk = held / len(pending)
    print(f"graph: {held / 2**20:.2f} MiB, {per_chunk:.0f} B per chunk")
    assert len(graph.chunk_keys) == len(pending) == 1078
    assert per_chunk < 3000
