"""``scrollseg demo``: the whole loop on the synthetic scroll, headless."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def run_demo(out: str | Path = "scrollseg-demo") -> Iterator[str]:
    """Run the demo into ``out``, yielding one human-readable line per step."""
    from napari_scrollseg.engine.phantom import DEFAULT_SHAPE, write_phantom
    from napari_scrollseg.engine.volumes import describe, open_volume

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scan = out / "phantom.zarr"
    if scan.exists():
        yield f"phantom: reusing {scan}"
    else:
        write_phantom(scan, DEFAULT_SHAPE, seed=0)
        yield f"phantom: wrote {scan}"
    yield describe(open_volume(scan))
