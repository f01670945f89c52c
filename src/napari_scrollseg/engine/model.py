"""Load a trained nnU-Net v2 model and apply its preprocessing exactly as nnU-Net does.

A model is an nnU-Net v2 trained-model folder (``…/DatasetXXX_Name/Trainer__Plans__config``
with ``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_*.pth``), a folder above one
(pick it with ``configuration=``), or the zip written by ``nnUNetv2_export_model_to_zip``.
Model files are untrusted: checkpoints load with ``torch.load(weights_only=True)`` and zip
members that would land outside the extraction folder are refused.

Everything works in *volume* axis order ``(z, y, x)``: the model's ``transpose_forward``
is applied inside :meth:`LoadedModel.forward`, and ``patch_size``, ``spacing`` are given
in volume order. What scrollseg does not do that nnU-Net does: resampling. A volume whose
spacing differs from the model's is refused (``ignore_spacing=True`` overrides).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.model_trust import build_network, check_name, check_plans
from napari_scrollseg.engine.normalization import (
    SUPPORTED_SCHEMES,
    VolumeCache,
    make_normalizer,
    volume_stats,
)
from napari_scrollseg.engine.normalization import nonzero_bbox as _bbox_of
from napari_scrollseg.engine.tiling import TTA_MODES, Grid, make_grid, tta_transforms
from napari_scrollseg.engine.volumes import as_czyx

if TYPE_CHECKING:
    import torch

    from napari_scrollseg.engine.volumes import ChunkCache

log = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "as_czyx",
    "choose_device",
    "clear_cache",
    "load_model",
    "nonzero_bbox",
]

Box = tuple[slice, ...]
_SPACING_RTOL = 1e-2

# loaded models by arguments, held weakly: a model lives while a session or caller holds it
_MODELS: weakref.WeakValueDictionary[tuple, LoadedModel] = weakref.WeakValueDictionary()
_MODELS_LOCK = threading.Lock()


# -- torch's shared libraries ---------------------------------------------------------------
def preload_torch() -> None:
    """Load libtorch's shared libraries with Python's GIL released, before ``import torch``.

    CPython's import, and ``ctypes.CDLL``, call ``dlopen`` holding the GIL: libtorch's load
    (0.4-0.9 s here) stalls every other Python thread, napari's GUI included. The C
    library's ``dlopen`` called through a ctypes function pointer releases the GIL; the
    import that follows finds the libraries loaded. Best effort (Linux wheels' layout):
    anything not found is left to the import.
    """
    import importlib.util
    import sys

    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return
    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.origin is None:
            return
        import ctypes

        dlopen = ctypes.CDLL(None).dlopen
        dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
        lib = Path(spec.origin).parent / "lib"
        for name in ("libc10.so", "libtorch_cpu.so", "libtorch.so"):  # the last: CUDA's too
            if (lib / name).is_file() and not dlopen(str(lib / name).encode(), os.RTLD_NOW):
                return  # the import will say what is missing
    except (OSError, AttributeError, ValueError):  # pragma: no cover - unusual layouts
        log.debug("preloading torch's libraries failed", exc_info=True)


# -- devices --------------------------------------------------------------------------------
def choose_device(device: str | None = None) -> torch.device:
    """The torch device to run on: ``device`` if given, else CUDA, else MPS, else CPU."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ScrollsegError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ScrollsegError("device 'cuda' requested but CUDA is not available: use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ScrollsegError("device 'mps' requested but MPS is not available: use --device cpu")
    return dev


def nonzero_bbox(volume: Any) -> Box:
    """nnU-Net's ``crop_to_nonzero`` bounding box of a volume (one pass over it; see
    :func:`~napari_scrollseg.engine.normalization.nonzero_bbox`)."""
    arr, _ = as_czyx(volume)
    return _bbox_of(arr, getattr(volume, "source", "the volume"))


# -- zip and folder ---------------------------------------------------------------------------
def _cache_root() -> Path:
    """Where exported zips are extracted: ``$SCROLLSEG_CACHE/models`` or the user cache."""
    base = os.environ.get("SCROLLSEG_CACHE")
    if base:
        return Path(base) / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "napari-scrollseg" / "models"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract_zip(path: Path) -> Path:
    """Extract an exported model zip into the cache (once per zip content); refuse unsafe paths."""
    digest = _sha256_file(path)
    target = _cache_root() / digest[:16]
    if target.is_dir():
        return target
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ScrollsegError(f"{path} is not a valid zip file: re-export the model") from exc
    with zf:
        for info in zf.infolist():
            name = info.filename
            parts = Path(name).parts
            mode = info.external_attr >> 16
            if (
                name.startswith(("/", "\\"))
                or (len(name) > 1 and name[1] == ":")
                or ".." in parts
                or "\\" in name
                or stat.S_ISLNK(mode)
            ):
                raise ScrollsegError(
                    f"refusing to extract {path}: member {name!r} would leave the target folder "
                    "(absolute path, '..' or link); use a zip made by nnUNetv2_export_model_to_zip"
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        try:
            root = tmp.resolve()
            for info in zf.infolist():
                dest = (tmp / info.filename).resolve()
                if root not in dest.parents and dest != root:
                    raise ScrollsegError(f"refusing to extract {path}: {info.filename!r} is unsafe")
                zf.extract(info, tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _find_model_folder(path: Path, configuration: str | None) -> Path:
    if (path / "plans.json").is_file():
        return path
    found = sorted(
        p.parent for p in path.rglob("plans.json") if (p.parent / "dataset.json").is_file()
    )
    if configuration is not None:
        found = [p for p in found if p.name.endswith(f"__{configuration}")]
    if not found:
        what = f" for configuration {configuration!r}" if configuration else ""
        raise ScrollsegError(
            f"no plans.json{what} in {path}: point at an nnU-Net trained-model folder "
            "(…/DatasetXXX_Name/Trainer__Plans__configuration holding plans.json, dataset.json "
            "and fold_N/) or a zip from nnUNetv2_export_model_to_zip"
        )
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(path)) for p in found)
        raise ScrollsegError(
            f"{path} holds several models ({names}): choose one with configuration="
        )
    return found[0]


def _fold_dir(folder: Path, fold: int | str) -> Path:
    return folder / ("fold_all" if str(fold) == "all" else f"fold_{int(fold)}")


def _available_folds(folder: Path) -> list[str]:
    return sorted(p.name[5:] for p in folder.glob("fold_*") if p.is_dir())


def _resolve_folds(
    folder: Path, folds: Any, checkpoint: str
) -> tuple[tuple[int | str, ...], list[Path]]:
    if folds is None:
        auto = sorted(
            int(p.name[5:])
            for p in folder.glob("fold_*")
            if p.name[5:].isdigit() and (p / checkpoint).is_file()
        )
        chosen: list[int | str] = list(auto)
        if not chosen and (folder / "fold_all" / checkpoint).is_file():
            chosen = ["all"]
        if not chosen:
            present = sorted({p.name for p in folder.glob("fold_*/*.pth")})
            raise ScrollsegError(
                f"no fold_*/{checkpoint} in {folder} (folds present: "
                f"{', '.join(_available_folds(folder)) or 'none'}; checkpoints there: "
                f"{', '.join(present) or 'none'}): pass one of those as checkpoint= / "
                "--checkpoint, or train the model first"
            )
    else:
        if isinstance(folds, (int, str)):
            folds = [folds]
        chosen = ["all" if str(f) == "all" else int(f) for f in folds]
    files = []
    for f in chosen:
        d = _fold_dir(folder, f)
        if not d.is_dir():
            raise ScrollsegError(
                f"fold {f} not found in {folder}: folds present are "
                f"{', '.join(_available_folds(folder)) or 'none'} (pass folds= / --folds)"
            )
        ck = d / checkpoint
        if not ck.is_file():
            present = ", ".join(sorted(p.name for p in d.glob("*.pth"))) or "none"
            raise ScrollsegError(
                f"{d.name} has no {checkpoint} (checkpoints present: {present}): pass "
                "checkpoint='checkpoint_best.pth' / --checkpoint, or finish training"
            )
        files.append(ck)
    return tuple(chosen), files


def _load_checkpoint(path: Path) -> dict:
    """``torch.load(weights_only=True)``, allowing only the numpy scalar types nnU-Net logs."""
    import pickle

    import torch

    if not zipfile.is_zipfile(path):  # torch.save writes zip archives
        raise ScrollsegError(
            f"{path} is not a readable PyTorch checkpoint (not a torch.save archive): re-copy it"
        )
    allowed = [np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Int64DType]
    try:
        allowed.append(np._core.multiarray.scalar)
    except AttributeError:  # numpy < 2
        allowed.append(np.core.multiarray.scalar)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ScrollsegError(
            f"{path} holds objects that are not plain weights and was not loaded (it could run "
            f"code): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise ScrollsegError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc


# -- the model --------------------------------------------------------------------------------
@dataclass(eq=False)
class LoadedModel:
    """A trained nnU-Net v2 model, ready to run on volumes (see :func:`load_model`).

    ``patch_size``, ``spacing`` and ``mirror_axes`` are in volume axis order; for a 2D
    model they are in-plane ``(y, x)`` and the model runs slice by slice along z.
    ``n_classes`` is the number of output channels (label 0 is background).
    :meth:`forward` runs the TTA passes of a batch as network batches of at most
    ``max(n, max_network_batch)`` tiles (lower it if the device runs out of memory).
    ``volumes`` caches whole-volume passes (nonzero box, statistics) per volume. Run it
    through a :class:`~napari_scrollseg.engine.predict.Predictor`, which serialises the
    device and counts forward passes.
    """

    folder: Path
    configuration: str
    folds: tuple[int | str, ...]
    checkpoint: str
    plans: dict
    dataset_json: dict
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    n_channels: int
    label_names: dict[int, str]
    n_classes: int
    is_2d: bool
    mirror_axes: tuple[int, ...]
    device: torch.device
    sha256: str
    normalization_schemes: tuple[str, ...] = ()
    trainer_name: str = ""
    _networks: list = field(default_factory=list, repr=False)
    _transpose: tuple[int, ...] = (0, 1, 2)
    _model_mirror_axes: tuple[int, ...] = ()
    _use_mask_for_norm: tuple[bool, ...] = ()
    _intensity: dict = field(default_factory=dict, repr=False)
    volumes: VolumeCache = field(default_factory=VolumeCache, repr=False)
    max_network_batch: int = 16

    @property
    def needs_volume_stats(self) -> bool:
        """True if a channel's normalisation uses statistics of the whole input (zscore,
        rescale): a crop predicted on its own then differs from the full volume."""
        return any(
            s in ("ZScoreNormalization", "RescaleTo01Normalization")
            for s in self.normalization_schemes
        )

    # -- volume checks and preprocessing --------------------------------------------------
    def check_volume(self, volume: Any, *, ignore_spacing: bool = False) -> None:
        """Raise :class:`ScrollsegError` if the volume's channels or spacing do not fit.

        Spacing is checked against the model's target spacing (scrollseg does not
        resample); an unknown spacing (None or all ones) is accepted.
        """
        arr, spacing = as_czyx(volume)
        if arr.shape[0] != self.n_channels:
            raise ScrollsegError(
                f"the model expects {self.n_channels} input channel(s) "
                f"({', '.join(self.dataset_json.get('channel_names', {}).values())}) but the volume "
                f"has {arr.shape[0]} (shape {tuple(arr.shape)}): give a (c, z, y, x) volume with "
                f"{self.n_channels} channel(s)"
            )
        if ignore_spacing or spacing is None or all(abs(s - 1) < 1e-6 for s in spacing):
            return
        ours = spacing[1:] if self.is_2d else spacing
        if not np.allclose(ours, self.spacing, rtol=_SPACING_RTOL, atol=0):
            raise ScrollsegError(
                f"volume spacing {tuple(spacing)} differs from the model's spacing "
                f"{self.spacing} and scrollseg does not resample: resample the volume to the "
                "model's spacing, or predict at the volume's own spacing with --ignore-spacing "
                "(ignore_spacing=True in Python)"
            )

    def grid(self, volume: Any, step: float = 0.5, *, bbox: Box | None = None) -> Grid:
        """nnU-Net's global tile grid for this model over the volume's nonzero box.

        ``bbox`` overrides the nonzero box (which costs one pass over the volume), e.g.
        the whole volume when it is known to have no all-zero border.
        """
        bbox = self.bbox(volume) if bbox is None else tuple(bbox)
        return make_grid(
            tuple(b.stop - b.start for b in bbox),
            self.patch_size,
            step,
            offset=tuple(b.start for b in bbox),
        )

    def bbox(self, volume: Any) -> Box:
        """The volume's nonzero box (:func:`nonzero_bbox`), cached per volume."""
        arr, _ = as_czyx(volume)
        source = getattr(volume, "source", "the volume")
        return self.volumes.get(("bbox", arr.name), lambda: _bbox_of(arr, source))

    def _stats(self, volume: Any, bbox: Box | None) -> list[dict[str, float]]:
        arr, _ = as_czyx(volume)
        bbox = self.bbox(volume) if bbox is None else tuple(bbox)
        return self.volumes.get(
            ("stats", arr.name, repr(bbox)),
            lambda: volume_stats(arr, self.normalization_schemes, self._use_mask_for_norm, bbox),
        )

    def normalizer(
        self, volume: Any, *, bbox: Box | None = None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """A function mapping raw ``(c, *box)`` input to float32 normalised as nnU-Net does.

        Schemes come per channel from the plans. ``CTNormalization`` uses the dataset's
        statistics from the plans. ``ZScoreNormalization`` and ``RescaleTo01Normalization``
        use statistics of the *whole* volume's nonzero box (as nnU-Net, which sees the
        whole image); they are computed once with a dask reduction and cached per
        (volume, model). With ``use_mask_for_norm`` the mask is the nonzero voxels
        (nnU-Net also fills holes in it; enclosed zero voxels differ). ``bbox`` overrides
        the nonzero box the statistics are taken over.
        """
        return make_normalizer(
            self.normalization_schemes,
            self._intensity,
            self._stats(volume, bbox),
            self._use_mask_for_norm,
        )

    def reader(
        self,
        volume: Any,
        *,
        bbox: Box | None = None,
        normalizer: Callable[[np.ndarray], np.ndarray] | None = None,
        cache: ChunkCache | None = None,
    ) -> Callable[[Box], np.ndarray]:
        """``read(box)``: the normalised ``(c, *box)`` input as nnU-Net's network sees it.

        Zero outside the nonzero box (nnU-Net crops there and pads with zeros), also where
        ``box`` leaves the volume (negative or past-the-end coordinates are fine). One dask
        compute per call. Pass ``bbox`` (``grid.data``) and ``normalizer`` computed once
        elsewhere (e.g. on a dask.distributed driver) to skip the whole-volume reductions.
        ``cache`` (:func:`~napari_scrollseg.engine.volumes.input_cache`) keeps decoded zarr
        chunks for the next reads.
        """
        from napari_scrollseg.engine.volumes import check_finite, direct_array, read_block

        arr, _ = as_czyx(volume)
        source = getattr(volume, "source", "the volume")
        bbox = self.bbox(volume) if bbox is None else tuple(bbox)
        norm = self.normalizer(volume, bbox=bbox) if normalizer is None else normalizer
        direct = direct_array(getattr(volume, "data", None))  # zarr without a dask graph

        def read(box: Box) -> np.ndarray:
            out = np.zeros((arr.shape[0], *(b.stop - b.start for b in box)), np.float32)
            inter = [slice(max(b.start, d.start), min(b.stop, d.stop)) for b, d in zip(box, bbox)]
            if any(i.start >= i.stop for i in inter):
                return out
            if direct is None:
                raw = read_block(arr, (slice(None), *inter), source)
            elif direct.ndim == 3:
                raw = direct.read_box(tuple(inter), cache)[None]
            else:
                raw = direct.read_box((slice(0, direct.shape[0]), *inter), cache)
            check_finite(raw, [i.start for i in inter], source)
            dst = tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inter, box))
            out[(slice(None), *dst)] = norm(raw)
            return out

        return read

    # -- the network ----------------------------------------------------------------------
    def autocast(self, half: bool | None = None) -> bool:
        """Whether the network runs under autocast: ``half``, or when None, on CUDA only.

        nnU-Net's predictor autocasts (float16) on CUDA and never on CPU or MPS, so the
        default gives nnU-Net's numerics on every device.
        """
        return self.device.type == "cuda" if half is None else bool(half)

    def forward(
        self,
        batch: torch.Tensor,
        *,
        mirror: bool = True,
        tta: str | None = None,
        half: bool | None = None,
    ) -> torch.Tensor:
        """Logits for a batch of tiles, averaged over folds and TTA passes.

        Parameters
        ----------
        batch
            ``(n, c, *patch_size)`` in volume axis order (2D models: ``(n, c, py, px)``).
        mirror
            nnU-Net's mirroring over the model's ``inference_allowed_mirroring_axes``
            (ignored when ``tta`` is given).
        tta
            ``"mirror"``, ``"none"`` or ``"rot-flip-12"`` (2D only; not nnU-Net's answer).
            The TTA passes of the batch run as one larger network batch.
        half
            Autocast (float16 on CUDA, bfloat16 on CPU); None: :meth:`autocast`'s default,
            on CUDA only, as nnU-Net's predictor.

        Returns
        -------
        torch.Tensor
            float32 ``(n, n_classes, *patch_size)`` on ``self.device``.
        """
        import torch

        mode = tta or ("mirror" if mirror else "none")
        if mode not in TTA_MODES:
            raise ScrollsegError(f"unknown TTA mode {mode!r}: use one of {', '.join(TTA_MODES)}")
        n_sp = batch.ndim - 2
        if mode == "rot-flip-12":
            if not self.is_2d:
                raise ScrollsegError("tta='rot-flip-12' is for 2D models; use 'mirror' or 'none'")
            if len(set(self.patch_size)) != 1:
                raise ScrollsegError(
                    f"tta='rot-flip-12' needs a square patch, the model's is {self.patch_size}"
                )
        transforms = tta_transforms(mode, mirror_axes=self._model_mirror_axes, n_spatial=n_sp)
        perm = (0, 1, *(2 + t for t in self._transpose))
        inv = tuple(int(i) for i in np.argsort(perm))
        n = batch.shape[0]
        with torch.no_grad():
            x = batch.to(self.device, torch.float32).permute(perm)
            views = []
            for k, axes in transforms:
                v = torch.rot90(x, k, dims=(-2, -1)) if k else x
                views.append(torch.flip(v, [a + 2 for a in axes]) if axes else v)
            big = torch.cat(views) if len(views) > 1 else views[0]
            total = None
            ctx = (
                torch.autocast(
                    self.device.type,
                    dtype=torch.float16 if self.device.type == "cuda" else torch.bfloat16,
                )
                if self.autocast(half)
                else contextlib.nullcontext()
            )
            step = max(n, self.max_network_batch)
            for net in self._networks:
                with ctx:
                    parts = [net(big[i : i + step]) for i in range(0, len(big), step)]
                out = (parts[0] if len(parts) == 1 else torch.cat(parts)).float()
                for i, (k, axes) in enumerate(transforms):
                    o = out[i * n : (i + 1) * n]
                    if axes:
                        o = torch.flip(o, [a + 2 for a in axes])
                    if k:
                        o = torch.rot90(o, -k, dims=(-2, -1))
                    if total is None:  # the network's own output needs no copy when alone
                        alone = len(transforms) == len(self._networks) == 1
                        alone = alone and o.data_ptr() != x.data_ptr()
                        total = o if alone else o.clone()
                    else:
                        total.add_(o)
            if len(self._networks) * len(transforms) > 1:
                total /= len(self._networks) * len(transforms)
        return total.permute(inv).contiguous()


def clear_cache() -> None:
    """Forget the loaded models (those still held elsewhere stay loaded there)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def load_model(
    path: str | os.PathLike,
    *,
    folds: Any = None,
    checkpoint: str = "checkpoint_final.pth",
    device: str | torch.device | None = None,
    configuration: str | None = None,
) -> LoadedModel:
    """Load an nnU-Net v2 trained model (folder or exported zip); cached.

    Parameters
    ----------
    path
        Trained-model folder (``…/Trainer__Plans__configuration``), a folder above it, or a
        zip from ``nnUNetv2_export_model_to_zip``.
    folds
        Folds to ensemble (ints or ``"all"``); default: every ``fold_N`` with the checkpoint,
        else ``fold_all`` (as nnU-Net).
    checkpoint
        ``checkpoint_final.pth`` or ``checkpoint_best.pth``.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; default CUDA > MPS > CPU.
    configuration
        Which model when ``path`` holds several (e.g. ``"3d_fullres"``).

    Returns
    -------
    LoadedModel
        The same object for the same arguments while one is held (a second call costs
        nothing); models nobody holds any more are freed.
    """
    from napari_scrollseg.engine.builtin import builtin_models, resolve_model

    preload_torch()  # a viewer's GUI thread keeps running while libtorch loads
    p = resolve_model(path)
    if not p.exists():
        raise ScrollsegError(
            f"model {p} does not exist: give a trained-model folder or zip, or a built-in "
            f"model's name ({', '.join(builtin_models()) or 'none installed'})"
        )
    dev = device if not isinstance(device, str) and device is not None else choose_device(device)
    key = (str(p.resolve()), repr(folds), checkpoint, str(dev), configuration)
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        model = _load(
            p, folds=folds, checkpoint=checkpoint, device=dev, configuration=configuration
        )
        _MODELS[key] = model
        return model


def _load(
    p: Path, *, folds: Any, checkpoint: str, device: torch.device, configuration: str | None
) -> LoadedModel:
    import json

    root = _extract_zip(p) if p.is_file() and zipfile.is_zipfile(p) else p
    if root.is_file():
        raise ScrollsegError(f"{p} is a file but not a zip: give a trained-model folder or zip")
    folder = _find_model_folder(root, configuration)
    if not (folder / "dataset.json").is_file():
        raise ScrollsegError(
            f"{folder} has plans.json but no dataset.json: copy it from the dataset"
        )
    try:
        plans = json.loads((folder / "plans.json").read_text())
        dataset_json = json.loads((folder / "dataset.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScrollsegError(
            f"{folder}: plans.json or dataset.json is not valid JSON ({exc}): re-copy the model"
        ) from exc
    check_plans(plans, str(folder / "plans.json"))  # before anything it names is imported
    chosen, files = _resolve_folds(folder, folds, checkpoint)

    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ckpts = [_load_checkpoint(f) for f in files]
    first = ckpts[0]
    config_name = first.get("init_args", {}).get("configuration") or folder.name.split("__")[-1]
    pm = PlansManager(plans)
    if config_name not in pm.available_configurations:
        raise ScrollsegError(
            f"configuration {config_name!r} of the checkpoint is not in {folder / 'plans.json'}"
        )
    cm = pm.get_configuration(config_name)
    lm = pm.get_label_manager(dataset_json)
    if lm.has_regions:
        raise ScrollsegError(
            f"{folder} is a region-based model (sigmoid outputs): not supported yet; train with "
            "plain labels"
        )
    if cm.previous_stage_name is not None:
        raise ScrollsegError(
            f"{folder} is a cascade stage ({config_name}) that needs the previous stage's "
            "segmentation: use the 3d_fullres, 3d_lowres or 2d model instead"
        )
    schemes = tuple(cm.normalization_schemes)
    unknown = [s for s in schemes if s not in SUPPORTED_SCHEMES]
    if unknown:
        raise ScrollsegError(
            f"normalization scheme(s) {unknown} of {folder} are not supported: supported are "
            f"{', '.join(SUPPORTED_SCHEMES)}"
        )
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = lm.num_segmentation_heads
    patch = tuple(int(v) for v in cm.patch_size)
    is_2d = len(patch) == 2
    tf = tuple(int(t) for t in pm.transpose_forward)
    if is_2d:
        if tf[0] != 0:
            raise ScrollsegError(
                f"2D model with transpose_forward {list(tf)} slices along another axis than z: "
                "not supported"
            )
        transpose = tuple(t - 1 for t in tf[1:])
    else:
        transpose = tf
    back = tuple(int(i) for i in np.argsort(transpose))
    spacing_model = tuple(float(s) for s in cm.spacing)

    mirror = first.get("inference_allowed_mirroring_axes")
    model_mirror = tuple(int(a) for a in mirror) if mirror is not None else ()

    networks = []
    for ck, f in zip(ckpts, files):
        if ck.get("trainer_name"):
            check_name(str(f), "trainer_name", ck["trainer_name"])
        net = build_network(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
            n_in,
            n_out,
            where=f"{folder / 'plans.json'} (configuration {config_name})",
        )
        weights = ck["network_weights"]
        if any(k.startswith("module.") for k in weights):
            weights = {k.removeprefix("module."): v for k, v in weights.items()}
        try:
            net.load_state_dict(weights)
        except RuntimeError as exc:
            raise ScrollsegError(
                f"{f} does not fit the network in plans.json (trainer "
                f"{ck.get('trainer_name')} may change the architecture): {str(exc).splitlines()[0]}"
            ) from exc
        networks.append(net.to(device).eval())

    h = hashlib.sha256()
    for f in files:
        h.update(_sha256_file(f).encode())
    labels = {int(v): str(k) for k, v in dataset_json["labels"].items() if k != "ignore"}
    props = plans.get("foreground_intensity_properties_per_channel", {})
    model = LoadedModel(
        folder=folder,
        configuration=config_name,
        folds=chosen,
        checkpoint=checkpoint,
        plans=plans,
        dataset_json=dataset_json,
        patch_size=tuple(patch[b] for b in back),
        spacing=tuple(spacing_model[b] for b in back),
        n_channels=n_in,
        label_names=dict(sorted(labels.items())),
        n_classes=n_out,
        is_2d=is_2d,
        mirror_axes=tuple(sorted(transpose[a] for a in model_mirror)),
        device=device,
        sha256=h.hexdigest(),
        normalization_schemes=schemes,
        trainer_name=str(first.get("trainer_name", "")),
        _networks=networks,
        _transpose=transpose,
        _model_mirror_axes=model_mirror,
        _use_mask_for_norm=tuple(bool(u) for u in cm.use_mask_for_norm),
        _intensity=props,
    )
    log.info(
        "loaded %s (%s, folds %s, %s) on %s",
        folder,
        config_name,
        chosen,
        checkpoint,
        device,
    )
    return model
