"""A synthetic scroll: small, deterministic stand-in for a Vesuvius scroll CT scan.

Papyrus sheets are wound as an Archimedean spiral around the z axis, with wavy
sheets, fibre texture, air gaps between the turns, scanner-like noise and a few
faint ink blobs on the outer sheet surfaces. The dense ground truth uses the
annotation convention of the design: 1 air, 2 papyrus, 3 ink.

Sheet pitch, thickness and ink size grow with the shape up to the default shape
(64 x 128 x 128) and keep their voxel size above it: a larger phantom shows more
turns of the same sheets, as a larger scan of the same scroll would.

Every z-slice is computed on its own from ``(shape, seed, z)``, so the phantom
is the same whichever way it is chunked and can be made lazily at any size.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_scrollseg.engine.colors import palette_color
from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    import dask.array as da

log = logging.getLogger(__name__)

AIR, PAPYRUS, INK = 1, 2, 3
CLASSES = {"air": AIR, "papyrus": PAPYRUS, "ink": INK}
COLORS = {c: (*palette_color(c), 255) for c in (AIR, PAPYRUS, INK)}  # RGBA 0..255
DEFAULT_SHAPE = (64, 128, 128)
SPACING = (7.91, 7.91, 7.91)  # micrometres, as the Vesuvius scroll scans
#: half the in-plane size at which features stop growing (the default shape's)
FEATURE_HALF = min(DEFAULT_SHAPE[1:]) / 2
INK_CONTRAST = 18.0  # grey values ink adds to papyrus (noise sigma 12): faint, as real ink


@dataclass(frozen=True)
class _Params:
    shape: tuple[int, int, int]
    centre: tuple[float, float]
    r_in: float
    r_out: float
    pitch: float
    thickness: float
    wave_amp: float
    wave_phase: float
    ink: np.ndarray  # (n, 4): z, theta, turn, radius
    ink_contrast: float = INK_CONTRAST


def _params(shape: tuple[int, int, int], seed: int, ink_contrast: float = INK_CONTRAST) -> _Params:
    rng = np.random.default_rng(seed)
    z, y, x = shape
    half = min(y, x) / 2
    # sheet pitch, thickness, core and ink size scale with the shape up to the default
    # shape and keep their voxel size above it: a larger phantom has more turns
    scale = min(half, FEATURE_HALF)
    pitch = max(6.0, scale / 5.5)
    n_ink = max(3, round(z * y * x / 200_000))
    r_in = 0.18 * scale
    r_out = 0.92 * half
    n_turns = int((r_out - r_in) / pitch)
    ink = np.column_stack(
        [
            rng.uniform(0.15 * z, 0.85 * z, n_ink),
            rng.uniform(0, 2 * np.pi, n_ink),
            rng.integers(1, max(2, n_turns), n_ink),
            rng.uniform(0.35, 0.6, n_ink) * pitch * 1.6,
        ]
    )
    return _Params(
        shape=shape,
        centre=(y / 2 + rng.uniform(-1, 1), x / 2 + rng.uniform(-1, 1)),
        r_in=r_in,
        r_out=r_out,
        pitch=pitch,
        thickness=0.45 * pitch,
        wave_amp=0.12 * pitch,
        wave_phase=rng.uniform(0, 2 * np.pi),
        ink=ink,
        ink_contrast=float(ink_contrast),
    )


def _slice(p: _Params, z: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8) and truth (uint8) of one z-slice."""
    _, ny, nx = p.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    dy, dx = yy - p.centre[0], xx - p.centre[1]
    r = np.hypot(dy, dx)
    theta = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    # wavy sheets: the radius wobbles with angle and height
    wobble = p.wave_amp * np.sin(5 * theta + 0.15 * z + p.wave_phase)
    s = (r + wobble - p.r_in) / p.pitch - theta / (2 * np.pi)
    turn = np.floor(s)
    u = (s - turn) * p.pitch  # depth across the sheet, 0 .. pitch
    inside = (r > p.r_in) & (r < p.r_out)
    sheet = inside & (u < p.thickness)
    truth = np.full((ny, nx), AIR, np.uint8)
    truth[sheet] = PAPYRUS
    # ink: blobs on the outer surface of a sheet (u near the thickness)
    surface = sheet & (u > 0.55 * p.thickness)
    for iz, itheta, iturn, irad in p.ink:
        if abs(z - iz) > irad + 1:  # the blob does not reach this slice (dist >= |z - iz|)
            continue
        at = np.nonzero(surface & (turn == iturn))  # only where the blob can be
        dtheta = np.angle(np.exp(1j * (theta[at] - itheta)))
        arc = dtheta * r[at]
        dist = np.sqrt(arc**2 + (z - iz) ** 2)
        hit = dist < irad
        truth[at[0][hit], at[1][hit]] = INK
    # intensities: air dark, papyrus bright with fibres, ink slightly brighter
    fibres = 10 * np.sin(0.9 * theta * r + 0.3 * z) * np.sin(1.7 * u) + 6 * np.sin(
        0.7 * z + 0.4 * r
    )
    img = np.where(sheet, 150 + fibres, 45.0).astype(np.float32)
    img[truth == INK] += p.ink_contrast
    edge = np.clip(1 - np.abs(u - p.thickness / 2) / (p.thickness / 2), 0, 1) ** 0.3
    img = np.where(sheet, 45 + (img - 45) * edge, img)
    rng = np.random.default_rng([seed, z])
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), truth


def _check_shape(shape: Sequence[int], seed: int = 0) -> tuple[int, int, int]:
    if len(shape) != 3 or min(shape) < 8:
        raise ScrollsegError(f"phantom shape must be three sizes >= 8 (z y x), got {tuple(shape)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ScrollsegError(f"phantom seed must be an integer >= 0, got {seed!r}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


def _check_disk(out: Path, shape: tuple[int, int, int]) -> None:
    """Refuse a phantom whose image + truth (uncompressed, with pyramid) exceed the free disk."""
    need = 2 * int(np.prod(shape, dtype=object)) * 8 // 7  # uint8 image + truth, 2x levels
    where = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise ScrollsegError(
            f"a phantom of shape {shape} needs up to {need / 1e9:.3g} GB (uncompressed) and "
            f"{where} has {free / 1e9:.3g} GB free; choose a smaller --shape or another disk"
        )


def make_phantom(
    shape: Sequence[int] = DEFAULT_SHAPE, *, seed: int = 0, ink_contrast: float = INK_CONTRAST
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image, truth)`` as uint8 numpy arrays of ``shape`` (z, y, x).

    ``ink_contrast``: grey values ink adds to papyrus (default faint, as real ink).
    """
    shape = _check_shape(shape, seed)
    p = _params(shape, seed, ink_contrast)
    pairs = [_slice(p, z, seed) for z in range(shape[0])]
    return np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])


def lazy_phantom(
    shape: Sequence[int] = DEFAULT_SHAPE,
    *,
    seed: int = 0,
    z_chunk: int = 16,
    ink_contrast: float = INK_CONTRAST,
) -> tuple[da.Array, da.Array]:
    """The phantom as two dask arrays, computed slab by slab on demand."""
    import dask.array as da

    shape = _check_shape(shape, seed)
    p = _params(shape, seed, ink_contrast)

    def block(which: int, block_info=None) -> np.ndarray:
        z0, z1 = block_info[None]["array-location"][0]
        return np.stack([_slice(p, z, seed)[which] for z in range(z0, z1)])

    chunks = (z_chunk, shape[1], shape[2])
    template = da.zeros(shape, chunks=chunks, dtype=np.uint8)
    image = da.map_blocks(
        block, 0, dtype=np.uint8, chunks=template.chunks, meta=np.empty((0,) * 3, np.uint8)
    )
    truth = da.map_blocks(
        block, 1, dtype=np.uint8, chunks=template.chunks, meta=np.empty((0,) * 3, np.uint8)
    )
    return image, truth


def write_phantom(
    out: str | Path,
    shape: Sequence[int] = DEFAULT_SHAPE,
    *,
    seed: int = 0,
    chunks: Sequence[int] = (64, 64, 64),
    overwrite: bool = False,
    ink_contrast: float = INK_CONTRAST,
) -> Path:
    """Write the phantom as OME-Zarr: image at ``out/0..``, truth at ``out/labels/truth/0..``.

    It is built in a hidden folder beside ``out`` and moved in when complete, so a kill
    leaves no half-written phantom. ``overwrite`` replaces only a phantom scrollseg wrote.
    """
    from napari_scrollseg.engine import omezarr
    from napari_scrollseg.engine.safe_write import check_replaceable, partial_dir, swap_in, tidy

    out = Path(out)
    shape = _check_shape(shape, seed)
    tidy(out)
    if out.exists():
        if not overwrite:
            raise ScrollsegError(f"{out} already exists; choose another path or pass overwrite")
        check_replaceable(out, "phantom", lambda info: "phantom" in info)
    _check_disk(out, shape)
    image, truth = lazy_phantom(shape, seed=seed, z_chunk=int(chunks[0]), ink_contrast=ink_contrast)
    about = {"shape": list(image.shape), "seed": seed, "ink_contrast": float(ink_contrast)}
    attrs = {"scrollseg": {"phantom": about, "classes": CLASSES}}
    tmp = partial_dir(out)
    try:
        omezarr.write_image(
            tmp, image, spacing=SPACING, chunks=chunks, name="phantom", attrs=attrs, overwrite=True
        )
        omezarr.write_image(
            tmp / "labels" / "truth",
            truth,
            spacing=SPACING,
            chunks=chunks,
            labels_of=tmp,
            name="truth",
            reduction="mode",
            label_colors=COLORS,
            label_names={v: k for k, v in CLASSES.items()},
        )
        swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote phantom %s to %s", image.shape, out)
    return out
