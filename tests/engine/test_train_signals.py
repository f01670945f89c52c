"""Process hygiene of `scrollseg train` (issue 13, item 9): SIGTERM ends its worker too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.test_train import TINY

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _tiny_dataset(root: Path) -> Path:
    from napari_scrollseg.engine.dataset import export_dataset
    from napari_scrollseg.engine.demo import sparse_slices
    from napari_scrollseg.engine.phantom import make_phantom

    cases = []
    for seed in range(2):
        image, truth = make_phantom((16, 48, 48), seed=seed)
        cases.append((image, sparse_slices(truth, n_slices=3)))
    return export_dataset(
        cases, out_dir=root / "raw", dataset_id=902, name="Sig", classes=["air", "papyrus", "ink"]
    )


@pytest.mark.slow
def _train_workers(parent):
    """The training worker among ``parent``'s children; a child that ends (or is a zombie)
    between the listing and the look at its command line is not one."""
    import psutil

    found = []
    for child in parent.children():
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "train" in cmd and "_train_worker" in " ".join(cmd):
            found.append(child)
    return found


def test_sigterm_to_train_stops_its_worker(tmp_path: Path) -> None:
    import psutil

    raw = _tiny_dataset(tmp_path)
    argv = [sys.executable, "-m", "napari_scrollseg.cli", "train", str(raw)]
    argv += ["--out", str(tmp_path / "results"), "--device", "cpu", "-np", "1", "--fold", "all"]
    argv += ["--epochs", "500", "--iterations", "2", "--da-processes", "0"]
    argv += ["--plans-overrides", json.dumps(TINY)]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "PYTHONPATH": SRC},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        workers: list = []
        while time.monotonic() < deadline and proc.poll() is None:  # wait for the training
            workers = _train_workers(psutil.Process(proc.pid))
            if workers:
                break
            time.sleep(0.2)
        assert workers, "the training worker never started"
        time.sleep(3)  # let it get into the training loop or its set-up
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: terminated"
    for w in workers:
        with pytest.raises(psutil.NoSuchProcess):
            psutil.Process(w.pid).status()  # gone, not orphaned
