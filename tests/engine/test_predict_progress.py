"""Progress of whole-volume runs and ``scrollseg evaluate``: it moves once per batch of
tiles (not once per chunk), with tiles/s; off a terminal, plain lines at an interval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_scrollseg import cli
from tests.engine.conftest import blocky_volume

SHAPE = (16, 64, 64)  # one 128^3 chunk, 3 x 7 x 7 tiles of (8, 16, 16) at step 0.5


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model_3d: Path) -> dict:
    import time

    from napari_scrollseg.engine.omezarr import write_image
    from napari_scrollseg.engine.predict import Predictor
    from napari_scrollseg.engine.predict_volume import iter_predict_volume
    from napari_scrollseg.engine.progress import drive

    root = tmp_path_factory.mktemp("progress")
    volume = root / "vol.zarr"
    write_image(volume, blocky_volume(SHAPE, seed=4), spacing=(1.0, 1.0, 1.0), chunks=(16, 64, 64))
    events: list = []
    gen = iter_predict_volume(
        tiny_model_3d,
        volume,
        root / "pred.zarr",
        device="cpu",
        folds=(1,),
        mirror=False,
        chunk=128,
        batch_size=1,
    )
    real = Predictor._forward_counted

    def slow(self, batch, options):  # a slow device: progress beats are time-based (BEAT_S),
        time.sleep(0.03)  # so on a fast machine the chunk could end between two of them
        return real(self, batch, options)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Predictor, "_forward_counted", slow)
        out = drive(gen, events.append)
    return {"events": events, "out": out, "volume": volume}


def test_progress_moves_within_a_chunk_with_tiles_per_second(run: dict) -> None:
    events = [e for e in run["events"] if e.stage == "predict"]
    last = run["events"][-1]
    assert last.stage == "done"
    assert last.chunks_total == 1
    assert last.tiles_done == last.tiles_total == last.tiles_computed == 3 * 7 * 7
    # the one chunk's 147 tiles (batches of 1) are reported while they run, not at the end
    inside = [e for e in events if e.chunks_done == 0 and 0 < e.tiles_done < e.tiles_total]
    assert len(inside) >= 3, [(e.chunks_done, e.tiles_done) for e in events]
    done = [e.tiles_done for e in run["events"]]
    assert done == sorted(done)  # never goes back
    assert all(e.tiles_computed <= e.tiles_total for e in events)
    assert all(e.tiles_per_s > 0 for e in inside)


def test_plain_lines_off_a_terminal_at_an_interval(run: dict, capsys, monkeypatch) -> None:
    clock = iter(np.arange(0.0, 1000.0, 1.0))  # one second between events
    lines = cli._LineProgress(every=5.0)
    monkeypatch.setattr(lines, "_clock", lambda: next(clock))
    prepare = [e for e in run["events"] if e.stage == "prepare"]
    predict = [e for e in run["events"] if e.stage == "predict"]
    for ev in [*prepare * 10, *predict, run["events"][-1]]:  # many preparing beats
        lines(ev)
    out = capsys.readouterr().out
    assert "\r" not in out
    printed = out.splitlines()
    # the first event, one line per 5 events (5 s), the chunks' end and the final one
    n = 10 * len(prepare) + len(predict)
    assert 3 <= len(printed) <= 3 + n // 5
    assert printed[0].startswith("predict prepare: 0/0 chunks")
    assert printed[-1].startswith("predict done: 1/1 chunks, 147/147 tiles")
    assert all("tiles/s" in line for line in printed)


def test_evaluate_reports_progress_per_block(run: dict, capsys) -> None:
    import dask.array as da
    import zarr

    from napari_scrollseg.engine.evaluate import evaluate

    truth = zarr.open_array(str(run["out"] / "labels/prediction/0"))[:]
    calls: list = []
    result = evaluate(
        da.from_array(truth, chunks=(8, 32, 32)),
        da.from_array(truth, chunks=(8, 32, 32)),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result["mean_dice"] == 1.0
    assert calls == [(i, 8) for i in range(1, 9)]
    # the CLI off a terminal: the first and the last block as plain lines
    assert cli.main(["evaluate", str(run["out"]), str(run["out"] / "labels/prediction")]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out
    assert "evaluate: 1/1 blocks" in out.splitlines()[0]
    assert "mean Dice" in out
