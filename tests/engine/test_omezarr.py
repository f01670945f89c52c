"""The OME-Zarr writer: layout, metadata, pyramid reductions, chunk-bounded writes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_scrollseg.engine import omezarr
from napari_scrollseg.engine.errors import ScrollsegError


def test_levels_metadata_and_values(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (37, 66, 50), dtype=np.uint8)
    omezarr.write_image(
        tmp_path / "a.zarr", data, spacing=(2.0, 1.0, 0.5), chunks=(16, 16, 16), n_levels=3
    )
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    ms = root.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert [root[d["path"]].shape for d in ms["datasets"]] == [
        (37, 66, 50),
        (19, 33, 25),
        (10, 17, 13),
    ]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [4.0, 2.0, 1.0]
    assert ms["datasets"][1]["coordinateTransformations"][1]["translation"] == [1.0, 0.5, 0.25]
    np.testing.assert_array_equal(root["0"][:], data)
    assert root["0"].chunks == (16, 16, 16)
    # level 1 is the rounded mean of 2x2x2 windows (edges replicated)
    block = data[:2, :2, :2].astype(float).mean()
    assert root["1"][0, 0, 0] == np.rint(block)


def test_max_and_mode_reductions():
    block = np.array([[[1, 1], [2, 3]], [[3, 3], [3, 2]]], dtype=np.uint8)
    assert omezarr._reduce_block(block, (2, 2, 2), "max").item() == 3
    assert omezarr._reduce_block(block, (2, 2, 2), "mode").item() == 3
    tie = np.array([[[1, 1], [1, 1]], [[2, 2], [2, 2]]], dtype=np.uint8)
    assert omezarr._reduce_block(tie, (2, 2, 2), "mode").item() == 2  # ties go to the larger label
    with pytest.raises(ScrollsegError, match="unknown reduction"):
        omezarr._reduce_block(block, (2, 2, 2), "median")


def test_labels_image_and_channel_axis(tmp_path):
    img = np.zeros((2, 20, 20, 20), np.uint8)
    img[1, 5:10] = 255
    path = tmp_path / "p.zarr"
    omezarr.write_image(path, img, spacing=(1, 1, 1), chunks=(1, 8, 8, 8), n_levels=2)
    root = zarr.open_group(str(path), mode="r")
    assert root["1"].shape == (2, 10, 10, 10)  # channel axis is not downsampled
    assert next(a["type"] for a in root.attrs["multiscales"][0]["axes"]) == "channel"
    lab = np.argmax(img, axis=0).astype(np.uint8)
    omezarr.write_image(
        path / "labels" / "prediction",
        lab,
        spacing=(1, 1, 1),
        chunks=(8, 8, 8),
        labels_of=path,
        name="prediction",
        reduction="mode",
        label_colors={1: (255, 0, 0, 255)},
        label_names={1: "papyrus"},
        n_levels=2,
    )
    root = zarr.open_group(str(path), mode="r")
    assert root["labels"].attrs["labels"] == ["prediction"]
    meta = root["labels/prediction"].attrs["image-label"]
    assert meta["colors"] == [{"label-value": 1, "rgba": [255, 0, 0, 255]}]
    assert meta["properties"] == [{"label-value": 1, "class": "papyrus"}]
    np.testing.assert_array_equal(root["labels/prediction/0"][:], lab)


def test_existing_output_is_not_replaced_silently(tmp_path):
    ones = np.ones((8, 8, 8), np.uint8)
    foreign = tmp_path / "theirs.zarr"
    omezarr.write_image(foreign, ones, spacing=(1, 1, 1), chunks=(8, 8, 8))
    with pytest.raises(ScrollsegError, match="is not a zarr image written by scrollseg"):
        omezarr.write_image(foreign, ones, spacing=(1, 1, 1), overwrite=True)
    path = tmp_path / "x.zarr"
    ours = {"scrollseg": {"kind": "test"}}
    omezarr.write_image(path, ones, spacing=(1, 1, 1), chunks=(8, 8, 8), attrs=ours)
    with pytest.raises(ScrollsegError, match="already exists"):
        omezarr.write_image(path, np.ones((8, 8, 8), np.uint8), spacing=(1, 1, 1))
    omezarr.write_image(
        path, np.full((8, 8, 8), 7, np.uint8), spacing=(1, 1, 1), chunks=(8, 8, 8), overwrite=True
    )
    assert zarr.open_group(str(foreign), mode="r")["0"][0, 0, 0] == 1
    assert zarr.open_group(str(path), mode="r")["0"][0, 0, 0] == 7


def test_independent_reader_opens_it(phantom_zarr):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(phantom_zarr)))())
    image = nodes[0]
    assert len(image.data) >= 2
    assert tuple(image.data[0].shape) == (64, 128, 128)
    assert any("truth" in str(n.zarr) for n in nodes)


@pytest.mark.parametrize("reduction", ["mean", "mode"])
def test_pyramid_is_the_same_on_any_number_of_threads(tmp_path, reduction):
    """Levels are written one target chunk per task: 8 threads (a many-CPU GPU machine,
    ``pyramid_threads``) give the same bytes as one."""
    from napari_scrollseg.engine.predict.pyramid import pyramid_threads

    assert [pyramid_threads(n) for n in (1, 2, 6, 16, 64)] == [2, 2, 3, 8, 8]
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4 if reduction == "mode" else 255, (3, 70, 66, 90), dtype=np.uint8)
    levels = []
    for threads in (1, 8):
        path = tmp_path / f"t{threads}.zarr"
        group = omezarr.create_image(
            path, shape=data.shape, dtype=np.uint8, chunks=(1, 16, 16, 16),
            spacing=(1.0, 1.0, 1.0), axes="czyx", n_levels=3,
        )  # fmt: skip
        group["0"][...] = data
        omezarr.write_pyramid(group, reduction=reduction, threads=threads)
        levels.append([np.asarray(group[str(k)][...]) for k in range(1, len(group))])
    assert len(levels[0]) >= 2
    for one, eight in zip(*levels):
        np.testing.assert_array_equal(one, eight)
