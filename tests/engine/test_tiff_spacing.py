"""Voxel size of TIFFs: ImageJ spacing/unit, OME physical sizes, never print resolutions."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from napari_scrollseg.engine.errors import ScrollsegError

DATA = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)


def _spacing(path, caplog) -> tuple[tuple[float, ...], list[str]]:
    from napari_scrollseg.engine.volumes import open_volume

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="napari_scrollseg"):
        spacing = open_volume(path).spacing
    return tuple(round(s, 6) for s in spacing), [r.getMessage() for r in caplog.records]


def test_imagej_spacing_and_unit(tmp_path, caplog):
    import tifffile

    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path,
        DATA,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"},
    )
    spacing, warnings = _spacing(path, caplog)
    assert spacing == (2.0, 0.25, 0.5)
    assert not warnings


def test_imagej_default_print_resolution_is_not_a_voxel_size(tmp_path, caplog):
    """ImageJ's uncalibrated default (e.g. 100 pixels per inch) must not become 0.01."""
    import tifffile

    path = tmp_path / "inch.tif"
    tifffile.imwrite(
        path,
        DATA,
        imagej=True,
        resolution=(100, 100),
        resolutionunit="INCH",
        metadata={"axes": "ZYX"},
    )
    spacing, warnings = _spacing(path, caplog)
    assert spacing == (1.0, 1.0, 1.0)
    assert len(warnings) == 1
    assert "no voxel size" in warnings[0]


def test_ome_tiff_physical_sizes(tmp_path, caplog):
    import tifffile

    path = tmp_path / "vol.ome.tif"
    tifffile.imwrite(
        path,
        DATA,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeZ": 3.0,
            "PhysicalSizeY": 1.5,
            "PhysicalSizeX": 1500,
            "PhysicalSizeXUnit": "nm",
        },
    )
    spacing, warnings = _spacing(path, caplog)
    assert spacing == (3.0, 1.5, 1.5)  # nm converted to µm
    assert not warnings


def test_plain_tiff_with_centimetre_resolution_warns_and_uses_one(tmp_path, caplog):
    import tifffile

    path = tmp_path / "plain.tif"
    tifffile.imwrite(
        path, DATA, photometric="minisblack", resolution=(400, 400), resolutionunit="CENTIMETER"
    )
    spacing, warnings = _spacing(path, caplog)
    assert spacing == (1.0, 1.0, 1.0)
    assert len(warnings) == 1
    assert "spacing 1 is used" in warnings[0]


def test_export_refuses_image_and_labels_with_different_spacing(tmp_path, capsys):
    import tifffile

    from napari_scrollseg.cli import main
    from napari_scrollseg.engine.dataset import export_dataset

    img, lab = tmp_path / "img.tif", tmp_path / "lab.tif"
    tifffile.imwrite(
        img, DATA, imagej=True, resolution=(2, 2), metadata={"spacing": 0.5, "axes": "ZYX"}
    )
    labels = np.zeros(DATA.shape, np.uint8)
    labels[1, 2:6, 2:6] = 1
    labels[2, 2:6, 2:6] = 2
    tifffile.imwrite(
        lab, labels, imagej=True, resolution=(1, 1), metadata={"spacing": 2.0, "axes": "ZYX"}
    )
    with pytest.raises(ScrollsegError, match="--ignore-spacing"):
        export_dataset(
            [(img, lab)], out_dir=tmp_path / "raw", dataset_id=961, name="S", classes=["a", "b"]
        )
    args = ["export", "--image", str(img), "--labels", str(lab), "--classes", "a,b"]
    args += ["--out", str(tmp_path / "raw"), "--dataset-id", "961", "--name", "S"]
    assert main(args) == 2
    assert "--ignore-spacing" in capsys.readouterr().err
    assert main([*args, "--ignore-spacing"]) == 0
    # labels that record no spacing take the image's
    tifffile.imwrite(lab, labels, photometric="minisblack")
    raw = export_dataset(
        [(img, lab)], out_dir=tmp_path / "raw2", dataset_id=962, name="T", classes=["a", "b"]
    )
    import json

    (case,) = json.loads((raw / "dataset.json").read_text())["scrollseg"]["cases"].values()
    assert case["spacing"] == [0.5, 0.5, 0.5]
