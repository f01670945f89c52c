"""Intensity statistics over every annotated voxel, for nnU-Net's dataset fingerprint.

nnU-Net's fingerprint samples intensities only where ``seg > 0``. Our export maps
annotation class 1 to nnU-Net's background 0, so with dense labels that class is left
out of the statistics, and the ``CT`` scheme's clip window (the 0.5 and 99.5
percentiles) can cut it off: its voxels are clipped to one value and the network never
sees them. Sparse labels hide this, because their ignore voxels count as foreground.

:func:`annotated_intensity_properties` samples every annotated voxel (every class,
background included; ignore and the cropped-away border excluded) the way nnU-Net
samples its foreground, and :func:`fix_fingerprint` writes the result into
``dataset_fingerprint.json`` before planning. The planner copies it into the plans, so
training, scrollseg's prediction and stock nnU-Net's prediction all use the same window.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError

#: the fingerprint key nnU-Net's planner copies into ``plans.json``
KEY = "foreground_intensity_properties_per_channel"
#: where the statistics nnU-Net computed (``seg > 0`` only) are kept for reference
NNUNET_KEY = "scrollseg_nnunet_seg_gt0_intensity_properties"
_TOTAL_SAMPLES = 10_000_000  # nnU-Net samples 1e8; 1e7 gives the same percentiles to 3 digits


def annotated_intensity_properties(
    raw_dataset: str | os.PathLike, *, seed: int = 1234
) -> dict[str, dict[str, float]]:
    """Per channel ``mean, median, std, min, max, percentile_00_5, percentile_99_5``.

    Over the annotated voxels (label ``>= 0`` and not ``ignore``) of every training case
    of the nnU-Net raw dataset, after nnU-Net's crop to the nonzero region, with the same
    number of samples drawn (with replacement) from each case, as nnU-Net does.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw = Path(raw_dataset)
    meta = json.loads((raw / "dataset.json").read_text())
    ignore = meta["labels"].get("ignore")
    cases = get_filenames_of_train_images_and_targets(str(raw), meta)
    if not cases:
        raise ScrollsegError(f"{raw} has no training cases")
    first = next(iter(cases.values()))["images"][0]
    reader = determine_reader_writer_from_dataset_json(meta, first)
    n_channels = len(meta["channel_names"])
    per_case = max(10_000, _TOTAL_SAMPLES // len(cases))
    rs = np.random.RandomState(seed)
    samples: list[list[np.ndarray]] = [[] for _ in range(n_channels)]
    for case in cases.values():
        rw = reader()
        images, _ = rw.read_images(case["images"])
        seg, _ = rw.read_seg(case["label"])
        images, seg, _ = crop_to_nonzero(images, seg)
        mask = seg[0] >= 0  # crop_to_nonzero marks the border it drops with -1
        if ignore is not None:
            mask &= seg[0] != ignore
        for c in range(n_channels):
            values = images[c][mask]
            if values.size:
                samples[c].append(rs.choice(values, per_case, replace=True))
    out = {}
    for c in range(n_channels):
        if not samples[c]:
            raise ScrollsegError(f"{raw}: no annotated voxels in any training case")
        v = np.concatenate(samples[c])
        p_lo, median, p_hi = np.percentile(v, (0.5, 50.0, 99.5))
        out[str(c)] = {
            "mean": float(np.mean(v)),
            "median": float(median),
            "std": float(np.std(v)),
            "min": float(np.min(v)),
            "max": float(np.max(v)),
            "percentile_99_5": float(p_hi),
            "percentile_00_5": float(p_lo),
        }
    return out


def fix_fingerprint(raw_dataset: str | os.PathLike, fingerprint_file: str | os.PathLike) -> dict:
    """Replace the fingerprint's intensity statistics by :func:`annotated_intensity_properties`.

    nnU-Net's own (``seg > 0``) statistics stay in the file under :data:`NNUNET_KEY`.
    Returns ``{"annotated": new, "nnunet": old}``.
    """
    path = Path(fingerprint_file)
    fp = json.loads(path.read_text())
    old = fp.get(NNUNET_KEY, fp[KEY])
    new = annotated_intensity_properties(raw_dataset)
    fp[NNUNET_KEY] = old
    fp[KEY] = new
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(fp, indent=4))
    os.replace(tmp, path)
    return {"annotated": new, "nnunet": old}


def clip_window(props: dict[str, dict[str, float]], channel: int | str = 0) -> tuple[float, float]:
    """The ``CT`` scheme's clip window ``(percentile_00_5, percentile_99_5)`` of a channel."""
    p = props[str(channel)]
    return float(p["percentile_00_5"]), float(p["percentile_99_5"])
