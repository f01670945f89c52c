"""Tiny real nnU-Net v2 models for prediction tests.

Each fixture writes an nnU-Net trained-model folder
(``Dataset99X_Tiny/nnUNetTrainer__nnUNetPlans__<config>``) with ``plans.json``,
``dataset.json`` and two folds of ``checkpoint_final.pth`` in the format nnU-Net's trainer
saves (``network_weights``, ``init_args``, ``trainer_name``,
``inference_allowed_mirroring_axes``, optimizer state, logging with numpy floats, ...).
The networks are freshly initialised small PlainConvUNets whose last layer is scaled so
the argmax varies across the volume: equivalence with nnU-Net needs no trained weights.
Stock ``nnUNetPredictor`` loads these folders.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

LABELS = {"background": 0, "papyrus": 1, "ink": 2}
INTENSITY = {
    "max": 250.0,
    "mean": 120.0,
    "median": 118.0,
    "min": 3.0,
    "percentile_00_5": 20.0,
    "percentile_99_5": 220.0,
    "std": 40.0,
}


def _arch(dim: int) -> dict:
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = (
        "torch.nn.modules.instancenorm.InstanceNorm3d"
        if dim == 3
        else "torch.nn.modules.instancenorm.InstanceNorm2d"
    )
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 3,
            "features_per_stage": [4, 8, 8],
            "conv_op": conv,
            "kernel_sizes": [[3] * dim] * 3,
            "strides": [[1] * dim, [2] * dim, [2] * dim],
            "n_conv_per_stage": [1, 1, 1],
            "n_conv_per_stage_decoder": [1, 1],
            "conv_bias": True,
            "norm_op": norm,
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _config(patch: list[int], spacing: list[float], scheme: str) -> dict:
    dim = len(patch)
    return {
        "data_identifier": f"nnUNetPlans_{dim}d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": [64, 64, 64][:dim],
        "spacing": spacing,
        "normalization_schemes": [scheme],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {
            "is_seg": False,
            "order": 3,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_seg_kwargs": {
            "is_seg": True,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": _arch(dim),
        "batch_dice": False,
    }


def tiny_plans(
    *,
    scheme: str = "CTNormalization",
    transpose: tuple[int, int, int] = (0, 1, 2),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    patch_3d: tuple[int, int, int] = (8, 16, 16),
    patch_2d: tuple[int, int] = (16, 16),
) -> dict:
    """plans.json of a tiny dataset with a ``3d_fullres`` and a ``2d`` configuration.

    ``spacing`` and patches are in nnU-Net's (transposed) axis order, as in real plans.
    """
    back = [int(i) for i in np.argsort(transpose)]
    return {
        "dataset_name": "Dataset990_Tiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": back,
        "configurations": {
            "3d_fullres": _config(list(patch_3d), list(spacing), scheme),
            "2d": _config(list(patch_2d), list(spacing[1:]), scheme),
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(INTENSITY)},
    }


def tiny_dataset_json(*, channel: str = "CT", labels: dict | None = None) -> dict:
    """dataset.json with one channel and labels background/papyrus/ink."""
    return {
        "channel_names": {"0": channel},
        "labels": dict(labels or LABELS),
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }


def write_tiny_model(
    root: Path,
    *,
    configuration: str = "3d_fullres",
    plans: dict | None = None,
    dataset_json: dict | None = None,
    folds: tuple[int | str, ...] = (0, 1),
    seed: int = 0,
    name: str = "Dataset990_Tiny",
) -> Path:
    """Write a freshly initialised nnU-Net trained-model folder; return its path."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = plans or tiny_plans()
    dataset_json = dataset_json or tiny_dataset_json()
    folder = root / name / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    arch = plans["configurations"][configuration]["architecture"]
    dim = len(plans["configurations"][configuration]["patch_size"])
    n_out = len(dataset_json["labels"]) - ("ignore" in dataset_json["labels"])
    for i, fold in enumerate(folds):
        torch.manual_seed(seed * 100 + i)
        net = get_network_from_plans(
            arch["network_class_name"],
            arch["arch_kwargs"],
            arch["_kw_requires_import"],
            len(dataset_json["channel_names"]),
            n_out,
            allow_init=True,
            deep_supervision=True,
        )
        with torch.no_grad():  # spread the logits so the argmax is not constant
            for layer in net.decoder.seg_layers:
                layer.weight.mul_(3.0)
                layer.bias.copy_(torch.tensor([0.5, 0.0, -0.3][:n_out]))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
        checkpoint = {
            "network_weights": net.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None,
            "logging": {
                "mean_fg_dice": [np.float64(0.1)],
                "ema_fg_dice": [np.float64(0.1)],
                "dice_per_class_or_region": [[np.float64(0.1), np.float64(0.2)]],
                "train_losses": [np.float64(0.5)],
                "val_losses": [np.float32(0.6)],
                "lrs": [0.01],
                "epoch_start_timestamps": [1.0],
                "epoch_end_timestamps": [2.0],
            },
            "_best_ema": np.float64(0.1),
            "current_epoch": 1,
            "init_args": {
                "plans": plans,
                "configuration": configuration,
                "fold": fold,
                "dataset_json": dataset_json,
                "device": torch.device("cpu"),
            },
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": tuple(range(dim)),
        }
        fold_dir = folder / ("fold_all" if fold == "all" else f"fold_{fold}")
        fold_dir.mkdir(exist_ok=True)
        torch.save(checkpoint, fold_dir / "checkpoint_final.pth")
    return folder


def blocky_volume(shape: tuple[int, ...], *, seed: int = 0, zero_border: int = 0) -> np.ndarray:
    """A uint8 volume of three intensity phases (about 40, 120, 200) with mild noise.

    Sharp phase boundaries make the tiny networks' argmax decisive (few near-ties), like a
    trained model's. ``zero_border`` sets an uneven border to 0 (nnU-Net crops it away).
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=shape), 2.5)
    lo, hi = np.quantile(field, [0.33, 0.66])
    phases = np.digitize(field, [lo, hi])
    out = np.array([40, 120, 200], np.float32)[phases] + rng.normal(0, 4, size=shape)
    out = np.clip(out, 1, 255).astype(np.uint8)
    if zero_border:
        b = zero_border
        keep = np.zeros(shape, bool)
        keep[b:-b, b + 1 : -(b + 2), b + 3 : -b] = True
        out[~keep] = 0
    return out


@pytest.fixture(scope="session")
def one_torch_thread() -> None:
    """Run torch on one thread: on a shared 2-core machine more threads are ~10x slower."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_3d(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """3d_fullres, CT normalisation, patch (8, 16, 16), folds 0 and 1."""
    return write_tiny_model(tmp_path_factory.mktemp("model3d"), configuration="3d_fullres")


@pytest.fixture(scope="session")
def tiny_model_3d_zscore(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """3d_fullres, zscore normalisation (whole-volume statistics), folds 0 and 1."""
    return write_tiny_model(
        tmp_path_factory.mktemp("model3dz"),
        configuration="3d_fullres",
        plans=tiny_plans(scheme="ZScoreNormalization"),
        dataset_json=tiny_dataset_json(channel="zscore"),
        seed=1,
        name="Dataset991_TinyZ",
    )


@pytest.fixture(scope="session")
def tiny_model_2d(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """2d, CT normalisation, patch (16, 16), folds 0 and 1."""
    return write_tiny_model(tmp_path_factory.mktemp("model2d"), configuration="2d", seed=2)


# -- nnU-Net's own answer, and how close ours is ------------------------------------------------
FP16_MIN_NORMAL = 6.1035e-05


def nnunet_predict(
    folder: Path,
    volume: np.ndarray,
    *,
    folds: tuple[int | str, ...] = (0, 1),
    step: float = 0.5,
    mirror: bool = True,
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
    device: str = "cpu",
    sums: str = "float16",
) -> tuple[np.ndarray, np.ndarray, object]:
    """Stock ``nnUNetPredictor`` on a (z, y, x) or (c, z, y, x) array (CPU by default;
    on CUDA nnU-Net keeps everything on the device and autocasts to float16).

    ``sums="float32"`` runs the same code with its sliding-window accumulators
    (``predicted_logits``, ``n_predictions``, allocated as ``torch.half``) in float32:
    nnU-Net's algorithm without its float16 rounding, the reference scrollseg matches
    everywhere. Returns (labels, probabilities, the predictor).
    """
    import contextlib
    from unittest import mock

    import torch
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    data = volume[None] if volume.ndim == 3 else volume
    predictor = nnUNetPredictor(
        tile_step_size=step,
        use_gaussian=True,
        use_mirroring=mirror,
        perform_everything_on_device=device != "cpu",
        device=torch.device(device),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(folder), folds, "checkpoint_final.pth")
    if sums not in ("float16", "float32"):
        raise ValueError(f"sums must be float16 or float32, got {sums!r}")
    patched = (
        mock.patch.object(predict_from_raw_data, "torch", _TorchWithFloat32Half())
        if sums == "float32"
        else contextlib.nullcontext()
    )
    with patched:
        seg, probs = predictor.predict_single_npy_array(
            data.astype(np.float32), {"spacing": list(spacing)}, None, None, True
        )
    return seg, probs, predictor


def nnunet_references(folder: Path, volume: np.ndarray, **kw: object) -> dict:
    """nnU-Net's answer with its own float16 sums (``labels``, ``probs``, ``predictor``)
    and with float32 sums (``labels32``, ``probs32``); ``kw`` go to ``nnunet_predict``."""
    labels, probs, predictor = nnunet_predict(folder, volume, **kw)
    labels32, probs32, _ = nnunet_predict(folder, volume, sums="float32", **kw)
    return {
        "labels": labels,
        "probs": probs,
        "predictor": predictor,
        "labels32": labels32,
        "probs32": probs32,
    }


class _TorchWithFloat32Half(types.ModuleType):
    """``torch`` as nnU-Net's predictor module sees it, except ``half`` is float32."""

    def __init__(self) -> None:
        import torch

        super().__init__("torch")
        self.half = torch.float32

    def __getattr__(self, name: str) -> object:
        import torch

        return getattr(torch, name)


def equivalence(
    probs: np.ndarray,
    labels: np.ndarray,
    ref_probs: np.ndarray,
    ref_labels: np.ndarray,
    weights: np.ndarray,
) -> dict[str, float]:
    """How close a prediction is to nnU-Net's, on the measures the tests assert.

    nnU-Net accumulates weighted logits and weights in float16. Where the summed gaussian
    weight is below float16's smallest normal number (a thin band along the volume's
    edges and corners, where only tile corners reach) its sums are subnormal and lose
    most digits; scrollseg sums in float32. ``sound`` marks the voxels outside that band.
    Labels are compared where nnU-Net's top-two probabilities differ by at least 1/255
    (closer ones are ties within the probability tolerance; float16 makes many exact).
    """
    sound = (weights >= FP16_MIN_NORMAL) | (weights == 0)
    diff = np.abs(probs - ref_probs).max(axis=0)
    top = np.sort(ref_probs, axis=0)
    decided = (top[-1] - top[-2]) >= 1 / 255
    agree = labels == ref_labels
    return {
        "max_prob_diff_sound": float(diff[sound].max()),
        "max_prob_diff_all": float(diff.max()),
        "frac_sound": float(sound.mean()),
        "label_agree_all": float(agree.mean()),
        "label_agree_decided": float(agree[decided].mean()),
        "label_agree_decided_sound": float(agree[decided & sound].mean()),
        "frac_decided": float(decided.mean()),
    }
