"""Whole-volume prediction: equals nnU-Net, no wasted tiles, resumable, distributed, masked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.engine.conftest import FP16_MIN_NORMAL, blocky_volume, equivalence, nnunet_references

SHAPE = (23, 45, 37)  # odd: not a multiple of the patch (16, 32, 32) nor of the chunk
CHUNK = (12, 20, 24)  # 2 x 3 x 2 chunks
FOLDS = "1"  # one fold keeps the runs short (fold ensembles: test_predict_region)


def _read(out: Path) -> tuple[np.ndarray, np.ndarray]:
    import zarr

    probs = zarr.open_array(str(out / "0"), mode="r")[:]
    labels = zarr.open_array(str(out / "labels" / "prediction" / "0"), mode="r")[:]
    # stored as the annotation's class ids 1..K (unwritten chunks: 0); nnU-Net's are k-1
    return probs, labels - 1


def _compare_with_nnunet(
    model: Path, image: np.ndarray, volume: Path, out: Path, *, folds: tuple = (1,)
) -> dict:
    """Our uint8 output against nnUNetPredictor: with float32 sums everywhere
    (``*_float32``), stock (float16 sums) on the measures of ``equivalence``."""
    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.tiling import weight_map, weight_sum
    from napari_scrollseg.engine.volumes import open_volume

    probs, labels = _read(out)
    ref = nnunet_references(model, image, folds=folds)
    ref_labels, ref_probs = ref["labels"], ref["probs"]
    grid = load_model(model, device="cpu").grid(open_volume(volume))
    weights = weight_sum(grid, tuple(slice(0, s) for s in image.shape), weight_map(grid.patch))
    stats = equivalence(probs / 255.0, labels, ref_probs, ref_labels, weights)
    sound = (weights >= FP16_MIN_NORMAL) | (weights == 0)
    counts = np.abs(probs.astype(int) - np.rint(ref_probs * 255).astype(int)).max(axis=0)
    stats["max_count_diff_sound"] = int(counts[sound].max())
    exact = np.abs(probs.astype(int) - np.rint(ref["probs32"] * 255).astype(int))
    stats["max_count_diff_float32"] = int(exact.max())
    stats["label_agree_float32"] = float((labels == ref["labels32"]).mean())
    return stats


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, tiny_model_3d: Path) -> dict:
    """A volume with a zero border on disk and its uninterrupted, threaded prediction."""
    from napari_scrollseg.engine.omezarr import write_image
    from napari_scrollseg.engine.predict import Predictor
    from napari_scrollseg.engine.predict_volume import predict_volume

    root = tmp_path_factory.mktemp("predict_volume")
    image = blocky_volume(SHAPE, seed=5, zero_border=2)
    write_image(root / "vol.zarr", image, spacing=(1.0, 1.0, 1.0), chunks=(16, 16, 16))
    events: list = []
    session = Predictor(tiny_model_3d, folds=FOLDS, device="cpu")  # a warm session
    out = predict_volume(
        session, root / "vol.zarr", root / "ref.zarr", chunk=CHUNK, progress=events.append
    )
    probs, labels = _read(out)
    return {
        "root": root,
        "image": image,
        "volume": root / "vol.zarr",
        "model": tiny_model_3d,
        "ref": out,
        "probs": probs,
        "labels": labels,
        "events": events,
        "forward": session.forward_passes,
        "stats": session.stats.as_dict(),
    }


def _levels(out: Path) -> list[np.ndarray]:
    """Every pyramid level of the probabilities and of the labels, as stored."""
    import zarr

    found = []
    for image in (out, out / "labels" / "prediction"):
        group = zarr.open_group(str(image), mode="r")
        paths = [d["path"] for d in group.attrs["multiscales"][0]["datasets"]]
        found += [group[p][:] for p in paths]
    return found


def _assert_same_as(case: dict, out: Path) -> None:
    """The same level 0 as the reference run, and the same coarser levels."""
    probs, labels = _read(out)
    np.testing.assert_array_equal(labels, case["labels"])
    np.testing.assert_array_equal(probs, case["probs"])
    ours, ref = _levels(out), _levels(case["ref"])
    assert len(ours) == len(ref)
    for level, (a, b) in enumerate(zip(ours, ref)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {level}")


def _assert_close_to(case: dict, out: Path, box: tuple[slice, ...] = ()) -> None:
    """Equal to the reference run up to float32 summation order (tiles grouped otherwise)."""
    probs, labels = _read(out)
    assert (labels == case["labels"][box]).mean() >= 0.9999
    assert np.abs(probs.astype(int) - case["probs"][(slice(None), *box)]).max() <= 1


def _predict(case: dict, out: Path, *, iterate: bool = False, **kw: object) -> object:
    """``predict_volume`` (or ``iter_predict_volume``) of the case's model and volume with
    the reference run's chunks, fold and device unless ``kw`` says otherwise."""
    from napari_scrollseg.engine.predict_volume import iter_predict_volume, predict_volume

    options = {"chunk": CHUNK, "folds": FOLDS, "device": "cpu", **kw}
    run = iter_predict_volume if iterate else predict_volume
    return run(case["model"], case["volume"], out, **options)


def test_chunked_equals_nnunet_and_runs_each_tile_once(case: dict) -> None:
    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.volumes import open_volume

    probs, labels = case["probs"], case["labels"]
    assert probs.shape == (3, *SHAPE)
    assert labels.shape == SHAPE
    assert len(np.unique(labels)) >= 2  # a non-trivial answer
    stats = _compare_with_nnunet(case["model"], case["image"], case["volume"], case["ref"])
    print("3D chunked vs nnUNetPredictor:", stats)
    assert stats["label_agree_float32"] >= 0.9999
    assert stats["max_count_diff_float32"] <= 1
    assert stats["label_agree_decided"] >= 0.9999
    assert stats["label_agree_all"] >= 0.999
    assert stats["max_count_diff_sound"] <= 1
    assert stats["frac_sound"] >= 0.9
    # no wasted work: every tile of nnU-Net's grid ran exactly once
    n_tiles = load_model(case["model"], device="cpu").grid(open_volume(case["volume"])).n_tiles
    last = case["events"][-1]
    assert last.stage == "done"
    assert last.chunks_done == last.chunks_total == 2 * 3 * 2
    assert case["forward"] == last.tiles_computed == n_tiles
    # the partial sums are gone, the output is marked complete
    assert not (case["ref"] / ".scrollseg" / "partial").exists()


def test_region_equals_full_volume(case: dict) -> None:
    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.predict import predict_region
    from napari_scrollseg.engine.volumes import open_volume

    model = load_model(case["model"], folds=(1,), device="cpu")
    box = (slice(5, 26), slice(15, 45), slice(0, 30))  # straddles chunk borders, one face
    probs, labels = predict_region(model, open_volume(case["volume"]), box)
    np.testing.assert_array_equal(labels, case["labels"][box])
    diff = np.abs(np.rint(probs * 255).astype(int) - case["probs"][(slice(None), *box)]).max()
    assert diff <= 1


def test_2d_model_chunked_equals_nnunet(tmp_path: Path, tiny_model_2d: Path) -> None:
    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.omezarr import write_image
    from napari_scrollseg.engine.predict_volume import predict_volume
    from napari_scrollseg.engine.volumes import open_volume

    image = blocky_volume((7, 45, 37), seed=7)
    write_image(tmp_path / "vol.zarr", image, spacing=(1.0, 1.0, 1.0), chunks=(4, 32, 32))
    events: list = []
    out = predict_volume(
        tiny_model_2d,
        tmp_path / "vol.zarr",
        tmp_path / "out.zarr",
        chunk=(3, 20, 16),
        folds=FOLDS,
        device="cpu",
        progress=events.append,
    )
    _, labels = _read(out)
    stats = _compare_with_nnunet(tiny_model_2d, image, tmp_path / "vol.zarr", out)
    print("2D chunked vs nnUNetPredictor:", stats)
    assert len(np.unique(labels)) > 1
    assert stats["label_agree_float32"] >= 0.9999
    assert stats["max_count_diff_float32"] <= 1
    assert stats["label_agree_decided"] >= 0.9999
    assert stats["label_agree_all"] >= 0.999
    assert stats["max_count_diff_sound"] <= 1
    assert stats["frac_sound"] >= 0.9
    grid = load_model(tiny_model_2d, device="cpu").grid(open_volume(tmp_path / "vol.zarr"))
    assert grid.patch[0] == 1
    assert len(grid.starts[0]) == 7
    assert events[-1].tiles_computed == grid.n_tiles


def _done(out: Path) -> list[Path]:
    folder = out / ".scrollseg" / "done"
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


def test_kill_9_then_rerun_resumes_to_identical_output(case: dict, tmp_path: Path) -> None:
    from napari_scrollseg import cli

    out = tmp_path / "killed.zarr"
    argv = [
        "predict",
        str(case["model"]),
        str(case["volume"]),
        str(out),
        "--device",
        "cpu",
        "--folds",
        FOLDS,
    ]
    argv += ["--chunk", ",".join(map(str, CHUNK)), "--batch-size", "1", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_scrollseg.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    total = 2 * 3 * 2
    try:
        deadline = time.monotonic() + 120
        while len(_done(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = _done(out)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= len(done) < total, "the run finished before it could be killed"
    # whatever is marked done is completely written
    probs, labels = _read(out)
    for marker in done:
        i, j, k = (int(v) for v in marker.name.split("_"))
        box = tuple(slice(n * c, (n + 1) * c) for n, c in zip((i, j, k), CHUNK, strict=True))
        np.testing.assert_array_equal(labels[box], case["labels"][box])
        np.testing.assert_array_equal(
            probs[(slice(None), *box)], case["probs"][(slice(None), *box)]
        )

    events: list = []
    _predict(case, out, progress=events.append)
    last = events[-1]
    assert last.chunks_resumed == len(done)
    assert last.chunks_computed == total - len(done) < total
    # partial sums lived in the killed process's memory: the rerun recomputes the blocks
    # that the unfinished chunks read, never more than the whole run
    assert last.tiles_computed <= case["events"][-1].tiles_computed
    _assert_same_as(case, out)
    # and the CLI, rerun on the finished output, has nothing left to do
    assert cli.main(argv) == 0
    _assert_same_as(case, out)


_SLOW_CLI = """
import sys, time
from pathlib import Path
from napari_scrollseg import cli
from napari_scrollseg.engine.predict.session import Predictor

beats, run = Path(sys.argv[1]), Predictor._forward_counted

def slow(self, batch, options):  # a slow device: one second per batch
    with beats.open("a") as f:
        f.write("x")
    time.sleep(1.0)
    return run(self, batch, options)

Predictor._forward_counted = slow
sys.exit(cli.main(sys.argv[2:]))
"""


def test_sigterm_stops_between_tile_batches_then_rerun_is_identical(
    case: dict, tmp_path: Path
) -> None:
    """SIGTERM to ``scrollseg predict`` inside a block of one-second batches stops after
    the running batch (not the block), leaves no lock, and a rerun gives the same output
    (the time it took is printed: wall time is not asserted on a shared machine)."""
    from napari_scrollseg import cli

    out, beats = tmp_path / "terminated.zarr", tmp_path / "beats"
    argv = ["predict", str(case["model"]), str(case["volume"]), str(out), "--device", "cpu"]
    argv += ["--folds", FOLDS, "--chunk", ",".join(map(str, CHUNK))]
    argv += ["--batch-size", "1", "--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, str(beats), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if beats.exists() and len(beats.read_text()) >= 2:  # inside the first block
                break
            time.sleep(0.01)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        stopped = time.monotonic() - sent
    finally:
        proc.kill()
    ran = len(beats.read_text())
    # the old code ran on to the end of the block and the one queued after it: 36 batches
    print(f"SIGTERM: stopped after {stopped:.2f} s, {ran} batches ran")
    assert ran <= 3, f"{ran} batches ran: the block went on after SIGTERM"
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "error: terminated" in err
    assert not (out / ".scrollseg" / "lock").exists()  # --overwrite or a rerun may start
    assert cli.main(argv) == 0  # the rerun, at full speed
    _assert_same_as(case, out)


def test_partial_sums_stay_in_memory_and_spill_past_the_budget(
    case: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_scrollseg.engine.predict import Predictor, partials
    from napari_scrollseg.engine.predict_volume import predict_volume

    ref = case["stats"]  # the reference run: everything within the budget, no disk
    assert ref["partial_bytes_written"] == ref["partial_bytes_read"] == 0
    assert 0 < ref["partial_peak_memory"] <= ref["partial_budget"]

    # room for half a block's sum: what fits stays in memory, the rest goes to disk
    monkeypatch.setattr(partials, "BUDGET_BLOCKS", 0.5)
    session = Predictor(case["model"], folds=FOLDS, device="cpu", cache=None)
    out = tmp_path / "spilled.zarr"
    predict_volume(session, case["volume"], out, chunk=CHUNK)
    stats = session.stats.as_dict()
    assert stats["partial_budget"] < ref["partial_peak_memory"]
    assert stats["partial_peak_memory"] <= stats["partial_budget"]
    assert stats["partial_bytes_written"] > 0
    assert stats["partial_bytes_read"] > 0
    assert not (out / ".scrollseg" / "partial").exists()  # spilled files removed at the end
    _assert_same_as(case, out)


def test_close_generator_cancels_then_resume(case: dict, tmp_path: Path) -> None:
    out = tmp_path / "cancelled.zarr"
    gen = _predict(case, out, iterate=True)
    for ev in gen:
        if ev.chunks_done >= 2:
            break
    gen.close()  # returns once the tasks already running have finished
    n_done = len(_done(out))
    time.sleep(0.3)
    assert len(_done(out)) == n_done  # nothing runs on after the close
    assert not (out / ".scrollseg" / "lock").exists()
    assert 2 <= n_done < ev.chunks_total
    events = list(_predict(case, out, iterate=True))
    assert events[-1].chunks_resumed == n_done
    _assert_same_as(case, out)


def test_prepare_output_then_run_fills_it_identically(case: dict, tmp_path: Path) -> None:
    """The output exists before the run (empty; a viewer opens it first), a
    second prepare leaves it, and the run fills that store with the reference answer."""
    import zarr

    from napari_scrollseg.engine.predict import prepare_output

    out = tmp_path / "prepared.zarr"
    options = {"chunk": CHUNK, "folds": FOLDS, "device": "cpu"}
    assert prepare_output(case["model"], case["volume"], out, **options) == out
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].nchunks_initialized == 0  # nothing written yet
    assert group["labels/prediction/0"].shape == SHAPE
    assert group.attrs["scrollseg"]["complete"] is False
    assert not _done(out)
    (out / "0" / ".keep-me").write_text("")  # a second prepare does not recreate it
    prepare_output(case["model"], case["volume"], out, **options)
    assert (out / "0" / ".keep-me").exists()
    events = list(_predict(case, out, iterate=True))
    assert events[-1].stage == "done"
    assert events[-1].chunks_resumed == 0
    _assert_same_as(case, out)


def test_local_cluster_two_processes_identical(case: dict, tmp_path: Path) -> None:
    from napari_scrollseg.engine.predict_volume import open_client

    out = tmp_path / "distributed.zarr"
    with open_client(cluster="local", workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        events: list = []
        _predict(case, out, client=client, progress=events.append)
        pids = set(client.run(os.getpid).values())
        # the same cluster through its address, as --scheduler tcp://HOST:PORT does
        with open_client(scheduler=client.scheduler.address) as remote:
            roi = ((0, 12), (20, 40), (0, 24))  # whole chunks of the reference
            part = _predict(case, tmp_path / "roi.zarr", client=remote, roi=roi, bar=False)
    # blocks of a roi group tiles differently
    _assert_close_to(case, part, tuple(slice(a, b) for a, b in roi))
    assert os.getpid() not in pids
    assert len(pids) == 2
    assert events[-1].tiles_computed == case["events"][-1].tiles_computed
    _assert_same_as(case, out)


def test_mask_skips_tiles_and_leaves_background(case: dict, tmp_path: Path) -> None:
    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.omezarr import write_image
    from napari_scrollseg.engine.volumes import open_volume

    grid = load_model(case["model"], device="cpu").grid(open_volume(case["volume"]))
    z_starts = sorted({t[0] for t in grid.tiles()})
    per_row = grid.n_tiles // len(z_starts)
    # a half-resolution mask, nonzero only before the second row of tiles: every row but
    # the first sees only zeros and is skipped
    mshape = tuple(-(-s // 2) for s in SHAPE)
    k = z_starts[1] * mshape[0] // SHAPE[0]
    edge = -(-k * SHAPE[0] // mshape[0])  # first voxel z mapped to a zero mask slice
    assert z_starts[0] < edge <= z_starts[1]
    mask = np.zeros(mshape, np.uint8)
    mask[:k] = 1
    write_image(tmp_path / "mask.zarr", mask, spacing=(2.0, 2.0, 2.0), chunks=(8, 8, 8))
    events: list = []
    out = _predict(
        case, tmp_path / "masked.zarr", mask=tmp_path / "mask.zarr", progress=events.append
    )
    last = events[-1]
    print(f"mask: {last.tiles_skipped} of {grid.n_tiles} tiles skipped")
    assert last.tiles_computed == per_row
    assert last.tiles_skipped == grid.n_tiles - per_row
    probs, labels = _read(out)
    # masked voxels are background
    assert (labels[edge:] == 0).all()
    assert (probs[0, edge:] == 255).all()
    assert (probs[1:, edge:] == 0).all()
    # where only unskipped tiles reach, the answer is the unmasked one
    np.testing.assert_array_equal(labels[:edge], case["labels"][:edge])
    assert np.abs(probs[:, :edge].astype(int) - case["probs"][:, :edge]).max() <= 1


def test_output_opens_with_ome_zarr_and_open_volume(case: dict) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from napari_scrollseg.engine.volumes import open_volume

    nodes = list(Reader(parse_url(str(case["ref"])))())
    shapes = {n.metadata.get("name"): n.data[0].shape for n in nodes if n.data}
    assert shapes == {"probabilities": (3, *SHAPE), "prediction": SHAPE}
    vol = open_volume(case["ref"])
    assert vol.axes == "czyx"
    assert vol.shape == (3, *SHAPE)
    assert len(vol.levels) >= 1
    assert tuple(vol.spacing) == (1.0, 1.0, 1.0)
    assert "prediction" in vol.labels
    np.testing.assert_array_equal(np.asarray(vol.labels["prediction"][0]), case["labels"] + 1)
    info = vol.attrs["scrollseg"]
    assert info["complete"] is True
    assert info["tta"] == "mirror"
    assert info["step"] == 0.5
    assert len(info["model_sha256"]) == 64
    assert info["folds"] == ["1"]


def test_superchunks_rerun_border_tiles_for_the_same_answer(case: dict, tmp_path: Path) -> None:

    events: list = []
    out = _predict(case, tmp_path / "super.zarr", superchunk=1, progress=events.append)
    last, ref = events[-1], case["events"][-1]
    assert ref.tiles_total == ref.grid_tiles == ref.tiles_computed  # whole volume: once each
    assert last.grid_tiles == ref.grid_tiles
    assert last.tiles_computed == last.tiles_total > last.grid_tiles  # border tiles rerun
    _assert_close_to(case, out)


def test_zscore_model_uses_whole_volume_statistics_in_every_chunk(
    tmp_path: Path, tiny_model_3d_zscore: Path
) -> None:
    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.omezarr import write_image
    from napari_scrollseg.engine.predict import predict_region
    from napari_scrollseg.engine.predict_volume import predict_volume
    from napari_scrollseg.engine.volumes import open_volume

    image = blocky_volume((13, 37, 29), seed=9)
    image[:, :, :10] //= 4  # chunks with very different statistics from the whole
    write_image(tmp_path / "vol.zarr", image, spacing=(1.0, 1.0, 1.0), chunks=(8, 16, 16))
    out = predict_volume(
        tiny_model_3d_zscore,
        tmp_path / "vol.zarr",
        tmp_path / "out.zarr",
        chunk=(5, 12, 10),
        folds=FOLDS,
        mirror=False,
        device="cpu",
        bar=False,
    )
    probs, labels = _read(out)
    model = load_model(tiny_model_3d_zscore, folds=(1,), device="cpu")
    box = tuple(slice(0, s) for s in image.shape)
    ref_probs, ref_labels = predict_region(
        model, open_volume(tmp_path / "vol.zarr"), box, mirror=False
    )
    assert len(np.unique(ref_labels)) > 1
    np.testing.assert_array_equal(labels, ref_labels)
    assert np.abs(probs.astype(int) - np.rint(ref_probs * 255)).max() <= 1


@pytest.mark.gpu
def test_cuda_run_matches_the_cpu_run(case: dict, tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    events: list = []
    out = _predict(case, tmp_path / "cuda.zarr", device="cuda", half=False, progress=events.append)
    assert events[-1].tiles_computed == case["events"][-1].tiles_computed
    _assert_close_to(case, out)


_SBATCH = """#!/bin/bash
# stand-in for SLURM's sbatch: runs the job script on this machine, in its own session
id=$(( $(ls "$FAKE_SLURM" | wc -l) + 1000 ))
cp "${@: -1}" "$FAKE_SLURM/$id.sh"
setsid bash "$FAKE_SLURM/$id.sh" > "$FAKE_SLURM/$id.log" 2>&1 &
echo $! > "$FAKE_SLURM/$id.pid"
echo "Submitted batch job $id"
"""
_SCANCEL = """#!/bin/bash
for id in "$@"; do kill -- -"$(cat "$FAKE_SLURM/$id.pid")" 2>/dev/null; done
exit 0
"""


def test_slurm_cluster_runs_the_job_script_and_gives_the_same_answer(
    case: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--cluster slurm`` end to end: dask-jobqueue writes and submits the job script,
    whose dask worker joins and predicts. Only the batch system is a stand-in: ``sbatch``
    runs the script here (no SLURM on a test machine)."""
    from napari_scrollseg.engine.predict_volume import open_client

    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    for name, text in (("sbatch", _SBATCH), ("scancel", _SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(jobs))
    out = tmp_path / "slurm.zarr"
    with open_client(
        cluster="slurm",
        workers=1,
        queue="gpu",
        account="scrolls",
        walltime="01:30:00",
        job_cores=1,
        job_memory="4GB",
        job_extra=["--gres=gpu:1"],
    ) as client:
        client.wait_for_workers(1, timeout=120)
        _predict(case, out, client=client, bar=False)
        pids = set(client.run(os.getpid).values())
    script = (jobs / "1000.sh").read_text()
    for line in ("#SBATCH -p gpu", "#SBATCH -A scrolls", "#SBATCH -t 01:30:00", "--gres=gpu:1"):
        assert line in script, script
    assert "distributed.cli.dask_worker" in script
    assert os.getpid() not in pids
    _assert_same_as(case, out)
    deadline = time.monotonic() + 30  # closing the cluster scancels the job
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_coarser_levels_equal_a_pass_over_level_0_after_a_stop_and_resume(
    tiny_model_3d: Path, tmp_path: Path
) -> None:
    """The levels built while the chunks land (stopped after a few, then resumed) are
    those :func:`write_pyramid` derives from the finished level 0."""
    import shutil

    from napari_scrollseg.engine.omezarr import write_image, write_pyramid
    from napari_scrollseg.engine.predict_volume import iter_predict_volume

    image = blocky_volume((64, 72, 70), seed=2)  # two levels, edge chunks on both
    write_image(tmp_path / "vol.zarr", image, spacing=(1.0, 1.0, 1.0), chunks=(32, 32, 32))
    out = tmp_path / "out.zarr"
    options = {"chunk": (16, 32, 32), "folds": FOLDS, "device": "cpu", "num_workers": 2}
    gen = iter_predict_volume(tiny_model_3d, tmp_path / "vol.zarr", out, **options)
    for ev in gen:
        if ev.chunks_done >= 4:
            break
    gen.close()
    assert 4 <= len(_done(out)) < ev.chunks_total
    events = list(iter_predict_volume(tiny_model_3d, tmp_path / "vol.zarr", out, **options))
    assert events[-1].stage == "done"
    assert events[-1].chunks_resumed >= 4
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)
    write_pyramid(copy, reduction="mean", threads=1)
    write_pyramid(copy / "labels" / "prediction", reduction="mode", threads=1)
    ours, full = _levels(out), _levels(copy)
    assert len(ours) == 4  # probabilities and labels, two levels each
    for level, (a, b) in enumerate(zip(ours, full)):
        np.testing.assert_array_equal(a, b, err_msg=f"level {level}")
