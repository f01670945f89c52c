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
