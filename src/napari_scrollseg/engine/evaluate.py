"""Compare a prediction with ground truth: Dice, F0.5, precision, recall, confusion matrix.

Both are label volumes in the annotation's ids (``1..K``). Truth voxels that are
unlabeled (``0``) or ignore (the largest value of the truth's dtype) are skipped. The
count runs block by block over dask arrays (pairs of ``(truth, prediction)`` values are
counted per block and summed), so volumes larger than memory stream through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError

PREDICTION_LABELS = "prediction"


def _label_array(source: Any, *, prefer: str | None) -> tuple[Any, dict[int, str]]:
    """A dask label array and the class names recorded with it (``{}`` where none)."""
    import dask.array as da

    from napari_scrollseg.engine.omezarr import read_label_metadata
    from napari_scrollseg.engine.volumes import open_volume

    if not isinstance(source, (str, os.PathLike)):
        return da.asarray(source), {}
    vol = open_volume(source)
    path = Path(os.fspath(source))
    if prefer and prefer in vol.labels:
        names, _ = read_label_metadata(path / "labels" / prefer)
        return vol.labels[prefer][0], names
    if vol.ndim != 3 or vol.dtype.kind not in "ui":
        raise ScrollsegError(
            f"{source} is not a label volume (shape {vol.shape}, {vol.dtype}): give integer "
            "labels (z, y, x), e.g. OUT.zarr/labels/truth or an annotation store"
        )
    names = read_label_metadata(path)[0] if path.is_dir() else {}
    return vol.data, names


def _count_pairs(truth: np.ndarray, pred: np.ndarray) -> dict[int, int]:
    key = np.asarray(truth).astype(np.int64) << 32
    key |= np.asarray(pred).astype(np.int64)
    values, counts = np.unique(key, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "f0.5": ratio(1.25 * tp, 1.25 * tp + 0.25 * fn + fp),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
    }


def evaluate(
    pred: Any,
    truth: Any,
    *,
    roi: str | None = None,
    classes: dict[int, str] | None = None,
    num_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Per-class scores of ``pred`` against ``truth``.

    Parameters
    ----------
    pred
        A ``scrollseg predict`` output (its ``labels/prediction`` is used), another label
        volume path, or an array.
    truth
        A label volume path (e.g. ``PHANTOM.zarr/labels/truth``, an annotation store,
        a label TIFF) or an array, same shape as the prediction.
    roi
        ``"z0:z1,y0:y1,x0:x1"``: score only this box.
    classes
        ``{id: name}``; default: the names recorded with the prediction, else with the
        truth, else ``class <id>``.
    num_workers
        Threads of the dask scheduler (default: dask's).
    progress
        Called as ``progress(blocks_done, blocks_total)`` after each block is counted.

    Returns
    -------
    dict
        ``classes`` (names of ids 1..K), ``per_class`` ``{name: {dice, f0.5, precision,
        recall, tp, fp, fn}}``, ``mean_dice``, ``confusion`` (rows: truth classes, columns:
        predicted classes, then ``other`` for any other predicted value), ``voxels``
        (scored) and ``skipped`` (``unlabeled`` and ``ignore`` truth voxels).
    """
    import dask
    from dask.callbacks import Callback

    from napari_scrollseg.engine.annotations import ignore_value
    from napari_scrollseg.engine.config import parse_roi
    from napari_scrollseg.engine.dask_compute import compute, thread_callbacks

    p, p_names = _label_array(pred, prefer=PREDICTION_LABELS)
    t, t_names = _label_array(truth, prefer=None)
    if p.shape != t.shape:
        raise ScrollsegError(
            f"prediction shape {tuple(p.shape)} differs from truth shape {tuple(t.shape)}: "
            "compare volumes of the same size (predict the whole volume, or crop the truth)"
        )
    box = tuple(slice(a, b) for a, b in parse_roi(roi, p.shape))
    p, t = p[box], t[box]
    t = t.rechunk(p.chunks)
    ign = ignore_value(t.dtype)
    parts = [
        dask.delayed(_count_pairs)(tb, pb)
        for tb, pb in zip(t.to_delayed().ravel(), p.to_delayed().ravel(), strict=True)
    ]
    kwargs = {"scheduler": "threads"}
    if num_workers:
        kwargs["num_workers"] = num_workers
    done = [0]

    def counted(key: Any, *_: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if progress is not None and str(name).startswith("_count_pairs"):
            done[0] += 1
            progress(done[0], len(parts))

    counts: dict[tuple[int, int], int] = {}
    with thread_callbacks(Callback(posttask=counted)):
        results = compute(*parts, **kwargs)
    for part in results:
        for key, n in part.items():
            pair = (key >> 32, key & 0xFFFFFFFF)
            counts[pair] = counts.get(pair, 0) + n
    names = dict(classes or p_names or t_names)
    names.pop(ign, None)
    names.pop(0, None)
    seen = {tv for tv, _ in counts if tv not in (0, ign)} | {pv for _, pv in counts if pv}
    k = max([*names, *seen, 1])
    ids = list(range(1, k + 1))
    label = [names.get(i, f"class {i}") for i in ids]
    conf = np.zeros((k, k + 1), dtype=np.int64)  # last column: any other predicted value
    skipped = {"unlabeled": 0, "ignore": 0}
    for (tv, pv), n in counts.items():
        if tv == 0:
            skipped["unlabeled"] += n
        elif tv == ign:
            skipped["ignore"] += n
        else:
            conf[tv - 1, pv - 1 if 1 <= pv <= k else k] += n
    per_class = {}
    for i, name in enumerate(label):
        tp = conf[i, i]
        per_class[name] = _scores(tp, conf[:, i].sum() - tp, conf[i].sum() - tp)
        per_class[name]["truth_voxels"] = int(conf[i].sum())
    dices = [s["dice"] for s in per_class.values() if s["truth_voxels"]]
    return {
        "classes": label,
        "per_class": per_class,
        "mean_dice": float(np.mean(dices)) if dices else float("nan"),
        "confusion": {
            "rows": label,
            "columns": [*label, "other"],
            "matrix": conf.tolist(),
        },
        "voxels": int(conf.sum()),
        "skipped": skipped,
        "roi": [[s.start, s.stop] for s in box],
    }


def format_table(result: dict) -> str:
    """The scores and the confusion matrix of :func:`evaluate` as a readable text table."""
    names = result["classes"]
    w = max(8, *(len(n) for n in names))
    lines = [f"{'class':<{w}}  {'Dice':>6} {'F0.5':>6} {'prec.':>6} {'recall':>6} {'voxels':>12}"]
    for name, s in result["per_class"].items():
        lines.append(
            f"{name:<{w}}  {s['dice']:6.3f} {s['f0.5']:6.3f} {s['precision']:6.3f} "
            f"{s['recall']:6.3f} {s['truth_voxels']:12d}"
        )
    lines.append(f"{'mean Dice':<{w}}  {result['mean_dice']:6.3f}")
    conf = result["confusion"]
    cols = conf["columns"] if any(r[-1] for r in conf["matrix"]) else conf["columns"][:-1]
    cw = max(10, *(len(c) for c in cols))
    lines.append("")
    lines.append(f"confusion (rows: truth, columns: prediction), {result['voxels']} voxels")
    lines.append(f"{'':<{w}}  " + " ".join(f"{c:>{cw}}" for c in cols))
    for name, row in zip(conf["rows"], conf["matrix"], strict=True):
        lines.append(f"{name:<{w}}  " + " ".join(f"{v:>{cw}d}" for v in row[: len(cols)]))
    sk = result["skipped"]
    lines.append(f"skipped truth voxels: {sk['unlabeled']} unlabeled (0), {sk['ignore']} ignore")
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write :func:`evaluate`'s result as JSON (NaN as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and v != v:
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.write_text(json.dumps(clean(result), indent=2) + "\n")
    return path
