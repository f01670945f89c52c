"""Export dock widget: (image, annotation store) pairs -> an nnU-Net v2 raw dataset.

The export is one engine call, :func:`~napari_scrollseg.engine.dataset.iter_export_dataset`,
run off the GUI thread (progress bar, Cancel closes the generator: nothing half-written
stays), then nnU-Net's own integrity check (:func:`verify_dataset`, a subprocess, also off
the GUI thread). The dataset folder goes to the shared session for the training widget.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_scrollseg.engine.annotations import AnnotationStore, common_classes
from napari_scrollseg.engine.dataset import (
    DEFAULT_MARGIN,
    ENDINGS,
    MIN_FOLDS_WARNING,
    NORMS,
    ExportProgress,
    iter_export_dataset,
    planned_case_count,
    verify_dataset,
)
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.widgets._common import (
    ProgressRow,
    layer_source,
    level0,
    notify_error,
    notify_info,
    session,
    start_worker,
)
from napari_scrollseg.widgets.annotate import STORE_KEY

if TYPE_CHECKING:
    import napari


def _describe(event: Any) -> str:
    if isinstance(event, ExportProgress):
        return f"case {event.index + 1}/{event.n_cases} ({event.case}): {event.done}/{event.total}"
    return "nnU-Net integrity check..."


def _verify_job(dataset: Path):
    """nnU-Net's integrity check as a worker generator; returns the dataset folder."""
    yield {"done": 0, "total": 1}
    verify_dataset(dataset)
    return dataset


class ExportWidget(QWidget):
    """Choose (image, annotation) pairs and dataset options; export, then verify."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.pairs: list[tuple[str, str]] = []  # (image layer name, annotation layer name)
        self.worker: Any = None
        self.dataset: Path | None = None

        self.pair_table = QTableWidget(0, 2)
        self.pair_table.setHorizontalHeaderLabels(["image", "annotation store"])
        self.pair_table.verticalHeader().setVisible(False)
        self.pair_table.horizontalHeader().setStretchLastSection(True)
        self.add_pair_button = QPushButton("Add current pair")
        self.add_pair_button.setToolTip(
            "the selected annotation layer (made by the Annotate widget) and its image"
        )
        self.remove_pair_button = QPushButton("Remove")
        self.add_pair_button.clicked.connect(self.add_current_pair)
        self.remove_pair_button.clicked.connect(self._remove_selected)

        self.id_spin = QSpinBox()
        self.id_spin.setRange(1, 999)
        self.id_spin.setValue(501)
        self.name_edit = QLineEdit("Scroll")
        self.classes_label = QLabel("")
        self.margin_spin = QSpinBox()
        self.margin_spin.setRange(0, 4096)
        self.margin_spin.setValue(DEFAULT_MARGIN)
        self.margin_spin.setSuffix(" voxels")
        self.norm_combo = QComboBox()
        self.norm_combo.addItems(list(NORMS))
        self.ending_combo = QComboBox()
        self.ending_combo.addItems(list(ENDINGS))
        self.out_edit = QLineEdit(os.environ.get("nnUNet_raw", ""))  # noqa: SIM112 (nnU-Net name)
        self.out_edit.setPlaceholderText("nnUNet_raw folder")
        browse = QPushButton("...")
        browse.clicked.connect(self._browse)
        self.append_check = QCheckBox("append to an existing dataset")
        self.verify_check = QCheckBox("then run nnU-Net's integrity check")
        self.verify_check.setChecked(True)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self.export)
        self.progress = ProgressRow(describe=_describe)
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.verdict = QLabel("")
        self.verdict.setWordWrap(True)

        pair_buttons = QHBoxLayout()
        pair_buttons.addWidget(self.add_pair_button)
        pair_buttons.addWidget(self.remove_pair_button)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit)
        out_row.addWidget(browse)
        form = QFormLayout()
        form.addRow("dataset id", self.id_spin)
        form.addRow("name", self.name_edit)
        form.addRow("classes", self.classes_label)
        form.addRow("margin", self.margin_spin)
        form.addRow("normalization", self.norm_combo)
        form.addRow("file ending", self.ending_combo)
        form.addRow("nnUNet_raw", out_row)
        form.addRow(self.append_check)
        form.addRow(self.verify_check)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("(image, annotation) pairs"))
        layout.addWidget(self.pair_table)
        layout.addLayout(pair_buttons)
        layout.addLayout(form)
        layout.addWidget(self.export_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.warning_label)
        layout.addWidget(self.verdict)
        layout.addStretch(1)

    # -- pairs -------------------------------------------------------------------------
    def _annotation_layers(self) -> list[Any]:
        from napari.layers import Labels

        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and isinstance(layer.data, AnnotationStore)
        ]

    def add_current_pair(self) -> None:
        """Add the selected annotation layer (else the top one) with its image."""
        layers = self._annotation_layers()
        active = self.viewer.layers.selection.active
        layer = active if active in layers else (layers[-1] if layers else None)
        if layer is None:
            notify_error(
                ScrollsegError(
                    "no annotation layer: create or open a store in the Annotate widget first"
                )
            )
            return
        image = (layer.metadata.get(STORE_KEY) or {}).get("image")
        if image not in self.viewer.layers:
            notify_error(ScrollsegError(f"the image {image!r} of {layer.name!r} is not open"))
            return
        pair = (image, layer.name)
        if pair not in self.pairs:
            self.pairs.append(pair)
        self._show_pairs()

    def _remove_selected(self) -> None:
        row = self.pair_table.currentRow()
        if 0 <= row < len(self.pairs):
            del self.pairs[row]
            self._show_pairs()

    def _show_pairs(self) -> None:
        self.pair_table.setRowCount(len(self.pairs))
        for row, (image, labels) in enumerate(self.pairs):
            store = self.viewer.layers[labels].data if labels in self.viewer.layers else None
            path = str(store.path) if isinstance(store, AnnotationStore) else labels
            self.pair_table.setItem(row, 0, QTableWidgetItem(image))
            item = QTableWidgetItem(Path(path).name)
            item.setToolTip(path)
            self.pair_table.setItem(row, 1, item)
        try:
            self.classes_label.setText(", ".join(self._classes().names()))
        except ScrollsegError as exc:
            self.classes_label.setText(str(exc))

    def _cases(self) -> list[tuple[Any, AnnotationStore]]:
        cases = []
        for image, labels in self.pairs:
            if image not in self.viewer.layers or labels not in self.viewer.layers:
                raise ScrollsegError(
                    f"layer {image!r} or {labels!r} was closed; remove that pair or reopen it"
                )
            img = self.viewer.layers[image]
            source = str(layer_source(img) or image)
            volume = _LayerVolume(level0(img), img.scale[-3:], img.translate[-3:], source)
            cases.append((volume, self.viewer.layers[labels].data))
        return cases

    def _classes(self) -> Any:
        stores = [
            self.viewer.layers[lab].data for _, lab in self.pairs if lab in self.viewer.layers
        ]
        return common_classes(stores)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "nnUNet_raw folder")
        if path:
            self.out_edit.setText(path)

    # -- export ------------------------------------------------------------------------
    def export(self) -> None:
        """Export the pairs off the GUI thread; verify with nnU-Net when done."""
        if self.progress.running:
            notify_info("an export is running: wait for it, or cancel it")
            return
        self.verdict.setText("")
        self.warning_label.setText("")
        try:
            if not self.out_edit.text().strip():
                raise ScrollsegError("choose the nnUNet_raw output folder first")
            classes = self._classes()
            cases = self._cases()
            for _, store in cases:  # what is exported is what is on disk
                store.save()
            out = Path(self.out_edit.text().strip())
            n = planned_case_count(
                out,
                self.id_spin.value(),
                self.name_edit.text().strip(),
                len(cases),
                append=self.append_check.isChecked(),
            )
        except ScrollsegError as exc:
            notify_error(exc)
            return
        if n < MIN_FOLDS_WARNING:
            self.warning_label.setText(
                f"The dataset will have {n} case(s): nnU-Net's default 5-fold "
                f"cross-validation needs at least {MIN_FOLDS_WARNING}; train fold 'all' "
                "or add cases."
            )
        self.export_button.setEnabled(False)
        self.worker = start_worker(
            iter_export_dataset,
            cases,
            out_dir=out,
            dataset_id=self.id_spin.value(),
            name=self.name_edit.text().strip(),
            classes=classes,
            margin=self.margin_spin.value(),
            norm=self.norm_combo.currentText(),
            ending=self.ending_combo.currentText(),
            append=self.append_check.isChecked(),
            on_done=self._exported,
            on_error=lambda exc: self._finished("export failed: " + str(exc)),
            on_finished=self._idle,
            progress=self.progress,
        )
        # Cancel needs a click, so this connects long before the worker could abort
        self.worker.aborted.connect(lambda: self._finished("export cancelled: nothing written"))

    def _exported(self, dataset: Path) -> None:
        self.dataset = Path(dataset)
        session().last_dataset = self.dataset
        if not self.verify_check.isChecked():
            self._finished(f"wrote {self.dataset} (integrity check not run)")
            return
        self.verdict.setText(f"wrote {self.dataset}; running nnU-Net's integrity check...")
        self.worker = start_worker(
            _verify_job,
            self.dataset,
            on_done=lambda d: self._finished(f"{d.name}: nnU-Net's integrity check passed"),
            on_error=lambda exc: self._finished(f"{self.dataset.name}: {exc}"),
            on_finished=self._idle,
            progress=self.progress,
        )

    def _finished(self, text: str) -> None:
        self.verdict.setText(text)
        if "passed" in text:
            notify_info(text)

    def _idle(self) -> None:
        """A worker has ended: Export again once none runs (the export's own end comes
        after its result, and the integrity check may have started meanwhile)."""
        if not self.progress.running:
            self.export_button.setEnabled(True)


class _LayerVolume:
    """A layer's level-0 array with its geometry, in the engine's Volume shape."""

    def __init__(self, data: Any, scale: Any, translate: Any, name: str) -> None:
        self.data = data
        self.spacing = tuple(float(s) for s in scale)
        self.origin = tuple(float(t) for t in translate)
        self.source = name
