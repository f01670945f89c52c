"""A model folder may name only allow-listed network code (issue 13, item 1)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_scrollseg.cli import main
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.model import load_model
from napari_scrollseg.engine.model_trust import check_plans
from tests.engine.conftest import tiny_plans
from tests.engine.test_model import _zip_model


def _hostile_copy(src: Path, root: Path, edit) -> Path:
    """A copy of a tiny model folder whose plans.json ``edit(arch, plans)`` has changed."""
    folder = root / src.parent.name / src.name
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("fold_1"))
    plans = json.loads((folder / "plans.json").read_text())
    edit(plans["configurations"]["3d_fullres"]["architecture"], plans)
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when imported."""
    marker = tmp_path / "imported.marker"
    (tmp_path / "scrollseg_evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Net:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("scrollseg_evil_mod", None)


def _os_system(marker: Path):
    def edit(arch, plans):
        arch["arch_kwargs"]["nonlin"] = "os.system"
        arch["arch_kwargs"]["nonlin_kwargs"] = {"command": f"touch {marker}"}

    return edit


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_plans_naming_os_system_is_refused_before_it_runs(
    tmp_path, monkeypatch, tiny_model_3d, as_zip
):
    monkeypatch.setenv("SCROLLSEG_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "ran.marker"
    folder = _hostile_copy(tiny_model_3d, tmp_path / "m", _os_system(marker))
    model = _zip_model(folder, tmp_path / "evil.zip") if as_zip else folder
    with pytest.raises(ScrollsegError, match=r"names 'os.system' in arch_kwargs.nonlin") as err:
        load_model(model, folds=(0,), device="cpu")
    assert "plans.json (configuration 3d_fullres)" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_unknown_network_class_is_refused_before_import(
    tmp_path, monkeypatch, tiny_model_3d, evil_module, as_zip
):
    monkeypatch.setenv("SCROLLSEG_CACHE", str(tmp_path / "cache"))
    for name in ("this.nope", "scrollseg_evil_mod.Net"):
        folder = _hostile_copy(
            tiny_model_3d, tmp_path / name, lambda a, p, n=name: a.update(network_class_name=n)
        )
        model = _zip_model(folder, tmp_path / f"{name}.zip") if as_zip else folder
        with pytest.raises(ScrollsegError, match=f"names '{name}' in network_class_name"):
            load_model(model, folds=(0,), device="cpu")
    assert not evil_module.exists()
    assert "scrollseg_evil_mod" not in sys.modules


def test_cli_predict_refuses_a_hostile_model_in_one_line(tmp_path, tiny_model_3d, capsys):
    import tifffile

    marker = tmp_path / "ran.marker"
    folder = _hostile_copy(tiny_model_3d, tmp_path / "m", _os_system(marker))
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((8, 16, 16), np.uint8))
    argv = ["predict", str(folder), str(tmp_path / "v.tif"), str(tmp_path / "out.zarr")]
    assert main([*argv, "--device", "cpu", "--folds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refused to build the network:")
    assert "\n" not in err
    assert not marker.exists()
    assert not (tmp_path / "out.zarr").exists()


HOSTILE = {
    "nonlin subprocess": lambda a, p: a["arch_kwargs"].update(nonlin="subprocess.call"),
    "conv_op eval": lambda a, p: a["arch_kwargs"].update(conv_op="builtins.eval"),
    "norm_op torch.load": lambda a, p: a["arch_kwargs"].update(norm_op="torch.load"),
    "dropout_op torch.nn.Module": lambda a, p: a["arch_kwargs"].update(
        dropout_op="torch.nn.Module"
    ),
    "conv_op as a norm": lambda a, p: a["arch_kwargs"].update(conv_op="torch.nn.InstanceNorm3d"),
    "extra import key": lambda a, p: (
        a["arch_kwargs"].update(n_stages="os.system"),
        a["_kw_requires_import"].append("n_stages"),
    ),
    "class through a module attribute": lambda a, p: a.update(
        network_class_name="dynamic_network_architectures.architectures.unet.torch.load"
    ),
    "architecture of another package": lambda a, p: a.update(
        network_class_name="torchvision.models.resnet.ResNet"
    ),
    "label manager": lambda a, p: p.update(label_manager="np"),
    "dotted preprocessor": lambda a, p: p["configurations"]["3d_fullres"].update(
        preprocessor_name="os.system"
    ),
    "architecture not an object": lambda a, p: p["configurations"]["3d_fullres"].update(
        architecture="os.system"
    ),
}


@pytest.mark.parametrize("edit", HOSTILE.values(), ids=HOSTILE.keys())
def test_check_plans_refuses_names_outside_the_allow_list(edit):
    plans = tiny_plans()
    edit(plans["configurations"]["3d_fullres"]["architecture"], plans)
    with pytest.raises(ScrollsegError, match=r"refused to build the network: plans\.json"):
        check_plans(plans, "plans.json")


ALLOWED = {
    "standard": lambda a, p: None,
    "short torch names": lambda a, p: a["arch_kwargs"].update(
        conv_op="torch.nn.Conv3d", norm_op="torch.nn.InstanceNorm3d", nonlin="torch.nn.ReLU"
    ),
}


@pytest.mark.parametrize("edit", ALLOWED.values(), ids=ALLOWED.keys())
def test_standard_building_blocks_load(tmp_path, tiny_model_3d, edit):
    import torch

    folder = _hostile_copy(tiny_model_3d, tmp_path, edit)
    model = load_model(folder, folds=(0,), device="cpu")
    assert model.forward(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 3, 8, 16, 16)


def test_residual_encoder_unet_builds(tmp_path, one_torch_thread):
    """nnU-Net's ResEnc presets name the architecture and (optionally) a residual block."""
    from napari_scrollseg.engine.model_trust import build_network

    arch = tiny_plans()["configurations"]["3d_fullres"]["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
    kwargs["block"] = "dynamic_network_architectures.building_blocks.residual.BasicBlockD"
    kwargs.update(dropout_op="torch.nn.modules.dropout.Dropout3d", dropout_op_kwargs={"p": 0.1})
    net = build_network(
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        kwargs,
        [*arch["_kw_requires_import"], "block"],
        1,
        3,
        where="plans.json",
    )
    assert type(net).__name__ == "ResidualEncoderUNet"
    with pytest.raises(ScrollsegError, match="could not build the network"):
        build_network(arch["network_class_name"], {"n_stages": 3}, [], 1, 3, where="plans.json")
