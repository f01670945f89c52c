"""Import hygiene, checked in fresh interpreters: the package, the engine and the
reader pull in no torch, nnU-Net or Qt, and napari's start-up with scrollseg
installed (plugin discovery, our manifest, our contributions) imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "nnunetv2")
GUI = ("qtpy", "PyQt6", "PyQt5", "PySide6", "napari")


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _loaded(stdout: str) -> set[str]:
    return set(json.loads(stdout.strip().splitlines()[-1]))


def test_package_engine_and_reader_import_light(phantom_zarr):
    code = f"""
        import json, sys
        import napari_scrollseg
        import napari_scrollseg.engine
        import napari_scrollseg.engine.volumes
        import napari_scrollseg.engine.omezarr
        import napari_scrollseg.engine.phantom
        from napari_scrollseg._reader import get_reader
        import napari_scrollseg._writer
        import napari_scrollseg._sample_data
        layers = get_reader({str(phantom_zarr)!r})({str(phantom_zarr)!r})
        assert [kind for _, _, kind in layers] == ["image", "labels"]
        names = {HEAVY + GUI!r}
        print(json.dumps([m for m in names if m in sys.modules]))
    """
    assert _loaded(_run(code).stdout) == set()


def test_napari_startup_with_plugin_imports_no_torch():
    code = f"""
        import json, sys
        import napari
        from npe2 import PluginManager
        pm = PluginManager.instance()
        pm.discover()
        manifest = pm.get_manifest("napari-scrollseg")
        # napari imports a contribution's module when it is first used
        for command in manifest.contributions.commands:
            assert callable(pm.commands.get(command.id))
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """
    result = _run(code, "-X", "importtime")
    assert _loaded(result.stdout) == set()
    ours = [line for line in result.stderr.splitlines() if "napari_scrollseg" in line]
    assert ours, "no napari_scrollseg module was imported"


def test_in_process_prediction_imports_no_compiler(phantom_zarr):
    """napari's process loads the model and predicts (live widget, full run, evaluate);
    none of it may import ``torch._dynamo`` or triton: triton's own LLVM segfaults on load
    next to Mesa's llvmpipe (napari under software OpenGL, common on remote desktops).
    Training, which builds an optimizer (and so imports torch._dynamo), runs in a
    subprocess."""
    code = f"""
        import json, sys, tempfile
        from napari_scrollseg.engine.builtin import builtin_model
        from napari_scrollseg.engine.evaluate import evaluate
        from napari_scrollseg.engine.predict import predict_region, predict_volume
        from napari_scrollseg.engine.volumes import open_volume
        model = str(builtin_model())
        predict_region(model, open_volume({str(phantom_zarr)!r}), (slice(0, 32),) * 3, mirror=False)
        out = tempfile.mkdtemp() + "/out.zarr"
        predict_volume(model, {str(phantom_zarr)!r}, out, mirror=False)
        evaluate(out, {str(phantom_zarr)!r})
        print(json.dumps([m for m in ("torch._dynamo", "torch._inductor", "triton") if m in sys.modules]))
    """
    assert _loaded(_run(code).stdout) == set()


def test_the_live_widget_warms_torch_off_the_gui_thread():
    """Opening the live widget imports torch and nnU-Net in a background thread (libtorch
    loaded with the GIL released), not at napari's start-up and not on the GUI thread: the
    first Load / Predict spends no time importing."""
    code = """
        import json, sys, threading
        from napari.components import ViewerModel
        from qtpy.QtWidgets import QApplication
        app = QApplication.instance() or QApplication([])
        from napari_scrollseg.widgets.live import WARM_MODULES, LiveWidget
        before = "torch" in sys.modules
        widget = LiveWidget(ViewerModel())
        (warm,) = [t for t in threading.enumerate() if t.name == "scrollseg-warm"]
        warm.join(300)
        print(json.dumps([before, [m for m in WARM_MODULES if m not in sys.modules]]))
    """
    before, missing = json.loads(_run(code).stdout.strip().splitlines()[-1])
    assert before is False
    assert missing == []
