"""Screenshot of the train widget after a short CPU training on phantoms (rerunnable).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_train.py

Exports three small sparse phantom cases as an nnU-Net dataset under --work (once),
trains fold 0 from the widget with the small CPU network (--epochs x --iterations),
and writes docs/images/train-widget.png with the curves and the fold's Dice.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scrollseg-screenshots-train"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from napari_scrollseg.engine.dataset import export_dataset
    from napari_scrollseg.engine.demo import sparse_slices
    from napari_scrollseg.engine.phantom import CLASSES, make_phantom

    raw = args.work / "raw" / "Dataset903_PhantomShots"
    if not raw.exists():
        cases = []
        for seed in range(3):
            image, truth = make_phantom((24, 64, 64), seed=seed)
            cases.append((image, sparse_slices(truth, n_slices=4)))
        raw = export_dataset(
            cases,
            out_dir=args.work / "raw",
            dataset_id=903,
            name="PhantomShots",
            classes=sorted(CLASSES, key=CLASSES.get),
        )
    results = args.work / "results"
    shutil.rmtree(results / raw.name, ignore_errors=True)  # a fresh model, same preprocessing

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_scrollseg.widgets._common import session
    from napari_scrollseg.widgets.train import TrainWidget

    viewer = napari.Viewer(title="scrollseg: train")
    viewer.window._qt_window.resize(1500, 1000)
    viewer.open_sample("napari-scrollseg", "phantom")
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train", area="right")
    session().last_dataset = raw  # as the export widget does
    widget.results.value = results
    widget.small.value = True
    widget.device.value = "cpu"
    widget.epochs.value = args.epochs
    widget.iterations.value = args.iterations
    widget.folds.value = "0"
    widget.train_button.clicked()
    t0 = time.perf_counter()
    while widget.running:
        QApplication.processEvents()
        time.sleep(0.02)
    print(f"trained in {time.perf_counter() - t0:.0f} s: {widget.last_event}")
    print("trained models in the session:", session().trained_models)
    widget.curves.wait()  # the last progress.png is loaded
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(args.out / "train-widget.png", canvas_only=False)
    print("wrote", args.out / "train-widget.png")
    viewer.close()


if __name__ == "__main__":
    main()
