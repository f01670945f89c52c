"""nnU-Net's intensity normalization and the whole-volume statistics it needs (no torch).

:func:`nonzero_bbox` is nnU-Net's ``crop_to_nonzero`` box, :func:`volume_stats` the
statistics that ``ZScoreNormalization`` and ``RescaleTo01Normalization`` take over the
whole input (one dask reduction), and :func:`make_normalizer` the per-channel transform.
:class:`VolumeCache` memoises such whole-volume passes per volume.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from napari_scrollseg.engine.dask_compute import compute

log = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_SCHEMES",
    "VolumeCache",
    "make_normalizer",
    "nonzero_bbox",
    "volume_stats",
]

Box = tuple[slice, ...]
SUPPORTED_SCHEMES = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)


class VolumeCache:
    """Thread-safe memo of whole-volume passes (nonzero box, statistics), keyed by the
    caller (the volume's dask name and what was computed)."""

    def __init__(self) -> None:
        self._items: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value stored under ``key``, computing it (outside the lock) the first time."""
        with self._lock:
            if key in self._items:
                return self._items[key]
        value = compute()
        with self._lock:
            return self._items.setdefault(key, value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def nonzero_bbox(arr: Any, source: str = "the volume") -> Box:
    """nnU-Net's ``crop_to_nonzero`` bounding box of a ``(c, z, y, x)`` dask array: where
    any channel is nonzero. One dask reduction. An all-zero volume gives the whole volume.
    (nnU-Net fills holes in the mask first; that cannot change the box.) Float volumes
    with NaN or infinite voxels are refused in the same pass, naming ``source``."""
    import dask.array as da

    nz = (arr != 0).any(axis=0)
    projections = [nz.any(axis=tuple(a for a in range(3) if a != ax)) for ax in range(3)]
    if arr.dtype.kind in "fc":  # the same pass refuses NaN / inf, as nnU-Net does
        from napari_scrollseg.engine.volumes import check_all_finite

        bad = (~da.isfinite(arr)).any(axis=0)
        spans = [bad.any(axis=tuple(a for a in range(3) if a != ax)) for ax in range(3)]
        got = compute(*projections, bad.sum(), *spans)
        check_all_finite(int(got[3]), got[4:], source)
        projections = got[:3]
    else:
        projections = compute(*projections)
    box = []
    for p, n in zip(projections, arr.shape[1:]):
        idx = np.flatnonzero(p)
        box.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, int(n)))
    return tuple(box)


def volume_stats(
    arr: Any, schemes: Sequence[str], use_mask: Sequence[bool], bbox: Box
) -> list[dict[str, float]]:
    """Per channel, the whole-volume statistics its scheme needs over ``bbox`` (one dask
    compute): ``mean``/``std`` for zscore (inside the nonzero mask with ``use_mask``),
    ``min``/``max`` for rescale, nothing for the others."""
    todo: dict[tuple[int, str], Any] = {}
    for c, scheme in enumerate(schemes):
        x = arr[(c, *bbox)].astype(np.float64)
        if scheme == "ZScoreNormalization":
            if use_mask[c]:
                m = arr[(c, *bbox)] != 0
                for other in range(arr.shape[0]):
                    m = m | (arr[(other, *bbox)] != 0)
                n = m.sum()
                s1 = (x * m).sum()
                s2 = ((x * x) * m).sum()
                todo[(c, "n")], todo[(c, "s1")], todo[(c, "s2")] = n, s1, s2
            else:
                todo[(c, "mean")], todo[(c, "std")] = x.mean(), x.std()
        elif scheme == "RescaleTo01Normalization":
            todo[(c, "min")], todo[(c, "max")] = x.min(), x.max()
    values = dict(zip(todo, compute(*todo.values()))) if todo else {}
    stats: list[dict[str, float]] = []
    for c in range(len(schemes)):
        d = {k: float(v) for (cc, k), v in values.items() if cc == c}
        if "n" in d:
            n = max(d["n"], 1.0)
            mean = d["s1"] / n
            d = {"mean": mean, "std": float(np.sqrt(max(d["s2"] / n - mean * mean, 0.0)))}
        stats.append(d)
    if any(v.get("std", 1) == 0 for v in stats):
        log.warning("a channel of the volume is constant: zscore normalisation divides by ~0")
    return stats


def make_normalizer(
    schemes: Sequence[str],
    props: dict,
    stats: Sequence[dict[str, float]],
    use_mask: Sequence[bool],
) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping raw ``(c, *box)`` input to float32 normalised as nnU-Net does.

    ``props`` are the plans' ``foreground_intensity_properties_per_channel`` (for CT),
    ``stats`` those of :func:`volume_stats`. With ``use_mask`` the zscore mask is the
    nonzero voxels (nnU-Net also fills holes in it; enclosed zero voxels differ).
    """

    def normalise(raw: np.ndarray) -> np.ndarray:
        out = np.empty(raw.shape, np.float32)
        nonzero = np.any(raw != 0, axis=0) if any(use_mask) else None
        for c, scheme in enumerate(schemes):
            x = raw[c].astype(np.float32)
            if scheme == "CTNormalization":
                p = props[str(c)] if str(c) in props else props[c]
                np.clip(x, p["percentile_00_5"], p["percentile_99_5"], out=x)
                x -= np.float32(p["mean"])
                x /= np.float32(max(p["std"], 1e-8))
            elif scheme == "ZScoreNormalization":
                mean, std = np.float32(stats[c]["mean"]), np.float32(max(stats[c]["std"], 1e-8))
                if use_mask[c]:
                    x = np.where(nonzero, (x - mean) / std, x).astype(np.float32)
                else:
                    x -= mean
                    x /= std
            elif scheme == "RescaleTo01Normalization":
                lo, hi = stats[c]["min"], stats[c]["max"]
                x -= np.float32(lo)
                x /= np.float32(max(hi - lo, 1e-8))
            elif scheme == "RGBTo01Normalization":
                x /= np.float32(255.0)
            out[c] = x
        return out

    return normalise
