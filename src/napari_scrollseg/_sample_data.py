"""napari sample data: the synthetic scroll phantom (File > Open Sample > scrollseg)."""

from __future__ import annotations

from typing import Any

from napari_scrollseg._reader import (
    ATTENUATION_3D,
    AXIS_LABELS,
    RENDERING_3D,
    contrast_limits,
    see_through_background,
)
from napari_scrollseg.engine.colors import label_colormap
from napari_scrollseg.engine.phantom import CLASSES, COLORS, DEFAULT_SHAPE, SPACING, make_phantom

LayerData = tuple[Any, dict[str, Any], str]


def phantom_sample() -> list[LayerData]:
    """The default phantom (64 x 128 x 128) as an image layer and its truth labels layer.

    Both layers carry the phantom's spacing as ``scale``; the truth uses the class
    colours and names of :mod:`napari_scrollseg.engine.phantom` (1 air, 2 papyrus, 3 ink).
    Display defaults as the reader's (percentile contrast, attenuated MIP, air transparent,
    axis labels z, y, x).
    """
    image, truth = make_phantom(DEFAULT_SHAPE)
    colormap = see_through_background(label_colormap(COLORS))  # as the reader
    names = {v: k for k, v in CLASSES.items()}
    values = [0, *sorted(names)]
    image_meta = {
        "name": "phantom",
        "scale": SPACING,
        "axis_labels": AXIS_LABELS,
        "contrast_limits": contrast_limits(image),
        "rendering": RENDERING_3D,
        "attenuation": ATTENUATION_3D,
        "metadata": {"spacing": SPACING},
    }
    truth_meta = {
        "name": "truth",
        "scale": SPACING,
        "axis_labels": AXIS_LABELS,
        "colormap": colormap,
        "features": {"index": values, "class": [names.get(v, "unlabeled") for v in values]},
        "metadata": {"spacing": SPACING},
    }
    return [(image, image_meta, "image"), (truth, truth_meta, "labels")]
