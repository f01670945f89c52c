"""What a model folder may name: the allow-list that network building goes through.

nnU-Net builds its network from dotted names in ``plans.json``
(``architecture.network_class_name`` and the ``arch_kwargs`` listed in
``_kw_requires_import``), which it imports and calls. A model from elsewhere must not
be able to name any other code, so:

- :func:`check_plans` reads the names from the plans dict alone (nothing imported or
  called) and refuses, with one :class:`ScrollsegError` naming the entry, anything
  outside the allow-list: architectures of ``dynamic_network_architectures``, torch.nn
  convolutions / norms / dropouts / activations, the residual blocks of
  ``dynamic_network_architectures``, and plain names for what nnU-Net looks up inside
  its own package (preprocessor, resampling functions, reader/writer, label manager);
- :func:`build_network` resolves the checked names to classes (importing only those
  trusted packages), checks what it got, and hands nnU-Net the classes, not names.

Trainer names (the checkpoint's ``trainer_name``, the folder's ``Trainer__Plans__cfg``)
are only recorded, never imported; :func:`check_name` keeps them plain identifiers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from napari_scrollseg.engine.errors import ScrollsegError

if TYPE_CHECKING:
    import torch

ARCH_PREFIX = "dynamic_network_architectures.architectures."
# modules of dynamic_network_architectures.architectures (residual_unet: nnU-Net's old
# plans name it; it moved to unet, and the class is looked up there)
ARCH_MODULES = ("unet", "resnet", "vgg", "primus", "residual_unet")
TORCH_BLOCKS = {
    "conv_op": (
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
    ),
    "norm_op": (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "GroupNorm",
        "LayerNorm",
        "RMSNorm",
        "SyncBatchNorm",
    ),
    "dropout_op": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"),
    "nonlin": (
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "PReLU",
        "RReLU",
        "ELU",
        "SELU",
        "CELU",
        "GELU",
        "SiLU",
        "Mish",
        "Hardswish",
        "Hardtanh",
        "Sigmoid",
        "Tanh",
        "Softplus",
        "Identity",
    ),
}
# torch.nn.X or torch.nn.modules.<submodule>.X, as nnU-Net writes them
TORCH_SUBMODULES = (
    "conv",
    "batchnorm",
    "instancenorm",
    "normalization",
    "dropout",
    "activation",
    "linear",
)
RESIDUAL_BLOCKS = {
    "dynamic_network_architectures.building_blocks.residual." + n: n
    for n in ("BasicBlockD", "BottleneckD")
}
# entries nnU-Net resolves by plain name inside its own package
NAMED_ENTRIES = (
    "preprocessor_name",
    "resampling_fn_data",
    "resampling_fn_seg",
    "resampling_fn_probabilities",
)
TOP_NAMED_ENTRIES = ("image_reader_writer", "label_manager", "experiment_planner_used")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REFUSE = "refused to build the network: "


def _refuse(where: str, entry: str, value: Any, allowed: str) -> ScrollsegError:
    return ScrollsegError(
        f"{_REFUSE}{where} names {value!r} in {entry}, which is not on the allow-list "
        f"({allowed}); only models built from nnU-Net's standard building blocks are loaded"
    )


def check_name(where: str, entry: str, value: Any) -> None:
    """A name that is recorded or looked up by plain name: an identifier, nothing dotted."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise _refuse(where, entry, value, "a plain name without dots")


def _arch_parts(name: Any) -> tuple[str, str] | None:
    """``(module, class)`` of an allowed architecture name, or None."""
    if not isinstance(name, str) or not name.startswith(ARCH_PREFIX):
        return None
    module, _, cls = name[len(ARCH_PREFIX) :].rpartition(".")
    if module not in ARCH_MODULES or not _IDENTIFIER.match(cls) or not cls[0].isupper():
        return None
    return module, cls


def _torch_block(key: str, name: Any) -> str | None:
    """The torch.nn class name an allowed building-block name stands for, or None."""
    if not isinstance(name, str):
        return None
    prefix, _, cls = name.rpartition(".")
    ok_prefix = prefix == "torch.nn" or prefix in {
        f"torch.nn.modules.{s}" for s in TORCH_SUBMODULES
    }
    return cls if ok_prefix and cls in TORCH_BLOCKS.get(key, ()) else None


def _check_architecture(where: str, arch: Any) -> None:
    if not isinstance(arch, dict):
        raise ScrollsegError(f"{_REFUSE}{where}: 'architecture' is not a JSON object")
    name = arch.get("network_class_name")
    if _arch_parts(name) is None:
        raise _refuse(
            where,
            "network_class_name",
            name,
            f"classes of {ARCH_PREFIX}{{{','.join(ARCH_MODULES)}}}",
        )
    kwargs = arch.get("arch_kwargs", {})
    imports = arch.get("_kw_requires_import", [])
    if not isinstance(kwargs, dict) or not isinstance(imports, list):
        raise ScrollsegError(
            f"{_REFUSE}{where}: arch_kwargs must be an object and _kw_requires_import a list"
        )
    for key in imports:
        allowed_keys = (*TORCH_BLOCKS, "block")
        if key not in allowed_keys:
            raise _refuse(where, "_kw_requires_import", key, f"only {', '.join(allowed_keys)}")
        value = kwargs.get(key)
        if value is None:
            continue
        if key == "block":
            if value not in RESIDUAL_BLOCKS:
                raise _refuse(where, f"arch_kwargs.{key}", value, ", ".join(RESIDUAL_BLOCKS))
        elif _torch_block(key, value) is None:
            raise _refuse(
                where, f"arch_kwargs.{key}", value, f"torch.nn.{{{','.join(TORCH_BLOCKS[key])}}}"
            )


def check_plans(plans: Any, where: str) -> None:
    """Refuse a plans dict that names anything outside the allow-list (imports nothing)."""
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise ScrollsegError(f"{where} has no 'configurations' object: re-copy the model")
    for entry in TOP_NAMED_ENTRIES:
        if entry in plans:
            check_name(where, entry, plans[entry])
    if plans.get("label_manager", "LabelManager") != "LabelManager":  # nnU-Net's only one
        raise _refuse(where, "label_manager", plans["label_manager"], "LabelManager")
    for cname, config in plans["configurations"].items():
        if not isinstance(config, dict):
            raise ScrollsegError(f"{where}: configuration {cname!r} is not a JSON object")
        here = f"{where} (configuration {cname})"
        for entry in NAMED_ENTRIES:
            if entry in config:
                check_name(here, entry, config[entry])
        if "architecture" in config:
            _check_architecture(here, config["architecture"])
        elif "UNet_class_name" in config:  # nnU-Net's old plans format: it maps two names
            if config["UNet_class_name"] not in ("PlainConvUNet", "ResidualEncoderUNet"):
                raise _refuse(
                    here,
                    "UNet_class_name",
                    config["UNet_class_name"],
                    "PlainConvUNet, ResidualEncoderUNet",
                )
        elif "inherits_from" not in config:
            raise ScrollsegError(f"{here} has no 'architecture': re-copy the model")


def _architecture_class(name: str) -> type:
    import importlib

    import torch

    module, cls = _arch_parts(name)  # type: ignore[misc]  # checked by check_plans
    candidates = [module] if module != "residual_unet" else []
    candidates += [m for m in ARCH_MODULES if m not in (module, "residual_unet")]
    for mod in candidates:  # nnU-Net, too, looks a moved class up in the other modules
        obj = getattr(importlib.import_module(ARCH_PREFIX + mod), cls, None)
        if obj is None:
            continue
        if not (
            isinstance(obj, type)
            and issubclass(obj, torch.nn.Module)
            and obj.__module__.startswith("dynamic_network_architectures.")
        ):
            raise _refuse("plans.json", "network_class_name", name, "network classes")
        return obj
    raise ScrollsegError(
        f"plans.json names the network {name!r}, which this dynamic_network_architectures "
        "does not have: update it (pip install -U dynamic_network_architectures)"
    )


def _block_class(key: str, name: str) -> type:
    import importlib

    import torch

    if key == "block":
        module, _, cls = name.rpartition(".")
        obj = getattr(importlib.import_module(module), cls)
    else:
        obj = getattr(torch.nn, _torch_block(key, name), None)  # type: ignore[arg-type]
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise _refuse("plans.json", f"arch_kwargs.{key}", name, "torch.nn building blocks")
    return obj


def build_network(
    arch_class_name: str,
    arch_kwargs: dict,
    requires_import: list[str],
    n_in: int,
    n_out: int,
    *,
    where: str,
) -> torch.nn.Module:
    """nnU-Net's network for checked plans (:func:`check_plans`), from resolved classes."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    _check_architecture(
        where,
        {
            "network_class_name": arch_class_name,
            "arch_kwargs": arch_kwargs,
            "_kw_requires_import": list(requires_import),
        },
    )
    cls = _architecture_class(arch_class_name)
    kwargs = dict(arch_kwargs)
    for key in requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _block_class(key, kwargs[key])
    try:
        return get_network_from_plans(
            f"{cls.__module__}.{cls.__qualname__}",
            kwargs,
            [],
            n_in,
            n_out,
            allow_init=False,
            deep_supervision=False,
        )
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as exc:
        raise ScrollsegError(
            f"{where}: could not build the network {arch_class_name} from its arch_kwargs "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): re-copy "
            "the model or update dynamic_network_architectures"
        ) from exc
