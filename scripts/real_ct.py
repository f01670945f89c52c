"""Fetch a real micro-CT scan from PyPI and make its ground truth (for the real-scan tutorial).

The scan is ``cement_128x128x128.tif`` (uint8, 128^3, a cement paste with air pores),
shipped inside the ``qim3d`` wheel on PyPI. It is fetched with ``pip download --no-deps``
(nothing is installed) and cut into a training part (z 0..88) and a held-out part
(z 96..128), each with a two-class truth:

* class 1 ``matrix`` (the paste, bright), class 2 ``pore`` (dark and grey pores);
* made by a threshold (82) on the 3x3x3 median-filtered scan, a 3x3x3 median filter of the
  labels, pores under 10 voxels removed, and a one-voxel band on every class border set
  to ignore (255), where partial volume makes the class unsure.

Usage: ``python scripts/real_ct.py OUT_DIR`` writes ``train.tif``, ``train_truth.tif``,
``train_sparse.tif`` (3 annotated z-slices), ``test.tif`` and ``test_truth.tif``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "qim3d==1.5.3"
MEMBER = "qim3d/examples/cement_128x128x128.tif"
CLASSES = ("matrix", "pore")
TRAIN_Z, TEST_Z = (0, 88), (96, 128)
SPARSE_SLICES = (20, 44, 68)
THRESHOLD = 82


def fetch(dest: Path) -> Path:
    """Download the wheel (no install) and extract the scan to ``dest/cement.tif``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "cement.tif"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE],
            check=True,
            timeout=600,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            out.write_bytes(zf.read(MEMBER))
    return out


def make_truth(scan: np.ndarray) -> np.ndarray:
    """Two-class truth (1 matrix, 2 pore, 255 ignore on class borders) of the scan."""
    from scipy import ndimage as ndi

    smooth = ndi.median_filter(scan, size=3)
    labels = np.where(smooth < THRESHOLD, 2, 1).astype(np.uint8)
    labels = ndi.median_filter(labels, size=3)
    comp, n = ndi.label(labels == 2)
    sizes = ndi.sum(np.ones(comp.shape), comp, index=np.arange(1, n + 1))
    labels[np.isin(comp, np.flatnonzero(sizes < 10) + 1)] = 1
    border = np.zeros(scan.shape, bool)
    for k in (1, 2):
        m = labels == k
        border |= m & ~ndi.binary_erosion(m, border_value=1)
    labels[border] = 255
    return labels


def sparse(truth: np.ndarray, slices: tuple[int, ...] = SPARSE_SLICES) -> np.ndarray:
    """Only the given z-slices of the truth annotated, the rest unlabeled (0)."""
    out = np.zeros_like(truth)
    out[list(slices)] = truth[list(slices)]
    return out


def write_parts(dest: Path) -> dict[str, Path]:
    """Fetch the scan and write the training / held-out parts and their truths."""
    import tifffile

    scan = tifffile.imread(fetch(dest))
    truth = make_truth(scan)
    parts = {
        "train": scan[slice(*TRAIN_Z)],
        "train_truth": truth[slice(*TRAIN_Z)],
        "train_sparse": sparse(truth[slice(*TRAIN_Z)]),
        "test": scan[slice(*TEST_Z)],
        "test_truth": truth[slice(*TEST_Z)],
    }
    paths = {}
    for name, data in parts.items():
        paths[name] = dest / f"{name}.tif"
        tifffile.imwrite(
            paths[name],
            data,
            imagej=True,
            resolution=(1, 1),
            metadata={"spacing": 1.0, "axes": "ZYX"},
        )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder")
    args = parser.parse_args()
    for name, path in write_parts(args.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
