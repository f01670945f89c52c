"""Scale: annotating a lazy 1000 x 2048 x 2048 uint8 volume (4 GB) reads only what is on
screen, keeps memory small, and an autosave writes only the painted chunk."""

from __future__ import annotations

import gc

import numpy as np
import psutil
from qtpy.QtCore import Qt
from zarr.storage import LocalStore

from napari_scrollseg._reader import volume_layer_data
from napari_scrollseg.engine import contrast, omezarr
from napari_scrollseg.engine.volumes import open_volume
from napari_scrollseg.widgets.annotate import AnnotateWidget
from tests.engine.test_volumes import CountingStore

SHAPE = (1000, 2048, 2048)
CHUNKS = (64, 256, 256)


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_annotating_a_4gb_volume_reads_only_the_slice_on_screen(
    make_napari_viewer, qtbot, tmp_path
):
    path = tmp_path / "big.zarr"
    omezarr.create_image(
        path, shape=SHAPE, dtype="uint8", chunks=CHUNKS, spacing=(1, 1, 1), n_levels=1
    )
    store = CountingStore(LocalStore(path, read_only=True))
    viewer = make_napari_viewer()
    volume = open_volume(store)
    ((data, meta, _),) = volume_layer_data(volume, name="big")
    viewer.add_image(data, **meta)
    z = int(viewer.dims.current_step[0])
    qtbot.wait(50)
    zc = z // CHUNKS[0]
    on_screen = {f"0/{zc}/{y}/{x}" for y in range(8) for x in range(8)}
    shown = set(store.chunk_reads)
    # napari slices z = 0 when the layer is added, then the middle slice it shows
    first = {f"0/0/{y}/{x}" for y in range(8) for x in range(8)}
    # besides the displayed chunks, the reader reads a bounded sample for its percentile
    # contrast (no pyramid here): a few chunks, never a pass over the volume
    sampled = shown - on_screen - first
    assert len(sampled) <= contrast._SAMPLE_BLOCKS
    assert shown & on_screen
    store.chunk_reads.clear()
    before = _rss_mb()

    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.path_edit.setText(str(tmp_path / "big.annotations.zarr"))
    qtbot.mouseClick(widget.new_button, Qt.MouseButton.LeftButton)
    layer = widget.layer
    layer.brush_size = 20
    layer.paint((z, 1000, 1000), 2)
    written = widget.save()
    qtbot.wait(50)
    after = _rss_mb()

    reads = sorted(set(store.chunk_reads))
    print(
        f"\nscale: z={z}, image chunks read to display {len(shown)} (z-chunk rows 0 and {zc}, "
        f"{len(on_screen)} each); then widget+store+stroke+autosave read {len(reads)} image chunks, RSS {before:.0f} -> {after:.0f} MB "
        f"(+{after - before:.0f} MB), autosave wrote {written} chunk(s)"
    )
    assert set(reads) <= on_screen  # nothing off the displayed slice's chunks
    assert after - before < 200
    assert written == 1  # the stroke's one 64^3 chunk
    files = [
        p
        for p in (tmp_path / "big.annotations.zarr" / "0").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    ]
    assert len(files) == 1
    np.testing.assert_array_equal(widget.store[z, 1000, 995:1006], 2)
