"""What the canvas shows, in world units (shared by the live and full-run widgets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import napari

__all__ = ["camera_of", "view_box", "visible_box_3d"]


def camera_of(viewer: napari.Viewer) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9 on)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def view_box(viewer: napari.Viewer) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    """What the canvas shows, in world units: (low, high, plane axis or None).

    2D: the field of view from the camera centre, zoom and canvas size, at the current
    slice (the plane axis). 3D: :func:`visible_box_3d`.
    """
    dims = viewer.dims
    ndim = dims.ndim
    if dims.ndisplay == 3:
        low3, high3 = visible_box_3d(viewer)
        return tuple(low3), tuple(high3), None
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


def visible_box_3d(viewer: napari.Viewer, samples: int = 33) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box (world units, last 3 axes) of what a 3D view can show: the layers'
    extent clipped to the camera's field of view, a prism along the view direction
    (canvas size / zoom across). Found on a ``samples``^3 grid over the extent, widened by
    one grid step so it never cuts what is visible. A perspective camera, or a view that
    shows none of the data, gives the whole extent."""
    extent = np.asarray(viewer.layers.extent.world, float)[:, -3:]
    half_voxel = np.asarray(viewer.layers.extent.step, float)[-3:] / 2  # extent: centres
    low, high = extent[0] - half_voxel, extent[1] + half_voxel
    camera = camera_of(viewer)
    if camera.perspective:
        return low, high
    view = np.asarray(camera.view_direction, float)
    up = np.asarray(camera.up_direction, float)
    right = np.cross(view, up)
    half = np.asarray(viewer.canvas.size, float) / camera.zoom / 2  # (h, w)
    axes = [np.linspace(lo, hi, samples) for lo, hi in zip(low, high)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    rel = points - np.asarray(camera.center, float)[-3:]
    seen = (np.abs(rel @ up) <= half[0]) & (np.abs(rel @ right) <= half[1])
    if not seen.any():
        return low, high
    step = (high - low) / (samples - 1)
    inside = points[seen]
    return np.maximum(inside.min(axis=0) - step, low), np.minimum(inside.max(axis=0) + step, high)
