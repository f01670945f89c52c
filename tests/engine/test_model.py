"""Loading nnU-Net models: folders, zips, folds, checkpoints, devices, safety, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.model import choose_device, load_model, nonzero_bbox
from napari_scrollseg.engine.predict import predict_region
from tests.engine.conftest import blocky_volume, tiny_dataset_json, write_tiny_model


def test_attributes_and_cache(tiny_model_3d):
    model = load_model(tiny_model_3d, device="cpu")
    assert model.configuration == "3d_fullres"
    assert model.folds == (0, 1)
    assert model.checkpoint == "checkpoint_final.pth"
    assert model.patch_size == (8, 16, 16)
    assert model.spacing == (1.0, 1.0, 1.0)
    assert model.n_channels == 1
    assert model.n_classes == 3
    assert model.label_names == {0: "background", 1: "papyrus", 2: "ink"}
    assert not model.is_2d
    assert model.mirror_axes == (0, 1, 2)
    assert model.device.type == "cpu"
    assert len(model.sha256) == 64
    assert model.normalization_schemes == ("CTNormalization",)
    t = time.perf_counter()
    again = load_model(tiny_model_3d, device="cpu")
    assert again is model
    assert time.perf_counter() - t < 0.05
    one = load_model(tiny_model_3d, folds=(1,), device="cpu")
    assert one is not model
    assert one.folds == (1,)
    assert one.sha256 != model.sha256
    # the dataset folder above the model works too, choosing by configuration
    assert load_model(tiny_model_3d.parent, configuration="3d_fullres", device="cpu").folds == (
        0,
        1,
    )


def test_2d_model_attributes(tiny_model_2d, tiny_model_3d_zscore):
    model = load_model(tiny_model_2d, device="cpu")
    assert model.is_2d
    assert model.configuration == "2d"
    assert model.patch_size == (16, 16)
    assert model.mirror_axes == (0, 1)
    assert not model.needs_volume_stats
    assert load_model(tiny_model_3d_zscore, device="cpu").needs_volume_stats


def test_fold_all_and_small_network_batches(tmp_path, one_torch_thread):
    import torch

    folder = write_tiny_model(tmp_path, folds=("all",), seed=5)
    model = load_model(folder, device="cpu")
    assert model.folds == ("all",)
    x = torch.from_numpy(blocky_volume((3, 8, 16, 16), seed=4).astype(np.float32) / 100)[:, None]
    whole = model.forward(x)  # 3 tiles x 8 mirror passes in network batches of 16
    model.max_network_batch = 1
    try:
        torch.testing.assert_close(model.forward(x), whole, atol=1e-5, rtol=1e-5)
    finally:
        model.max_network_batch = 16


def test_folder_errors(tmp_path, tiny_model_3d):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScrollsegError, match=r"no plans\.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ScrollsegError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ScrollsegError, match=r"fold 3 not found .* folds present are 0, 1"):
        load_model(tiny_model_3d, folds=(3,), device="cpu")
    with pytest.raises(ScrollsegError, match=r"fold_0 has no checkpoint_best\.pth"):
        load_model(tiny_model_3d, folds=(0,), checkpoint="checkpoint_best.pth", device="cpu")
    with pytest.raises(ScrollsegError, match=r"checkpoints there: checkpoint_final\.pth"):
        load_model(tiny_model_3d, checkpoint="checkpoint_best.pth", device="cpu")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_3d / "plans.json", bare)
    shutil.copy(tiny_model_3d / "dataset.json", bare)
    with pytest.raises(ScrollsegError, match=r"no fold_\*/checkpoint_final.pth"):
        load_model(bare, device="cpu")


def test_checkpoint_with_code_is_refused(tmp_path, tiny_model_3d):
    import torch

    folder = tmp_path / "evil"
    shutil.copytree(tiny_model_3d, folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    ck["logging"]["payload"] = Payload()
    torch.save(ck, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ScrollsegError, match="not plain weights"):
        load_model(folder, folds=(0,), device="cpu")
    assert not marker.exists()


def _zip_model(folder: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A zip laid out as nnUNetv2_export_model_to_zip writes it (paths below nnUNet_results)."""
    base = folder.parent.parent
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(base).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return out


def test_zip_loads_like_the_folder(tmp_path, monkeypatch, tiny_model_3d):
    import torch

    monkeypatch.setenv("SCROLLSEG_CACHE", str(tmp_path / "cache"))
    zipped = load_model(_zip_model(tiny_model_3d, tmp_path / "m.zip"), device="cpu")
    folder = load_model(tiny_model_3d, device="cpu")
    assert zipped.sha256 == folder.sha256
    assert zipped.folder.is_relative_to(tmp_path / "cache")
    x = torch.from_numpy(blocky_volume((8, 16, 16), seed=1).astype(np.float32) / 100)[None, None]
    torch.testing.assert_close(zipped.forward(x), folder.forward(x))


@pytest.mark.parametrize("bad", ["../evil.txt", "/tmp/scrollseg-evil.txt", "a/../../evil.txt"])
def test_zip_with_unsafe_paths_is_refused(tmp_path, monkeypatch, tiny_model_3d, bad):
    monkeypatch.setenv("SCROLLSEG_CACHE", str(tmp_path / "cache"))
    z = _zip_model(tiny_model_3d, tmp_path / "bad.zip", {bad: b"boom"})
    with pytest.raises(ScrollsegError, match="would leave the target folder"):
        load_model(z, device="cpu")
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/scrollseg-evil.txt").exists()
    assert not list((tmp_path / "cache").rglob("plans.json"))  # nothing extracted


def test_region_based_model_is_refused(tmp_path, one_torch_thread):
    labels = {"background": 0, "papyrus": [1, 2], "ink": 2}
    ds = tiny_dataset_json(labels=labels)
    ds["regions_class_order"] = [1, 2]
    folder = write_tiny_model(tmp_path, dataset_json=ds, folds=(0,))
    with pytest.raises(ScrollsegError, match="region-based model"):
        load_model(folder, device="cpu")


def test_volume_checks(tiny_model_3d, tiny_model_2d):
    import types

    model = load_model(tiny_model_3d, folds=(0,), device="cpu")
    two_channels = np.zeros((2, 9, 20, 20), np.uint8)
    with pytest.raises(ScrollsegError, match=r"expects 1 input channel\(s\) .* has 2"):
        predict_region(model, two_channels, ((0, 9), (0, 20), (0, 20)))
    for m in (model, load_model(tiny_model_2d, folds=(0,), device="cpu")):
        with pytest.raises(ScrollsegError, match="expected a 3D volume"):
            predict_region(m, np.zeros((20, 20), np.uint8), ((0, 20), (0, 20)))
    vol = types.SimpleNamespace(data=blocky_volume((9, 20, 20)), spacing=(2.0, 2.0, 2.0))
    with pytest.raises(ScrollsegError, match=r"does not resample.*ignore_spacing=True"):
        predict_region(model, vol, ((0, 9), (0, 20), (0, 20)))
    probs, _ = predict_region(model, vol, ((0, 9), (0, 20), (0, 20)), ignore_spacing=True)
    assert probs.shape == (3, 9, 20, 20)
    model.check_volume(types.SimpleNamespace(data=vol.data, spacing=(1.0, 1.0, 1.0)))
    model.check_volume(types.SimpleNamespace(data=vol.data, spacing=None))


def test_choose_device():
    import torch

    expected = "cuda" if torch.cuda.is_available() else None
    assert choose_device().type == (expected or choose_device().type)
    if not torch.cuda.is_available():
        assert choose_device().type in ("cpu", "mps")
        with pytest.raises(ScrollsegError, match="CUDA is not available"):
            choose_device("cuda")
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(ScrollsegError, match="unknown device"):
        choose_device("tpu9")


def test_normalisation_equals_nnunet(tiny_model_3d, tiny_model_3d_zscore):
    import dask.array as da
    from dask.callbacks import Callback
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
        ZScoreNormalization,
    )

    from napari_scrollseg.engine.dask_compute import thread_callbacks

    raw = blocky_volume((12, 30, 25), seed=2, zero_border=2).astype(np.float32) * 1.3
    volume = da.from_array(raw, chunks=(5, 7, 9))
    bbox = nonzero_bbox(volume)
    assert bbox == (slice(2, 10), slice(3, 26), slice(5, 23))
    cropped = raw[(slice(None), *bbox)] if raw.ndim == 4 else raw[bbox][None]

    ct = load_model(tiny_model_3d, folds=(0,), device="cpu")
    props = ct.plans["foreground_intensity_properties_per_channel"]["0"]
    expected = CTNormalization(False, props).run(cropped.copy())
    np.testing.assert_allclose(ct.normalizer(volume)(cropped), expected, rtol=1e-6)

    z = load_model(tiny_model_3d_zscore, folds=(0,), device="cpu")
    expected = ZScoreNormalization(False, {}).run(cropped.copy())
    norm = z.normalizer(volume)
    np.testing.assert_allclose(norm(cropped), expected, rtol=1e-5, atol=1e-5)
    # a sub-box is normalised with the whole volume's statistics
    np.testing.assert_allclose(norm(cropped[:, :3, :4, :5]), expected[:, :3, :4, :5], atol=1e-5)

    class Count(Callback):
        def __init__(self):
            super().__init__()
            self.n = 0

        def _pretask(self, key, dsk, state):
            self.n += 1

    counter = Count()
    with thread_callbacks(counter):  # the engine's computes run only this thread's callbacks
        z.normalizer(volume)
    assert counter.n == 0  # statistics are cached per (volume, model)


def test_engine_modules_do_not_import_torch():
    code = (
        "import sys; import napari_scrollseg.engine.model, napari_scrollseg.engine.tiling, "
        "napari_scrollseg.engine.predict; "
        "bad = [m for m in ('torch', 'nnunetv2', 'napari', 'qtpy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_plans_json_is_untouched(tiny_model_3d):
    before = json.loads((tiny_model_3d / "plans.json").read_text())
    load_model(tiny_model_3d, device="cpu")
    assert json.loads((tiny_model_3d / "plans.json").read_text()) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux wheels' layout")
def test_preload_torch_loads_libtorch_before_the_import() -> None:
    """``load_model`` first loads libtorch with the GIL released (a viewer's GUI thread runs
    meanwhile); the import of torch then uses those libraries."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from napari_scrollseg.engine.model import preload_torch\n"
        "preload_torch()\n"
        "assert 'torch' not in sys.modules\n"
        "maps = Path('/proc/self/maps').read_text()\n"
        "assert 'libtorch_cpu.so' in maps, 'not preloaded'\n"
        "import torch\n"
        "assert float(torch.ones(2).sum()) == 2.0\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
