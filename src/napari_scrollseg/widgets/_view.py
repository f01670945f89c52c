"""What the canvas shows, in world units (shared by the live and full-run widgets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari

__all__ = ["camera_of", "view_box"]


def camera_of(viewer: napari.Viewer) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9 on)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def view_box(viewer: napari.Viewer) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    """What the canvas shows, in world units: (low, high, plane axis or None).

    2D: the field of view from the camera centre, zoom and canvas size, at the current
    slice (the plane axis). 3D: the whole extent of the layers.
    """
    dims = viewer.dims
    ndim = dims.ndim
    if dims.ndisplay == 3:
        extent = viewer.layers.extent.world
        return tuple(extent[0][-3:]), tuple(extent[1][-3:]), None
    displayed = list(dims.displayed[-2:])
    point = np.asarray(dims.point, float)
    low, high = point.copy(), point.copy()
    camera = camera_of(viewer)
    centre = np.asarray(camera.center, float)[-2:]
    half = np.asarray(viewer.canvas.size, float) / camera.zoom / 2  # (h, w)
    for axis, c, h in zip(displayed, centre, half, strict=True):
        low[axis], high[axis] = c - h, c + h
    plane = [a for a in range(ndim) if a not in displayed][-1]
    return tuple(low[-3:]), tuple(high[-3:]), plane - (ndim - 3)
