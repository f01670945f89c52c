"""Fetch a real micro-CT scan from PyPI and make its ground truth (for the real-scan tutorial).

The scans ship inside the ``qim3d`` wheel on PyPI, fetched with ``pip download
--no-deps`` (nothing is installed). Each is cut into a training part and a held-out
part along z, each with a truth in which voxels on class borders are ignore (255),
where partial volume makes the class unsure.

``--scan cement`` (default): ``cement_128x128x128.tif`` (uint8, 128^3, a cement paste
with air pores); training z 0..88, held-out z 96..128.

* class 1 ``matrix`` (the paste, bright), class 2 ``pore`` (dark and grey pores);
* a threshold (82) on the 3x3x3 median-filtered scan, a 3x3x3 median filter of the
  labels, pores under 10 voxels removed, a one-voxel band on every class border ignore.

``--scan fibers``: ``fibers_150x150x150.tif`` (uint8, 150^3), a carbon-fibre laminate
whose plies are stacked along y (fibres along z for y < 35, at 135 degrees in the z-x
plane for y 35..55, then 90, 45 and 0 degrees). Its first two plies, y 0..48, give
the woven-composite setting of issue 14: void and two tow directions. Training z
0..100, held-out z 110..150.

* class 1 ``void`` (the dark resin pockets between the fibres: Gaussian-smoothed
  (sigma 1) scan below 100, components under 10 voxels removed, the one-voxel ring
  around each pocket ignore: the pockets are a few voxels wide, so a band inside them
  too would leave little void); it becomes nnU-Net's background, the class that
  report found unlearned;
* class 2 ``tow_z`` (fibres along z), class 3 ``tow_diag`` (fibres at 135 degrees): the
  fibre direction is the structure tensor's least-curvature axis (gradients sigma 1,
  tensor smoothed sigma 4, over the whole scan); a voxel whose direction is more than
  20 degrees from both plies' (where they meet) is ignore, and so is a one-voxel band
  along each ply's border.

Usage: ``python scripts/real_ct.py OUT_DIR [--scan fibers]`` writes the scan,
``train.tif``, ``train_truth.tif``, ``train_sparse.tif`` (3 annotated z-slices),
``test.tif`` and ``test_truth.tif``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "qim3d==1.5.3"
MEMBER = "qim3d/examples/cement_128x128x128.tif"
CLASSES = ("matrix", "pore")
TRAIN_Z, TEST_Z = (0, 88), (96, 128)
SPARSE_SLICES = (20, 44, 68)
THRESHOLD = 82
#: fibers: void threshold on the smoothed scan; ply directions (degrees in the z-x
#: plane, 0 = along z) and the tolerance around them; the crop with two plies (y)
VOID_BELOW = 100
PLIES = {"tow_z": 0.0, "tow_diag": 135.0}
PLY_TOLERANCE = 20.0
FIBERS_Y = (0, 48)


def fetch(dest: Path, member: str = MEMBER) -> Path:
    """Download the wheel (no install) and extract ``member`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / (Path(member).name.split("_")[0] + ".tif")
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
            out.write_bytes(zf.read(member))
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
    return _border_ignored(labels)


def _border_ignored(labels: np.ndarray) -> np.ndarray:
    """Labels with a one-voxel band on every class border set to ignore (255)."""
    from scipy import ndimage as ndi

    border = np.zeros(labels.shape, bool)
    for k in np.unique(labels[labels != 255]):
        m = labels == k
        border |= m & ~ndi.binary_erosion(m, border_value=1)
    out = labels.copy()
    out[border] = 255
    return out


def fibre_angle(scan: np.ndarray) -> np.ndarray:
    """Fibre direction per voxel as an angle in the z-x plane (degrees, 0..180, 0 along z):
    the structure tensor's eigenvector of least curvature (gradients sigma 1, tensor
    smoothed sigma 4)."""
    from scipy import ndimage as ndi

    img = scan.astype(np.float32)
    grad = [ndi.gaussian_filter(img, 1.0, order=o) for o in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    tensor = np.empty((*scan.shape, 3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            tensor[..., i, j] = tensor[..., j, i] = ndi.gaussian_filter(grad[i] * grad[j], 4.0)
    direction = np.linalg.eigh(tensor)[1][..., :, 0]  # (z, y, x) of the smallest eigenvalue
    return np.degrees(np.arctan2(direction[..., 2], direction[..., 0])) % 180


def make_fibers_truth(scan: np.ndarray) -> np.ndarray:
    """Three-class truth (1 void, 2 tow_z, 3 tow_diag, 255 ignore) of the whole scan;
    only its two first plies (``FIBERS_Y``) are meant to be used."""
    from scipy import ndimage as ndi

    labels = np.full(scan.shape, 255, np.uint8)
    angle = fibre_angle(scan)
    for k, (_, ply) in enumerate(PLIES.items(), start=2):
        off = np.abs((angle - ply + 90) % 180 - 90)  # angular distance, 0..90
        labels[off <= PLY_TOLERANCE] = k
    labels = _border_ignored(labels)  # and a one-voxel band where the plies meet
    void = ndi.gaussian_filter(scan.astype(np.float32), 1.0) < VOID_BELOW
    comp, n = ndi.label(void)
    sizes = ndi.sum(np.ones(comp.shape), comp, index=np.arange(1, n + 1))
    void[np.isin(comp, np.flatnonzero(sizes < 10) + 1)] = False
    labels[ndi.binary_dilation(void) & ~void] = 255  # the unsure ring around each pocket
    labels[void] = 1
    return labels


@dataclass(frozen=True)
class Scan:
    """A scan in the qim3d wheel, how to crop it, split it and make its truth."""

    member: str
    classes: tuple[str, ...]
    truth: Callable[[np.ndarray], np.ndarray]
    train_z: tuple[int, int]
    test_z: tuple[int, int]
    sparse_slices: tuple[int, ...]
    crop_y: tuple[int, int] | None = None


def sparse(truth: np.ndarray, slices: tuple[int, ...] = SPARSE_SLICES) -> np.ndarray:
    """Only the given z-slices of the truth annotated, the rest unlabeled (0)."""
    out = np.zeros_like(truth)
    out[list(slices)] = truth[list(slices)]
    return out


SCANS = {
    "cement": Scan(MEMBER, CLASSES, make_truth, TRAIN_Z, TEST_Z, SPARSE_SLICES),
    "fibers": Scan(
        "qim3d/examples/fibers_150x150x150.tif",
        ("void", *PLIES),
        make_fibers_truth,
        (0, 100),
        (110, 150),
        (25, 50, 75),
        FIBERS_Y,
    ),
}


def write_parts(dest: Path, scan_name: str = "cement") -> dict[str, Path]:
    """Fetch the scan and write the training / held-out parts and their truths."""
    import tifffile

    spec = SCANS[scan_name]
    scan = tifffile.imread(fetch(dest, spec.member))
    truth = spec.truth(scan)
    if spec.crop_y is not None:
        scan, truth = (a[:, slice(*spec.crop_y)] for a in (scan, truth))
    train, test = slice(*spec.train_z), slice(*spec.test_z)
    parts = {
        "train": scan[train],
        "train_truth": truth[train],
        "train_sparse": sparse(truth[train], spec.sparse_slices),
        "test": scan[test],
        "test_truth": truth[test],
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
    parser.add_argument("--scan", choices=sorted(SCANS), default="cement")
    args = parser.parse_args()
    for name, path in write_parts(args.out, args.scan).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
