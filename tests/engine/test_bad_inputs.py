"""Bad inputs over every command and the engine API: one clear error, nothing half-done.

Each case builds its bad input in ``tmp_path`` and says what the one-line message must
match and which paths must not exist afterwards. CLI cases run ``scrollseg`` in
process (exit 2, one ``error:`` line on stderr; argparse's own usage errors exit 2 with
``error:`` on their last line); API cases expect a :class:`ScrollsegError`. Servers on
127.0.0.1 stall, lie or die; every case runs under a watchdog, so a hang fails.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from napari_scrollseg.cli import main
from napari_scrollseg.engine.errors import ScrollsegError

WATCHDOG_S = 120
UNWRITABLE = Path("/proc/scrollseg-test")  # not writable, even for root


@dataclass
class Bad:
    """What a case runs and what it must leave."""

    match: str
    argv: list[str] | None = None
    call: Callable[[], Any] | None = None
    absent: list[Path] = field(default_factory=list)
    present: list[Path] = field(default_factory=list)  # left as they were
    usage: bool = False  # an argparse usage error


CASES: dict[str, Callable[[Path, dict], Bad]] = {}


def case(name: str):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


# -- shared inputs ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ctx(tmp_path_factory: pytest.TempPathFactory, tiny_model_3d: Path) -> dict:
    """A good small volume, labels, a raw dataset and the tiny model: each case breaks one."""
    from napari_scrollseg.engine.dataset import export_dataset
    from tests.engine.conftest import blocky_volume

    root = tmp_path_factory.mktemp("bad-inputs")
    image = blocky_volume((16, 40, 40), seed=3)
    tifffile.imwrite(root / "vol.tif", image)
    labels = np.zeros(image.shape, np.uint8)
    labels[8, 10:30, 10:30] = 2
    labels[8, 0:5, 0:5] = 1
    tifffile.imwrite(root / "lab.tif", labels)
    raw = export_dataset(
        [(root / "vol.tif", root / "lab.tif")],
        out_dir=root / "raw",
        dataset_id=5,
        name="Good",
        classes=["air", "papyrus"],
    )
    return {
        "root": root,
        "vol": root / "vol.tif",
        "lab": root / "lab.tif",
        "image": image,
        "raw": raw,
        "model": tiny_model_3d,
    }


def _zarr_v2(path: Path, zarray: Any = None, zattrs: Any = None, group: bool = False) -> Path:
    """A hand-written zarr v2 array or group (metadata as given, text or JSON)."""
    path.mkdir(parents=True)
    if group:
        (path / ".zgroup").write_text('{"zarr_format": 2}')
    if zarray is not None:
        (path / ".zarray").write_text(zarray if isinstance(zarray, str) else json.dumps(zarray))
    if zattrs is not None:
        (path / ".zattrs").write_text(zattrs if isinstance(zattrs, str) else json.dumps(zattrs))
    return path


ZARRAY = {
    "zarr_format": 2,
    "shape": [8, 16, 16],
    "chunks": [8, 16, 16],
    "dtype": "|u1",
    "compressor": None,
    "fill_value": 0,
    "filters": None,
    "order": "C",
}


def _array(**changes: Any) -> dict:
    return {**ZARRAY, **changes}


def _ome(path: Path, multiscales: Any, *, level: dict | None = None) -> Path:
    """An OME-Zarr group with one level "0" and the given multiscales metadata."""
    _zarr_v2(path, zattrs={"multiscales": multiscales}, group=True)
    _zarr_v2(path / "0", zarray=level or ZARRAY)
    return path


def _ms(**changes: Any) -> list[dict]:
    ms = {
        "version": "0.4",
        "axes": [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}
        ],
    }
    return [{**ms, **changes}]


def _scale(scale: Any) -> list[dict]:
    return _ms(
        datasets=[{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]
    )


# -- volumes: scrollseg info -------------------------------------------------------------------
def _info(path: Path | str, match: str) -> Bad:
    return Bad(match, argv=["info", str(path)])


@case("info: missing path")
def _(tmp, ctx):
    return _info(tmp / "nope.zarr", "does not exist")


@case("info: empty folder")
def _(tmp, ctx):
    (tmp / "empty").mkdir()
    return _info(tmp / "empty", "empty|no .*TIFF|no slice")


@case("info: unsupported file type")
def _(tmp, ctx):
    (tmp / "notes.txt").write_text("hello")
    return _info(tmp / "notes.txt", "unsupported file type")


@case("info: .zarray garbage")
def _(tmp, ctx):
    return _info(_zarr_v2(tmp / "a.zarr", zarray="{not json"), "cannot read the metadata")


@case("info: .zarray shape and chunks of different lengths")
def _(tmp, ctx):
    return _info(
        _zarr_v2(tmp / "a.zarr", zarray=_array(chunks=[8, 16])), "cannot read the metadata"
    )


@case("info: .zarray unknown dtype")
def _(tmp, ctx):
    return _info(_zarr_v2(tmp / "a.zarr", zarray=_array(dtype="<x9")), "cannot read the metadata")


@case("info: .zarray zero-size dimension")
def _(tmp, ctx):
    return _info(_zarr_v2(tmp / "a.zarr", zarray=_array(shape=[0, 16, 16])), "empty axis")


@case("info: .zarray negative shape")
def _(tmp, ctx):
    return _info(
        _zarr_v2(tmp / "a.zarr", zarray=_array(shape=[-8, 16, 16])),
        "cannot read the metadata|empty axis",
    )


@case("info: .zarray absurd shape (10^63 voxels)")
def _(tmp, ctx):
    big = _array(shape=[10**21] * 3, chunks=[64, 64, 64])
    return _info(_zarr_v2(tmp / "a.zarr", zarray=big), "far beyond any scan")


@case("info: .zarray zero chunk size")
def _(tmp, ctx):
    return _info(
        _zarr_v2(tmp / "a.zarr", zarray=_array(chunks=[0, 16, 16])),
        "cannot read the metadata|chunks",
    )


@case("info: .zarray 2D array")
def _(tmp, ctx):
    flat = _array(shape=[16, 16], chunks=[16, 16])
    return _info(_zarr_v2(tmp / "a.zarr", zarray=flat), "not a 3D volume|3D")


@case("info: .zarray shape not a list")
def _(tmp, ctx):
    return _info(_zarr_v2(tmp / "a.zarr", zarray=_array(shape="big")), "cannot read the metadata")


@case("info: .zattrs garbage")
def _(tmp, ctx):
    path = _zarr_v2(tmp / "a.zarr", zattrs="{{{", group=True)
    _zarr_v2(path / "0", zarray=ZARRAY)
    return _info(path, "cannot read the metadata")


@case("info: multiscales not a list")
def _(tmp, ctx):
    return _info(_ome(tmp / "a.zarr", "yes"), "multiscales|cannot read the metadata")


@case("info: datasets not a list")
def _(tmp, ctx):
    return _info(_ome(tmp / "a.zarr", _ms(datasets="0")), "datasets|cannot read the metadata")


@case("info: datasets empty")
def _(tmp, ctx):
    return _info(_ome(tmp / "a.zarr", _ms(datasets=[])), "lists no datasets")


@case("info: dataset without a path")
def _(tmp, ctx):
    return _info(
        _ome(tmp / "a.zarr", _ms(datasets=[{"scale": 1}])), "path|cannot read the metadata"
    )


@case("info: dataset path missing")
def _(tmp, ctx):
    bad = _ms(datasets=[{"path": "7"}])
    return _info(_ome(tmp / "a.zarr", bad), "level '7' named in the OME-Zarr metadata is missing")


@case("info: scale of the wrong length")
def _(tmp, ctx):
    return _info(_ome(tmp / "a.zarr", _scale([1, 1])), "scale|cannot read the metadata")


@case("info: zero scale")
def _(tmp, ctx):
    return _info(_ome(tmp / "a.zarr", _scale([0, 1, 1])), "zero or negative")


@case("info: negative scale")
def _(tmp, ctx):
    return _info(_ome(tmp / "a.zarr", _scale([1, -2, 1])), "zero or negative")


@case("info: scale not numbers")
def _(tmp, ctx):
    return _info(_ome(tmp / "a.zarr", _scale(["a", "b", "c"])), "scale|cannot read the metadata")


@case("info: NaN scale")
def _(tmp, ctx):
    path = _ome(tmp / "a.zarr", _scale([1, 1, 1]))
    text = (path / ".zattrs").read_text().replace("[1, 1, 1]", "[NaN, 1, 1]")
    (path / ".zattrs").write_text(text)
    return _info(path, "not three finite numbers")


@case("info: axes count differs from the array")
def _(tmp, ctx):
    bad = _ms(axes=[{"name": a, "type": "space"} for a in "yx"])
    return _info(_ome(tmp / "a.zarr", bad), "axes in the metadata for a 3D array")


@case("info: zarr.json garbage")
def _(tmp, ctx):
    (tmp / "a.zarr").mkdir()
    (tmp / "a.zarr" / "zarr.json").write_text("garbage")
    return _info(tmp / "a.zarr", "cannot read the metadata")


@case("info: zarr.json unknown data type")
def _(tmp, ctx):
    (tmp / "a.zarr").mkdir()
    meta = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [8, 8, 8],
        "data_type": "complex1024",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, 8, 8]}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}],
    }
    (tmp / "a.zarr" / "zarr.json").write_text(json.dumps(meta))
    return _info(tmp / "a.zarr", "cannot read the metadata")


@case("info: corrupt chunk")
def _(tmp, ctx):
    from napari_scrollseg.engine.omezarr import write_image

    path = tmp / "c.zarr"
    write_image(path, np.ones((8, 16, 16), np.uint8), spacing=(1, 1, 1), chunks=(8, 16, 16))
    (path / "0" / "0" / "0" / "0").write_bytes(b"not a blosc chunk")
    return _info(path, "damaged or unreachable")


@case("info: TIFF that is not a TIFF")
def _(tmp, ctx):
    (tmp / "v.tif").write_bytes(b"II*\x00garbage")
    return _info(tmp / "v.tif", "cannot read|not a")


@case("info: single 2D TIFF page")
def _(tmp, ctx):
    tifffile.imwrite(tmp / "v.tif", np.zeros((16, 16), np.uint8))
    return _info(tmp / "v.tif", "3D|2D|slice")


@case("info: slice folder with different slice shapes")
def _(tmp, ctx):
    (tmp / "s").mkdir()
    tifffile.imwrite(tmp / "s" / "00000.tif", np.zeros((16, 16), np.uint8))
    tifffile.imwrite(tmp / "s" / "00001.tif", np.zeros((16, 17), np.uint8))
    return _info(tmp / "s", "shape|size")


@case("info: slice folder with a corrupt slice")
def _(tmp, ctx):
    (tmp / "s").mkdir()
    tifffile.imwrite(tmp / "s" / "00000.tif", np.zeros((16, 16), np.uint8))
    (tmp / "s" / "00001.tif").write_bytes(b"broken")
    return _info(tmp / "s", "not a readable TIFF")


@case("info: HDF5 file that is not HDF5")
def _(tmp, ctx):
    (tmp / "v.h5").write_bytes(b"garbage")
    return _info(tmp / "v.h5", "cannot read|HDF5|not")


@case("info: HDF5 dataset missing")
def _(tmp, ctx):
    import h5py

    with h5py.File(tmp / "v.h5", "w") as f:
        f["data"] = np.zeros((8, 8, 8), np.uint8)
    return _info(f"{tmp / 'v.h5'}:/nope", "nope|no dataset|not found")


@case("info: zip that is not a zip")
def _(tmp, ctx):
    (tmp / "v.zarr.zip").write_bytes(b"garbage")
    return _info(tmp / "v.zarr.zip", "cannot read|zip")


@case("info: unknown URL protocol")
def _(tmp, ctx):
    return _info("nosuchproto://host/v.zarr", "fsspec|protocol")


# -- servers on 127.0.0.1 ---------------------------------------------------------------------
class _Server:
    """A tiny server: ``stall`` (accepts, never answers), ``drop`` (closes every
    connection), ``500``, or ``files`` (serves the given paths, 404 otherwise)."""

    def __init__(self, mode: str, files: dict[str, bytes] | None = None) -> None:
        self.mode, self.files, self.held = mode, files or {}, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v.zarr"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "stall":
                self.held.append(conn)
                continue
            if self.mode == "drop":
                conn.close()
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = conn.recv(65536).decode("latin-1")
            except OSError:
                return
            method, path = [*request.split(" "), "", ""][:2]
            path = path.split("?")[0].removeprefix("/v.zarr").lstrip("/")
            if self.mode == "500":
                status, body = "500 Internal Server Error", b"oops"
            elif path in self.files:
                status, body = "200 OK", self.files[path]
            else:
                status, body = "404 Not Found", b"not found"
            head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode() + (body if method != "HEAD" else b""))

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("SCROLLSEG_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("SCROLLSEG_HTTP_RETRIES", "1")
    made: list[_Server] = []

    def start(mode: str, files: dict[str, bytes] | None = None) -> _Server:
        made.append(_Server(mode, files))
        return made[-1]

    yield start
    for s in made:
        s.close()


SERVER_CASES = {
    "stalls": ("stall", None, r"no answer within 1 s \(2 tries\)"),
    "drops every connection": ("drop", None, r"cannot read http://127\.0\.0\.1:\d+/v\.zarr"),
    "answers 500": ("500", None, r"HTTP 500 \(2 tries\)"),
    "is gone": ("gone", None, r"cannot read http://127\.0\.0\.1:\d+/v\.zarr"),
    "serves nothing (404)": ("files", {}, "no zarr array or group"),
    "lies about the shape": (
        "files",
        {".zarray": json.dumps(_array(shape=[10**21] * 3)).encode()},
        "far beyond any scan",
    ),
    "serves garbage metadata": ("files", {".zarray": b"<html>"}, "cannot read the metadata"),
    "serves a corrupt chunk": (
        "files",
        {
            ".zarray": json.dumps({**ZARRAY, "compressor": {"id": "zlib", "level": 1}}).encode(),
            "0.0.0": b"not zlib",
        },
        "damaged or unreachable",
    ),
}


@pytest.mark.parametrize(
    "mode", SERVER_CASES.values(), ids=[f"info: a server that {k}" for k in SERVER_CASES]
)
def test_server_faults_are_one_clear_error(mode, server, capsys):
    kind, files, match = mode
    if kind == "gone":
        s = server("files")
        s.close()
    else:
        s = server(kind, files)
    _run_cli(Bad(match, argv=["info", s.url]), capsys)


# -- predict -----------------------------------------------------------------------------------
def _predict(
    ctx: dict, out: Path, *extra: str, volume: Path | None = None, model=None
) -> list[str]:
    argv = ["predict", str(model or ctx["model"]), str(volume or ctx["vol"]), str(out)]
    return [*argv, "--device", "cpu", "--folds", "0", *extra]


def _bad_predict(ctx, tmp, match, *extra, **kw) -> Bad:
    out = tmp / "out.zarr"
    return Bad(match, argv=_predict(ctx, out, *extra, **kw), absent=[out])


@case("predict: --step 0")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "step", "--step", "0")


@case("predict: --step above 1")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "step", "--step", "1.5")


@case("predict: --step NaN")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "step", "--step", "nan")


@case("predict: --step negative")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "step", "--step", "-0.5")


@case("predict: --roi not ranges")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "--roi", "--roi", "abc")


@case("predict: --roi two axes")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "needs 3 ranges", "--roi", "0:4,0:4")


@case("predict: --roi reversed range")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "empty", "--roi", "10:5,0:10,0:10")


@case("predict: --roi beyond the volume")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "beyond|outside", "--roi", "0:1000,0:10,0:10")


@case("predict: --roi with a step")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "stepped|step", "--roi", "0:10:2,0:10,0:10")


@case("predict: --roi with letters")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "not start:stop with integers", "--roi", "a:b,0:10,0:10")


@case("predict: --roi empty range")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "empty", "--roi", "4:4,0:10,0:10")


@case("predict: --roi three colons")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "--roi", "--roi", "0:1:1:1,0:10,0:10")


@case("predict: --chunk 0")
def _(tmp, ctx):
    return Bad("--chunk", argv=_predict(ctx, tmp / "o.zarr", "--chunk", "0"), usage=True)


@case("predict: --chunk letters")
def _(tmp, ctx):
    return Bad("--chunk", argv=_predict(ctx, tmp / "o.zarr", "--chunk", "a,b,c"), usage=True)


@case("predict: --folds not a number")
def _(tmp, ctx):
    out = tmp / "out.zarr"
    argv = _predict(ctx, out)
    argv[argv.index("--folds") + 1] = "x"
    return Bad("fold 'x' is neither a number nor 'all'", argv=argv, absent=[out])


@case("predict: a fold that is not there")
def _(tmp, ctx):
    out = tmp / "out.zarr"
    argv = _predict(ctx, out)
    argv[argv.index("--folds") + 1] = "7"
    return Bad("fold", argv=argv, absent=[out])


@case("predict: a checkpoint that is not there")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "checkpoint", "--checkpoint", "checkpoint_nope.pth")


@case("predict: model path missing")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "does not exist", model=tmp / "nomodel")


@case("predict: model folder without plans.json")
def _(tmp, ctx):
    (tmp / "m").mkdir()
    return _bad_predict(ctx, tmp, "plans.json|trained-model", model=tmp / "m")


@case("predict: model zip that is not a zip")
def _(tmp, ctx):
    (tmp / "m.zip").write_bytes(b"PK\x03\x04garbage")
    return _bad_predict(ctx, tmp, "zip", model=tmp / "m.zip")


def _broken_model(tmp: Path, ctx: dict, edit: Callable[[Path], None]) -> Path:
    folder = tmp / "model" / ctx["model"].name
    shutil.copytree(ctx["model"], folder, ignore=shutil.ignore_patterns("fold_1"))
    edit(folder)
    return folder


@case("predict: plans.json garbage")
def _(tmp, ctx):
    model = _broken_model(tmp, ctx, lambda f: (f / "plans.json").write_text("{oops"))
    return _bad_predict(ctx, tmp, "not valid JSON", model=model)


@case("predict: dataset.json garbage")
def _(tmp, ctx):
    model = _broken_model(tmp, ctx, lambda f: (f / "dataset.json").write_text("[1, 2"))
    return _bad_predict(ctx, tmp, "not valid JSON", model=model)


@case("predict: plans.json not an object")
def _(tmp, ctx):
    model = _broken_model(tmp, ctx, lambda f: (f / "plans.json").write_text("[]"))
    return _bad_predict(ctx, tmp, "configurations", model=model)


@case("predict: plans naming os.system")
def _(tmp, ctx):
    marker = tmp / "ran"

    def edit(f: Path) -> None:
        plans = json.loads((f / "plans.json").read_text())
        arch = plans["configurations"]["3d_fullres"]["architecture"]
        arch["arch_kwargs"].update(nonlin="os.system", nonlin_kwargs={"command": f"touch {marker}"})
        (f / "plans.json").write_text(json.dumps(plans))

    bad = _bad_predict(
        ctx, tmp, "refused to build the network", model=_broken_model(tmp, ctx, edit)
    )
    bad.absent.append(marker)
    return bad


@case("predict: checkpoint garbage")
def _(tmp, ctx):
    model = _broken_model(
        tmp, ctx, lambda f: (f / "fold_0" / "checkpoint_final.pth").write_bytes(b"garbage")
    )
    return _bad_predict(ctx, tmp, "not a readable PyTorch checkpoint", model=model)


@case("predict: checkpoint with a pickle payload")
def _(tmp, ctx):
    import pickle

    marker = tmp / "ran"

    class Boom:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    model = _broken_model(
        tmp,
        ctx,
        lambda f: (f / "fold_0" / "checkpoint_final.pth").write_bytes(pickle.dumps(Boom())),
    )
    bad = _bad_predict(ctx, tmp, "PyTorch checkpoint|not plain weights", model=model)
    bad.absent.append(marker)
    return bad


@case("predict: volume with a NaN voxel")
def _(tmp, ctx):
    vol = ctx["image"].astype(np.float32)
    vol[5, 6, 7] = np.nan
    tifffile.imwrite(tmp / "nan.tif", vol)
    return _bad_predict(
        ctx,
        tmp,
        r"1 non-finite voxel\(s\) \(NaN or inf\) within z 5\.\.5, y 6\.\.6, x 7\.\.7",
        volume=tmp / "nan.tif",
    )


@case("predict: volume with an infinite voxel")
def _(tmp, ctx):
    vol = ctx["image"].astype(np.float32)
    vol[1, 2, 3] = np.inf
    tifffile.imwrite(tmp / "inf.tif", vol)
    return _bad_predict(
        ctx, tmp, r"non-finite voxel.*within z 1\.\.1, y 2\.\.2, x 3\.\.3", volume=tmp / "inf.tif"
    )


@case("predict: corrupt chunk met while predicting")
def _(tmp, ctx):
    from napari_scrollseg.engine.omezarr import write_image

    path = tmp / "c.zarr"
    write_image(path, ctx["image"], spacing=(1, 1, 1), chunks=(8, 40, 40))
    (path / "0" / "1" / "0" / "0").write_bytes(b"not a blosc chunk")
    out = tmp / "out.zarr"
    return Bad("damaged or unreachable", argv=_predict(ctx, out, volume=path))


@case("predict: output is a file")
def _(tmp, ctx):
    (tmp / "out.zarr").write_text("mine")
    return Bad("is a file", argv=_predict(ctx, tmp / "out.zarr"))


@case("predict: output holds something else")
def _(tmp, ctx):
    (tmp / "out.zarr").mkdir()
    (tmp / "out.zarr" / "thesis.txt").write_text("mine")
    return Bad("not a scrollseg prediction", argv=_predict(ctx, tmp / "out.zarr", "--overwrite"))


@case("predict: output where nothing can be written")
def _(tmp, ctx):
    return Bad("cannot write", argv=_predict(ctx, UNWRITABLE / "out.zarr"))


@case("predict: output under a file")
def _(tmp, ctx):
    (tmp / "f").write_text("x")
    return Bad("is a file, not a folder", argv=_predict(ctx, tmp / "f" / "out.zarr"))


@case("predict: --overwrite while a live run holds the output")
def _(tmp, ctx):
    import os

    out = tmp / "out.zarr"
    (out / ".scrollseg").mkdir(parents=True)
    (out / ".zattrs").write_text(json.dumps({"scrollseg": {"kind": "prediction"}}))
    live = os.getppid()  # a process that runs on this machine and is not this one
    (out / ".scrollseg" / "lock").write_text(f"{socket.gethostname()} {live}")
    bad = Bad(rf"another scrollseg run \(pid {live}\)", argv=_predict(ctx, out, "--overwrite"))
    bad.present = [out / ".zattrs", out / ".scrollseg" / "lock"]
    return bad


@case("predict: mask missing")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "does not exist", "--mask", str(tmp / "nomask.zarr"))


@case("predict: 2D volume")
def _(tmp, ctx):
    tifffile.imwrite(tmp / "flat.tif", np.zeros((40, 40), np.uint8))
    return _bad_predict(ctx, tmp, "3D|2D", volume=tmp / "flat.tif")


@case("predict: zero-size dimension")
def _(tmp, ctx):
    path = _zarr_v2(tmp / "z.zarr", zarray=_array(shape=[0, 40, 40]))
    return _bad_predict(ctx, tmp, "empty axis", volume=path)


@case("predict: volume missing")
def _(tmp, ctx):
    return _bad_predict(ctx, tmp, "does not exist", volume=tmp / "novol.zarr")


# -- export ------------------------------------------------------------------------------------
def _export(ctx: dict, out: Path, *extra: str, classes: str = "air,papyrus") -> list[str]:
    argv = ["export", "--image", str(ctx["vol"]), "--labels", str(ctx["lab"])]
    return [
        *argv,
        "--classes",
        classes,
        "--out",
        str(out),
        "--dataset-id",
        "3",
        "--name",
        "X",
        *extra,
    ]


def _bad_export(ctx, tmp, match, *extra, **kw) -> Bad:
    out = tmp / "raw"
    return Bad(match, argv=_export(ctx, out, *extra, **kw), absent=[out / "Dataset003_X"])


@case("export: --out is a file")
def _(tmp, ctx):
    (tmp / "raw").write_text("x")
    return Bad("is a file", argv=_export(ctx, tmp / "raw"))


@case("export: --out where nothing can be written")
def _(tmp, ctx):
    return Bad("cannot write|is not writable", argv=_export(ctx, UNWRITABLE / "raw"))


@case("export: one class")
def _(tmp, ctx):
    return _bad_export(ctx, tmp, "at least two classes", classes="air")


@case("export: background not first")
def _(tmp, ctx):
    return _bad_export(
        ctx, tmp, "only class 1 may be called 'background'", classes="air,background"
    )


@case("export: name with a space")
def _(tmp, ctx):
    argv = _export(ctx, tmp / "raw")
    argv[argv.index("--name") + 1] = "my data"
    return Bad("letters, digits and '-'", argv=argv, absent=[tmp / "raw"])


@case("export: dataset id 0")
def _(tmp, ctx):
    argv = _export(ctx, tmp / "raw")
    argv[argv.index("--dataset-id") + 1] = "0"
    return Bad("1..999", argv=argv, absent=[tmp / "raw"])


@case("export: dataset id 1000")
def _(tmp, ctx):
    argv = _export(ctx, tmp / "raw")
    argv[argv.index("--dataset-id") + 1] = "1000"
    return Bad("1..999", argv=argv, absent=[tmp / "raw"])


@case("export: image missing")
def _(tmp, ctx):
    argv = _export(ctx, tmp / "raw")
    argv[argv.index("--image") + 1] = str(tmp / "nope.tif")
    return Bad("does not exist", argv=argv, absent=[tmp / "raw"])


@case("export: labels of another shape")
def _(tmp, ctx):
    tifffile.imwrite(tmp / "l.tif", np.ones((16, 40, 39), np.uint8))
    argv = _export(ctx, tmp / "raw")
    argv[argv.index("--labels") + 1] = str(tmp / "l.tif")
    return Bad("label shape", argv=argv, absent=[tmp / "raw"])


@case("export: float labels")
def _(tmp, ctx):
    tifffile.imwrite(tmp / "l.tif", np.ones((16, 40, 40), np.float32))
    argv = _export(ctx, tmp / "raw")
    argv[argv.index("--labels") + 1] = str(tmp / "l.tif")
    return Bad("integer", argv=argv, absent=[tmp / "raw"])


@case("export: label values outside the classes")
def _(tmp, ctx):
    tifffile.imwrite(tmp / "l.tif", np.full((16, 40, 40), 9, np.uint8))
    argv = _export(ctx, tmp / "raw")
    argv[argv.index("--labels") + 1] = str(tmp / "l.tif")
    return Bad(r"label values \[9\] are outside", argv=argv, absent=[tmp / "raw"])


@case("export: nothing annotated")
def _(tmp, ctx):
    tifffile.imwrite(tmp / "l.tif", np.zeros((16, 40, 40), np.uint8))
    argv = _export(ctx, tmp / "raw")
    argv[argv.index("--labels") + 1] = str(tmp / "l.tif")
    return Bad("no annotated voxel", argv=argv, absent=[tmp / "raw"])


@case("export: negative margin")
def _(tmp, ctx):
    return _bad_export(ctx, tmp, "margin", "--margin", "-1")


@case("export: two margins")
def _(tmp, ctx):
    return _bad_export(ctx, tmp, "--margin takes one value or three", "--margin", "1", "2")


@case("export: append to a folder without dataset.json")
def _(tmp, ctx):
    (tmp / "raw" / "Dataset003_X").mkdir(parents=True)
    return Bad("has no dataset.json", argv=_export(ctx, tmp / "raw", "--append"))


@case("export: append to a garbage dataset.json")
def _(tmp, ctx):
    ds = tmp / "raw" / "Dataset003_X"
    shutil.copytree(ctx["raw"], ds)
    (ds / "dataset.json").write_text("{garbage")
    return Bad("not valid JSON", argv=_export(ctx, tmp / "raw", "--append"))


@case("export: classes file garbage")
def _(tmp, ctx):
    (tmp / "c.json").write_text("{garbage")
    return _bad_export(ctx, tmp, "c.json|JSON", classes=str(tmp / "c.json"))


@case("export: more folds than cases")
def _(tmp, ctx):
    return _bad_export(ctx, tmp, "5-fold cross-validation needs at least 5 cases", "--folds", "5")


@case("export: one --labels for two --image")
def _(tmp, ctx):
    argv = _export(ctx, tmp / "raw")
    argv[1:1] = ["--image", str(ctx["vol"])]
    return Bad("2 --image but 1 --labels", argv=argv, absent=[tmp / "raw"])


@case("export: ID used by another dataset")
def _(tmp, ctx):
    shutil.copytree(ctx["raw"], tmp / "raw" / "Dataset003_Other")
    return Bad("already used by Dataset003_Other", argv=_export(ctx, tmp / "raw"))


# -- train -------------------------------------------------------------------------------------
def _train(ctx: dict, dataset: Path, tmp: Path, *extra: str) -> list[str]:
    return ["train", str(dataset), "--out", str(tmp / "results"), "--device", "cpu", *extra]


@case("train: folder that is not a dataset")
def _(tmp, ctx):
    (tmp / "ds").mkdir()
    return Bad("dataset", argv=_train(ctx, tmp / "ds", tmp), absent=[tmp / "results"])


@case("train: garbage dataset.json")
def _(tmp, ctx):
    ds = tmp / "Dataset005_Good"
    shutil.copytree(ctx["raw"], ds)
    (ds / "dataset.json").write_text("{{garbage")
    return Bad("dataset.json", argv=_train(ctx, ds, tmp), absent=[tmp / "results"])


@case("train: dataset.json without labels")
def _(tmp, ctx):
    ds = tmp / "Dataset005_Good"
    shutil.copytree(ctx["raw"], ds)
    meta = json.loads((ds / "dataset.json").read_text())
    del meta["labels"]
    (ds / "dataset.json").write_text(json.dumps(meta))
    return Bad("lacks labels", argv=_train(ctx, ds, tmp), absent=[tmp / "results"])


@case("train: --plans-overrides garbage")
def _(tmp, ctx):
    argv = _train(ctx, ctx["raw"], tmp, "--plans-overrides", "{n_stages: 3")
    return Bad("--plans-overrides is not valid JSON", argv=argv, absent=[tmp / "results"])


@case("train: --plans-overrides a list")
def _(tmp, ctx):
    argv = _train(ctx, ctx["raw"], tmp, "--plans-overrides", "[1]")
    return Bad("must be a JSON object", argv=argv, absent=[tmp / "results"])


@case("train: --fold x")
def _(tmp, ctx):
    return Bad("--fold|fold", argv=_train(ctx, ctx["raw"], tmp, "--fold", "x"), usage=True)


@case("train: --epochs 0")
def _(tmp, ctx):
    return Bad("--epochs", argv=_train(ctx, ctx["raw"], tmp, "--epochs", "0"), usage=True)


# -- phantom -----------------------------------------------------------------------------------
@case("phantom: --seed -1")
def _(tmp, ctx):
    out = tmp / "p.zarr"
    return Bad(
        "seed must be an integer >= 0", argv=["phantom", str(out), "--seed", "-1"], absent=[out]
    )


@case("phantom: shape too small")
def _(tmp, ctx):
    out = tmp / "p.zarr"
    argv = ["phantom", str(out), "--shape", "4", "4", "4"]
    return Bad("three sizes >= 8", argv=argv, absent=[out])


@case("phantom: shape 0")
def _(tmp, ctx):
    return Bad(
        "--shape", argv=["phantom", str(tmp / "p.zarr"), "--shape", "0", "8", "8"], usage=True
    )


@case("phantom: larger than the free disk")
def _(tmp, ctx):
    out = tmp / "p.zarr"
    argv = ["phantom", str(out), "--shape", "100000", "100000", "100000"]
    return Bad("GB free", argv=argv, absent=[out])


@case("phantom: --overwrite a folder it did not write")
def _(tmp, ctx):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "keep.txt").write_text("x")
    argv = ["phantom", str(tmp / "mine"), "--shape", "8", "8", "8", "--overwrite"]
    return Bad(
        "is not a phantom written by scrollseg", argv=argv, present=[tmp / "mine" / "keep.txt"]
    )


@case("phantom: output exists")
def _(tmp, ctx):
    (tmp / "p.zarr").write_text("x")
    return Bad("already exists", argv=["phantom", str(tmp / "p.zarr"), "--shape", "8", "8", "8"])


# -- demo --------------------------------------------------------------------------------------
@case("demo: --out a folder it did not make")
def _(tmp, ctx):
    (tmp / "work" / "nnUNet_raw").mkdir(parents=True)
    (tmp / "work" / "nnUNet_raw" / "mine.txt").write_text("x")
    bad = Bad("not made by the demo", argv=["demo", "--out", str(tmp / "work")])
    bad.absent.append(tmp / "work" / "phantom.zarr")
    bad.present.append(tmp / "work" / "nnUNet_raw" / "mine.txt")
    return bad


# -- engine API --------------------------------------------------------------------------------
def _store(tmp: Path, **kw: Any):
    from napari_scrollseg.engine.annotations import AnnotationStore

    return AnnotationStore.create(
        tmp / "ann.zarr", shape=(16, 32, 32), classes=["air", "papyrus"], chunks=(8, 16, 16), **kw
    )


@case("api: annotation store with a corrupt chunk")
def _(tmp, ctx):
    from napari_scrollseg.engine.annotations import AnnotationStore

    store = _store(tmp)
    store[0:8, 0:16, 0:16] = 1
    store.save()
    chunk = next(p for p in (tmp / "ann.zarr" / "0").rglob("*") if p.is_file() and p.name.isdigit())
    chunk.write_bytes(b"garbage")
    return Bad(
        "damaged|cannot read", call=lambda: AnnotationStore.open(tmp / "ann.zarr")[0:8, 0:16, 0:16]
    )


@case("api: annotation store out-of-range index")
def _(tmp, ctx):
    store = _store(tmp)
    return Bad("outside|out of range|beyond", call=lambda: store.__setitem__((100, 0, 0), 1))


@case("api: annotation store zero chunk size")
def _(tmp, ctx):
    from napari_scrollseg.engine.annotations import AnnotationStore

    def make():
        AnnotationStore.create(
            tmp / "a.zarr", shape=(8, 8, 8), classes=["a", "b"], chunks=(0, 8, 8)
        )

    return Bad("chunk", call=make, absent=[tmp / "a.zarr"])


@case("api: annotation store missing spacing")
def _(tmp, ctx):
    from napari_scrollseg.engine.annotations import AnnotationStore

    def make():
        AnnotationStore.create(tmp / "a.zarr", shape=(8, 8, 8), classes=["a", "b"], spacing=None)

    return Bad("spacing", call=make, absent=[tmp / "a.zarr"])


@case("api: annotation store that is not one")
def _(tmp, ctx):
    from napari_scrollseg.engine.annotations import AnnotationStore

    (tmp / "x.zarr").mkdir()
    (tmp / "x.zarr" / "file.txt").write_text("x")
    return Bad("annotation", call=lambda: AnnotationStore.open(tmp / "x.zarr"))


@case("api: open_volume level out of range")
def _(tmp, ctx):
    from napari_scrollseg.engine.volumes import open_volume

    return Bad("level", call=lambda: open_volume(ctx["vol"], level=5))


@case("api: export_dataset without cases")
def _(tmp, ctx):
    from napari_scrollseg.engine.dataset import export_dataset

    def call():
        export_dataset([], out_dir=tmp / "raw", dataset_id=3, name="X", classes=["a", "b"])

    return Bad("at least one", call=call, absent=[tmp / "raw"])


@case("api: load_model with an unknown device")
def _(tmp, ctx):
    from napari_scrollseg.engine.model import load_model

    return Bad("device", call=lambda: load_model(ctx["model"], device="quantum"))


@case("api: predict_volume with a step of 0")
def _(tmp, ctx):
    from napari_scrollseg.engine.predict_volume import predict_volume

    def call():
        predict_volume(ctx["model"], ctx["vol"], tmp / "o.zarr", step=0, device="cpu")

    return Bad("step", call=call, absent=[tmp / "o.zarr"])


@case("api: predict_region outside the volume")
def _(tmp, ctx):
    from napari_scrollseg.engine.model import load_model
    from napari_scrollseg.engine.predict import predict_region
    from napari_scrollseg.engine.volumes import open_volume

    def call():
        model = load_model(ctx["model"], device="cpu", folds=(0,))
        predict_region(model, open_volume(ctx["vol"]), (slice(100, 120), slice(0, 8), slice(0, 8)))

    return Bad("outside|beyond|empty", call=call)


@case("api: write_phantom with a float seed")
def _(tmp, ctx):
    from napari_scrollseg.engine.phantom import write_phantom

    return Bad(
        "seed",
        call=lambda: write_phantom(tmp / "p.zarr", (8, 8, 8), seed=1.5),
        absent=[tmp / "p.zarr"],
    )


# -- the runner ----------------------------------------------------------------------------------
def _run_cli(bad: Bad, capsys) -> None:
    result: dict = {}

    def target() -> None:
        try:
            result["rc"] = main(bad.argv)
        except SystemExit as exc:  # argparse
            result["rc"] = exc.code
        except BaseException as exc:  # a traceback: the failure this suite is for
            result["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(WATCHDOG_S)
    assert not t.is_alive(), f"scrollseg {' '.join(bad.argv)} hung for {WATCHDOG_S} s"
    if "exc" in result:
        raise result["exc"]
    err = capsys.readouterr().err.strip()
    assert result["rc"] == 2, err
    lines = [ln for ln in err.splitlines() if "%|" not in ln and "chunk [" not in ln]  # bars
    if bad.usage:
        assert "error:" in lines[-1]
        assert re.search(bad.match, lines[-1]), lines[-1]
        return
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert re.search(bad.match, lines[0]), lines[0]


def _leftovers(tmp: Path) -> list[str]:
    return sorted(str(p) for p in tmp.rglob("*") if ".partial" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, ctx: dict, capsys) -> None:
    bad = CASES[name](tmp_path, ctx)
    if bad.argv is not None:
        _run_cli(bad, capsys)
    else:
        with pytest.raises(ScrollsegError, match=bad.match):
            bad.call()
    for path in bad.absent:
        assert not path.exists(), f"{path} was left behind"
    for path in bad.present:
        assert path.exists(), f"{path} was removed"
    assert _leftovers(tmp_path) == []


def test_the_suite_has_80_distinct_cases() -> None:
    assert len(CASES) + len(SERVER_CASES) >= 80
