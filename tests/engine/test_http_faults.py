"""A volume server that dies in the middle of a prediction (issue 13, item 6).

One clear error naming the URL, no long traceback; the same run, once the server is
back, resumes and gives the uninterrupted answer.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.omezarr import write_image
from tests.engine.conftest import blocky_volume
from tests.http_server import VolumeServer as _Server


def _read(out: Path) -> tuple[np.ndarray, np.ndarray]:
    root = zarr.open_group(str(out), mode="r")
    return root["0"][...], root["labels/prediction/0"][...]


@pytest.mark.slow
def test_server_dies_mid_prediction_then_the_rerun_resumes(tmp_path, monkeypatch, tiny_model_3d):
    from napari_scrollseg.engine.predict_volume import predict_volume

    monkeypatch.setenv("SCROLLSEG_HTTP_TIMEOUT", "2")
    monkeypatch.setenv("SCROLLSEG_HTTP_RETRIES", "1")
    image = blocky_volume((16, 48, 48), seed=4)
    write_image(tmp_path / "scan.zarr", image, spacing=(1.0, 1.0, 1.0), chunks=(8, 16, 16))
    options = dict(chunk=8, folds="0", device="cpu", num_workers=1)
    ref = predict_volume(tiny_model_3d, tmp_path / "scan.zarr", tmp_path / "ref.zarr", **options)

    server = _Server(tmp_path)
    url = f"http://127.0.0.1:{server.port}/scan.zarr"
    out = tmp_path / "out.zarr"
    killed = threading.Event()

    def on_progress(ev) -> None:
        if ev.chunks_done >= 2 and not killed.is_set():
            killed.set()
            server.kill()  # the server dies: every later read is refused

    start = time.monotonic()
    with pytest.raises(ScrollsegError) as err:
        predict_volume(tiny_model_3d, url, out, progress=on_progress, **options)
    assert time.monotonic() - start < 120
    message = str(err.value)
    assert killed.is_set()
    assert message.startswith(f"cannot read {url}/0/"), message
    assert "then run again" in message
    assert "\n" not in message

    server = _Server(tmp_path, port=server.port)  # back on the same address
    try:
        events: list = []
        predict_volume(tiny_model_3d, url, out, progress=events.append, **options)
    finally:
        server.kill()
    assert events[-1].chunks_resumed >= 2
    assert events[-1].chunks_computed < events[-1].chunks_total
    for got, want in zip(_read(out), _read(ref), strict=True):
        np.testing.assert_array_equal(got, want)
