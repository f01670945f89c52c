"""``scrollseg demo``: the whole loop on the synthetic scroll, headless."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from napari_scrollseg.engine.dask_compute import to_numpy
from napari_scrollseg.engine.errors import ScrollsegError

log = logging.getLogger(__name__)


def tiny_network(
    features: Sequence[int] = (4, 8, 16), patch: Sequence[int] = (16, 32, 32), batch_size: int = 2
) -> dict:
    """Plans overrides for a tiny nnU-Net (``train(plans_overrides=...)``): one stage per
    entry of ``features``, a small ``patch`` (divisible by 2**(stages-1)) and batch."""
    return {
        "n_stages": len(features),
        "features_per_stage": [int(f) for f in features],
        "patch_size": [int(p) for p in patch],
        "batch_size": int(batch_size),
    }


def sparse_slices(truth: np.ndarray, *, n_slices: int = 4, axis: int = 0) -> np.ndarray:
    """Sparse annotation made from a dense truth: ``n_slices`` evenly spaced slices kept.

    Everything else becomes ``0`` (unlabeled), as a user who painted a few slices.
    """
    truth = np.asarray(truth)
    n = truth.shape[axis]
    if not 1 <= n_slices <= n:
        raise ScrollsegError(f"n_slices must be 1..{n}, got {n_slices}")
    keep = np.unique(np.linspace(0, n - 1, n_slices + 2).round().astype(int)[1:-1])
    if keep.size == 0:
        keep = np.array([n // 2])
    labels = np.zeros_like(truth)
    index = [slice(None)] * truth.ndim
    index[axis] = keep
    labels[tuple(index)] = truth[tuple(index)]
    return labels


def phantom_cases(
    folder: Path,
    shape: tuple[int, int, int],
    seeds: list[int],
    *,
    n_slices: int | None = None,
    ink_contrast: float | None = None,
) -> list[tuple[Path, np.ndarray]]:
    """Training cases ``(phantom OME-Zarr path, labels)``, one per seed, for export.

    Phantoms are written once under ``folder`` (OME-Zarr, so the export carries their
    spacing). Labels are the dense truth, or ``n_slices`` z-slices of it (sparse).
    """
    from napari_scrollseg.engine.phantom import INK_CONTRAST, write_phantom
    from napari_scrollseg.engine.volumes import open_volume

    contrast = INK_CONTRAST if ink_contrast is None else float(ink_contrast)
    cases = []
    for seed in seeds:
        path = Path(folder) / f"seed{seed}_ink{contrast:g}.zarr"
        if not path.exists():
            write_phantom(path, shape, seed=seed, ink_contrast=contrast)
        truth = to_numpy(open_volume(path).labels["truth"][0])
        labels = truth if n_slices is None else sparse_slices(truth, n_slices=n_slices)
        cases.append((path, labels))
    return cases


def dice_per_class(
    pred: np.ndarray, truth: np.ndarray, classes: dict[str, int]
) -> dict[str, float]:
    """Dice ``2|P∩T| / (|P| + |T|)`` per class (``classes``: name -> label value in both)."""
    out = {}
    for name, value in classes.items():
        p, t = pred == value, truth == value
        denom = int(p.sum()) + int(t.sum())
        out[name] = 2 * int((p & t).sum()) / denom if denom else float("nan")
    return out


def save_montage(
    path: str | Path,
    panels: dict[str, np.ndarray],
    *,
    colors: dict[int, tuple[int, ...]],
    title: str = "",
) -> Path:
    """PNG of 2D panels side by side: the first is a grey scan, the others label maps.

    Label ``0`` is drawn black (unlabeled / no prediction); other values take ``colors``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels))
    lut = np.zeros((256, 3), np.uint8)
    for value, rgba in colors.items():
        lut[value] = rgba[:3]
    for i, (ax, (name, img)) in enumerate(zip(axes, panels.items(), strict=True)):
        if i == 0:
            ax.imshow(img, cmap="gray")
        else:
            ax.imshow(lut[np.asarray(img, np.uint8)])
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def run_demo(
    out: str | Path = "scrollseg-demo",
    *,
    n_slices: int = 4,
    epochs: int = 2,
    iterations: int = 5,
    device: str | None = None,
    mirror: bool = False,
) -> Iterator[str]:
    """Run the whole loop on the phantom into ``out``, yielding one line per step.

    Phantom -> sparse annotation of ``n_slices`` z-slices (copied from the truth into an
    :class:`~napari_scrollseg.engine.annotations.AnnotationStore`) -> nnU-Net dataset
    export -> a short training run (``epochs`` x ``iterations``, a tiny network: it shows
    the mechanics, not a useful model) -> full-volume prediction with the built-in model
    ``phantom-tiny`` -> Dice per class against the full truth (``dice.json``) and a PNG
    montage of scan / annotation / prediction / truth (``montage.png``).
    """
    import shutil

    import zarr

    from napari_scrollseg.engine.annotations import AnnotationStore
    from napari_scrollseg.engine.builtin import builtin_model
    from napari_scrollseg.engine.dataset import export_dataset
    from napari_scrollseg.engine.phantom import (
        CLASSES,
        COLORS,
        DEFAULT_SHAPE,
        SPACING,
        write_phantom,
    )
    from napari_scrollseg.engine.predict import iter_predict_volume
    from napari_scrollseg.engine.train import train
    from napari_scrollseg.engine.volumes import describe, open_volume

    out = Path(out)
    mark = out / ".scrollseg-demo"  # the demo replaces its own outputs, nothing else
    if out.is_dir() and any(out.iterdir()) and not mark.exists():
        raise ScrollsegError(
            f"{out} is not empty and was not made by the demo (which replaces its nnUNet_raw, "
            "nnUNet_results and outputs there); give a new or empty --out folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    mark.touch()
    scan = out / "phantom.zarr"
    if scan.exists():
        yield f"phantom: reusing {scan}"
    else:
        write_phantom(scan, DEFAULT_SHAPE, seed=0)
        yield f"phantom: wrote {scan}"
    yield describe(open_volume(scan))
    image = np.asarray(zarr.open_array(str(scan / "0"), mode="r")[...])
    truth = np.asarray(zarr.open_array(str(scan / "labels" / "truth" / "0"), mode="r")[...])

    # 1. sparse annotation: a few z-slices painted from the truth, the rest unlabeled
    names = sorted(CLASSES, key=CLASSES.get)
    store = AnnotationStore.create(
        out / "annotations.zarr", shape=truth.shape, spacing=SPACING, classes=names, overwrite=True
    )
    sparse = sparse_slices(truth, n_slices=n_slices)
    painted = [int(z) for z in np.flatnonzero(sparse.any(axis=(1, 2)))]
    for z in painted:
        store[z] = sparse[z]
    store.save()
    fraction = (sparse > 0).mean()
    yield (
        f"annotation: {len(painted)} z-slices {painted} painted from the truth "
        f"({fraction:.1%} of the voxels), saved to {store.path}"
    )

    # 2. export as an nnU-Net dataset
    raw_root = out / "nnUNet_raw"
    shutil.rmtree(raw_root, ignore_errors=True)
    dataset = export_dataset(
        [(scan, store)], out_dir=raw_root, dataset_id=999, name="ScrollsegDemo", classes=names
    )
    yield f"export: {dataset}"

    # 3. a short training run (mechanics only; the prediction below uses the built-in model)
    results = out / "nnUNet_results"
    shutil.rmtree(results, ignore_errors=True)
    for ev in train(
        dataset,
        results_dir=results,
        folds=("all",),
        device=device,
        epochs=epochs,
        iterations=iterations,
        num_processes=1,
        da_processes=0,
        validate=False,  # a sliding-window pass over the training volume: minutes on a CPU
        plans_overrides=tiny_network(),
    ):
        yield f"train: {ev}"

    # 4. full-volume prediction with the built-in model
    model = builtin_model()
    pred_path = out / "prediction.zarr"
    last = None
    for progress in iter_predict_volume(
        model, scan, pred_path, device=device, mirror=mirror, overwrite=True
    ):
        finished = progress.chunks_done == progress.chunks_total
        if progress.stage in ("pyramid", "done") or (progress.stage == "predict" and finished):
            yield (
                f"predict ({model.name}, mirroring {'on' if mirror else 'off'}): {progress.stage} "
                f"{progress.chunks_done}/{progress.chunks_total} chunks, {progress.elapsed_s:.0f} s"
            )
        last = progress
    pred = np.asarray(
        zarr.open_array(str(pred_path / "labels" / "prediction" / "0"), mode="r")[...]
    )
    # the prediction is stored in the annotation's class ids 1..K

    # 5. Dice against the full truth, and a montage
    dice = dice_per_class(pred, truth, CLASSES)
    (out / "dice.json").write_text(
        json.dumps({"model": str(model), "mirror": mirror, "dice": dice}, indent=2)
    )
    yield "dice vs full truth: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
    z = painted[len(painted) // 2]
    montage = save_montage(
        out / "montage.png",
        {
            f"scan z={z}": image[z],
            "annotation": store[z],
            "prediction (built-in model)": pred[z],
            "truth": truth[z],
        },
        colors=COLORS,
        title="scrollseg demo: " + ", ".join(f"{k} Dice {v:.2f}" for k, v in dice.items()),
    )
    yield f"montage: {montage}"
    if last is not None:
        yield f"done in {out} (prediction {last.elapsed_s:.0f} s)"
