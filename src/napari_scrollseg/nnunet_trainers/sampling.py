"""Patch placement around an annotated voxel, with a random in-patch offset.

Pure numpy, so it can be tested without nnU-Net. Stock nnU-Net centres a patch on
the voxel it picked from the annotated (or foreground) voxels; with sparse labels
that puts the few labelled slices always in the middle of every patch. The soil-CT
workflow (``betterIgnoreSampling``) shifts the centre by a random offset per axis,
``randint(-min(s, p // 2), min(d - s, p // 2))``; here the end points are chosen so
that the voxel stays inside the patch and the centre inside the image:
offset in ``[-min(s, (p - 1) // 2), min(d - 1 - s, p // 2)]`` (both inclusive).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence


def offset_centre(
    voxel: Sequence[int],
    data_shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator | np.random.RandomState | None = None,
) -> list[int]:
    """Move ``voxel`` by a random offset that keeps it inside a patch centred on the result.

    Parameters
    ----------
    voxel
        Spatial coordinate of the chosen annotated voxel (no channel axis).
    data_shape
        Spatial shape of the case.
    patch_size
        Size of the patch the network sees (the final patch, after augmentation crops).
    rng
        Random generator; numpy's global state when None (as nnU-Net's loaders use).

    Returns
    -------
    list of int
        The new patch centre.
    """
    rng = np.random if rng is None else rng
    draw = rng.integers if isinstance(rng, np.random.Generator) else rng.randint
    centre = []
    for s, d, p in zip(voxel, data_shape, patch_size, strict=False):
        s, d, p = int(s), int(d), int(p)
        low = -min(s, (p - 1) // 2)
        high = max(low, min(d - 1 - s, p // 2))
        centre.append(s + int(draw(low, high + 1)))
    return centre


def patch_lower_corner(
    centre: Sequence[int], patch_size: Sequence[int], lower_bounds: Sequence[int]
) -> list[int]:
    """Lower corner of a patch of ``patch_size`` centred on ``centre`` (as nnU-Net places it).

    nnU-Net puts the centre at ``lower + p // 2`` and never starts a patch below the
    padding bound ``lower_bounds`` (``-need_to_pad // 2``).
    """
    return [
        max(int(lb), int(c) - int(p) // 2)
        for c, p, lb in zip(centre, patch_size, lower_bounds, strict=False)
    ]


def sparse_bbox(
    voxel: Sequence[int],
    data_shape: Sequence[int],
    patch_size: Sequence[int],
    final_patch_size: Sequence[int],
    lower_bounds: Sequence[int],
    rng: np.random.Generator | np.random.RandomState | None = None,
) -> tuple[list[int], list[int]]:
    """Bounding box ``(lower, upper)`` of a sampled patch that contains ``voxel`` off-centre.

    The offset is bounded by ``final_patch_size`` (what the network sees after the
    augmentation's centre crop), the box has ``patch_size`` (the larger patch that
    nnU-Net loads before rotating and cropping).
    """
    centre = offset_centre(voxel, data_shape, final_patch_size, rng)
    lower = patch_lower_corner(centre, patch_size, lower_bounds)
    return lower, [lo + int(p) for lo, p in zip(lower, patch_size, strict=False)]


#: ``class_locations`` key of the annotated background voxels (nnU-Net's label 0)
BACKGROUND = 0

#: how a random (not forced-foreground) patch picks its anchor with sparse labels
SAMPLINGS = {
    "balanced": "each annotated class, the background and any annotated voxel equally likely",
    "nnunet": "nnU-Net's foreground shares: any annotated voxel, or annotated background",
}


def random_patch_keys(keys: list, sampling: str, annotated_key: Any) -> list:
    """The ``class_locations`` keys (``None``: a random place) among which a random patch
    picks its anchor, uniformly. ``"balanced"``: all of them, so a rare class is under a
    patch far more often than its share. ``"nnunet"``: only "any annotated voxel", the
    background key and a random place, so foreground classes are anchored on as often as
    nnU-Net anchors on them (its forced-foreground patches, one in three); a model then
    over-predicts a rare class less (ink: 1 patch in 6 instead of 1 in 3).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
    if sampling == "balanced":
        return keys
    return [k for k in keys if k is None or k == annotated_key or _is_background(k)]


def _is_background(key: Any) -> bool:
    return isinstance(key, int) and key == BACKGROUND


def background_locations(annotated: np.ndarray | list, seg: Any) -> np.ndarray:
    """Rows of ``annotated`` (``(channel, *voxel)`` locations) whose label is background.

    ``seg`` is the case's ``(1, *shape)`` segmentation as nnU-Net preprocessed it (numpy
    or blosc2): background is 0, and -1 outside the nonzero crop (training sets it to 0).
    """
    annotated = np.asarray(annotated, dtype=np.int64)
    if annotated.size == 0:
        return annotated.reshape(0, len(seg.shape))
    labels = np.asarray(seg[:])[tuple(annotated.T)]
    return annotated[labels <= 0]
