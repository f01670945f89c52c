"""Class colours in one place: the palette of classes and napari label colormaps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["DEFAULT_LABEL_COLOR", "IGNORE_COLOR", "PALETTE", "label_colormap", "palette_color"]

# RGB 0..255 of class ids 1, 2, ...: the first three are the phantom's air, papyrus, ink,
# the rest distinct hues
PALETTE = (
    (60, 60, 160),
    (230, 190, 110),
    (220, 30, 30),
    (51, 204, 0),
    (255, 255, 0),
    (0, 122, 153),
    (255, 153, 51),
    (204, 255, 255),
    (115, 0, 102),
    (11, 0, 255),
)
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
# label values without a colour of their own (user classes, the ignore value) in a layer
DEFAULT_LABEL_COLOR = (0.6, 0.6, 0.6, 1.0)
IGNORE_COLOR = (0.5, 0.5, 0.5, 0.6)


def palette_color(class_id: int) -> tuple[int, int, int]:
    """The palette's RGB (0..255) for class ``class_id`` (1-based, cycling)."""
    return PALETTE[(int(class_id) - 1) % len(PALETTE)]


def label_colormap(
    colors: Mapping[int, Sequence[float]],
    *,
    default: tuple[float, ...] = DEFAULT_LABEL_COLOR,
    ignore: int | None = None,
) -> dict[int | None, tuple[float, ...]]:
    """A napari direct label colormap (RGBA 0..1) from RGB or RGBA colours in 0..255.

    0 (unlabeled) is transparent, ``ignore`` (if given) translucent grey, and any other
    value (napari's ``None`` key) ``default``.
    """
    cmap: dict[int | None, tuple[float, ...]] = {None: default, 0: TRANSPARENT}
    for value, color in colors.items():
        cmap[int(value)] = tuple([*(float(c) / 255 for c in color), 1.0][:4])
    if ignore is not None:
        cmap[ignore] = IGNORE_COLOR
    return cmap
