"""Screenshot of the train widget after a short CPU training on phantoms (rerunnable).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_train.py

Exports three small sparse phantom cases as an nnU-Net dataset under --work (once),
trains fold 0 from the widget with the small CPU network (--epochs x --iterations),
and writes docs/images/train-widget.png with the curves and the fold's Dice.
With --follow: trains fold 1, leaves it running after 2 epochs (as napari's close
dialog does), opens a new viewer whose train widget follows it for 2 more epochs
(docs/images/train-follow.png), then stops it with Cancel.
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
    parser.add_argument("--follow", action="store_true", help="the Follow screenshot")
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
    if args.follow:
        _follow(viewer, widget, raw, results, args.out)
        return
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


def _wait(until, timeout: float = 600.0) -> None:
    from qtpy.QtWidgets import QApplication

    deadline = time.perf_counter() + timeout
    while not until() and time.perf_counter() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)


def _follow(viewer, widget, raw: Path, results: Path, out: Path) -> None:
    import napari

    from napari_scrollseg.widgets.train import TrainWidget

    widget.epochs.value = 100
    widget.folds.value = "1"
    widget.train_button.clicked()
    _wait(lambda: widget.curves.points() >= 2)
    widget.leave_running(wait=True)  # napari's "Leave it running"
    print(widget.last_event)
    viewer.close()
    viewer = napari.Viewer(title="scrollseg: train (napari opened again)")
    viewer.window._qt_window.resize(1500, 1000)
    viewer.open_sample("napari-scrollseg", "phantom")
    again = TrainWidget(viewer)
    viewer.window.add_dock_widget(again, name="Train", area="right")
    again.results.value = results
    again.dataset.value = raw
    print("button:", again.follow_button.text)
    again.follow_button.clicked()
    start = again.curves.points() if again.curves.points() else 2
    _wait(lambda: again.curves.points() >= start + 2)
    again.curves.wait()
    _wait(lambda: again.curves.shown is not None, 30)
    viewer.screenshot(out / "train-follow.png", canvas_only=False)
    print("wrote", out / "train-follow.png", "after", again.curves.points(), "epochs")
    again.progress.cancel_button.click()
    _wait(lambda: not again.running, 300)
    print(again.last_event)
    viewer.close()


if __name__ == "__main__":
    main()
