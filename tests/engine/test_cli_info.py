"""``scrollseg info``: the summary, and one ``error:`` line for each kind of bad input."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile

from napari_scrollseg.cli import main


def test_info_prints_the_summary(phantom_zarr, capsys):
    assert main(["info", str(phantom_zarr)]) == 0
    out = capsys.readouterr().out
    assert f"path:     {phantom_zarr}" in out
    assert "kind:     ome-zarr (NGFF 0.4)" in out
    assert "shape:    (64, 128, 128)  (axes zyx)" in out
    assert "dtype:    uint8" in out
    assert "spacing:  (7.91, 7.91, 7.91)" in out
    assert "levels:   2: (64, 128, 128), (32, 64, 64)" in out
    assert re.search(r"size:     1\.0 MiB of voxels, [\d.]+ (KiB|MiB) on disk", out)
    assert "labels:   truth (2 levels, uint8)" in out


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.zarr", "missing.zarr does not exist; check the path"),
        (lambda d: d, "is empty; point at a folder of slice TIFFs"),
        (lambda d: (d / "a.txt").write_text("x") and d, "has no .tif slices"),
        (
            lambda d: (
                tifffile.imwrite(d / "flat.tif", np.zeros((4, 5), np.uint8)) or d / "flat.tif"
            ),
            "a volume must be 3D",
        ),
        (lambda d: (d / "scan.raw").write_bytes(b"0") and d / "scan.raw", "unsupported file type"),
        (
            lambda d: h5py.File(d / "s.h5", "w").close() or f"{d}/s.h5:/volume",
            "/volume in",
        ),
        (lambda d: f"http://127.0.0.1:{_closed_port()}/s.zarr", "cannot read http://127.0.0.1"),
    ],
    ids=["missing", "empty", "no-tiffs", "2d", "unsupported", "hdf5-dataset", "unreachable"],
)
def test_info_errors_are_one_line(tmp_path, capsys, make, message):
    target = make(tmp_path)
    assert main(["info", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_info_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "napari_scrollseg.cli", "info", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
