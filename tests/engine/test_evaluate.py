"""`evaluate`: per-class scores, skipped voxels, streaming, the command line."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.engine.evaluate import evaluate, format_table


def test_scores_and_confusion_by_hand():
    truth = np.array([1, 1, 1, 2, 2, 3, 0, 255, 3], np.uint8).reshape(1, 1, 9)
    pred = np.array([1, 1, 2, 2, 2, 2, 3, 3, 0], np.uint8).reshape(1, 1, 9)
    r = evaluate(pred, truth, classes={1: "air", 2: "papyrus", 3: "ink"})
    assert r["classes"] == ["air", "papyrus", "ink"]
    # rows truth air/papyrus/ink, columns predicted air/papyrus/ink/other
    assert r["confusion"]["matrix"] == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 1]]
    assert r["skipped"] == {"unlabeled": 1, "ignore": 1}  # truth 0 and 255 are not scored
    assert r["voxels"] == 7
    pap = r["per_class"]["papyrus"]
    assert (pap["tp"], pap["fp"], pap["fn"]) == (2, 2, 0)
    assert pap["dice"] == pytest.approx(4 / 6)
    assert pap["precision"] == pytest.approx(0.5)
    assert pap["recall"] == pytest.approx(1.0)
    assert pap["f0.5"] == pytest.approx(1.25 * 0.5 * 1 / (0.25 * 0.5 + 1))
    air = r["per_class"]["air"]
    assert air["dice"] == pytest.approx(4 / 5)
    assert r["per_class"]["ink"]["dice"] == 0.0
    table = format_table(r)
    assert "papyrus" in table
    assert "0.667" in table
    assert "other" in table


def test_roi_and_shape_mismatch():
    truth = np.ones((4, 4, 4), np.uint8)
    pred = np.ones((4, 4, 4), np.uint8)
    pred[:2] = 2
    r = evaluate(pred, truth, roi="2:4,:,:")
    assert r["voxels"] == 32
    assert r["per_class"]["class 1"]["dice"] == 1.0
    with pytest.raises(ScrollsegError, match="differs from truth shape"):
        evaluate(pred[:3], truth)


class _CountingArray:
    """An array-like that counts and sizes the reads dask makes of it."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.reads, self.max_read = 0, 0
        self._lock = threading.Lock()

    def __getitem__(self, key):
        out = self._data[key]
        with self._lock:
            self.reads += out.size > 0  # dask also reads an empty slice for its meta
            self.max_read = max(self.max_read, out.size)
        return out


def test_streams_block_by_block():
    """Each chunk is read once and no read is larger than one chunk: the volume streams."""
    import dask.array as da

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (64, 64, 64), dtype=np.uint8)
    pred = np.where(rng.random(truth.shape) < 0.9, truth, 1).astype(np.uint8)
    src_t, src_p = _CountingArray(truth), _CountingArray(pred)
    chunk = (16, 32, 32)
    r = evaluate(
        da.from_array(src_p, chunks=chunk), da.from_array(src_t, chunks=chunk), num_workers=2
    )
    n_chunks = 4 * 2 * 2
    assert src_t.reads == src_p.reads == n_chunks
    assert src_t.max_read == src_p.max_read == 16 * 32 * 32  # 1/16 of the volume per read
    valid = truth != 0
    for k in (1, 2, 3):
        tp = np.sum((truth == k) & (pred == k) & valid)
        fp = np.sum((truth != k) & (pred == k) & valid)
        fn = np.sum((truth == k) & (pred != k) & valid)
        assert r["per_class"][f"class {k}"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


@pytest.mark.slow
def test_cli_evaluate_on_a_prediction(tmp_path, capsys):
    """`scrollseg predict` with the built-in model, then `scrollseg evaluate` by class name."""
    from napari_scrollseg.cli import main
    from napari_scrollseg.engine.phantom import write_phantom

    ph = write_phantom(tmp_path / "ph.zarr", (16, 64, 64), seed=3)
    out = tmp_path / "pred.zarr"
    assert main(["predict", "phantom-tiny", str(ph), str(out), "--no-mirror", "--chunk", "32"]) == 0
    capsys.readouterr()
    js = tmp_path / "scores.json"
    rc = main(["evaluate", str(out), str(ph / "labels" / "truth"), "--json", str(js)])
    text = capsys.readouterr().out
    assert rc == 0
    result = json.loads(js.read_text())
    assert result["classes"] == ["air", "papyrus", "ink"]
    assert result["per_class"]["air"]["dice"] > 0.9
    assert result["per_class"]["papyrus"]["dice"] > 0.5
    assert result["voxels"] == 16 * 64 * 64
    assert "papyrus" in text
    assert "confusion" in text
    assert main(["evaluate", str(out), str(ph / "labels" / "truth"), "--roi", "0:8"]) == 2
    assert "error: --roi" in capsys.readouterr().err
