"""Annotate dock widget: sparse labels with an ignore brush, backed by an annotation store.

Each action is one call on :class:`~napari_scrollseg.engine.annotations.AnnotationStore`:
the labels layer's data *is* the store (lazy: only painted chunks exist in memory and on
disk), so napari's own brush, fill, undo and redo paint through it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QButtonGroup,
    QColorDialog,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_scrollseg.engine.annotations import (
    AnnotationStore,
    ClassTable,
    default_store_path,
)
from napari_scrollseg.engine.errors import ScrollsegError
from napari_scrollseg.widgets._common import (
    ProgressRow,
    image_layers,
    layer_source,
    level0,
    notify_error,
    notify_info,
    pick_image_layer,
    start_worker,
)

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels

DEFAULT_CLASSES = "air,papyrus,ink"
AUTOSAVE_SECONDS = 30
STORE_KEY = "scrollseg_annotation"  # labels layer metadata: {"path", "image"}
KEYS_HELP = "Keys (on the annotation layer): 1..9 class, I ignore, E eraser (unlabeled)"
IGNORE = -1  # brush id of the ignore brush (its value is the store's ignore value)
ERASER = 0


def _save_quietly(store: AnnotationStore) -> None:
    """Last-chance save (viewer closing, app quitting); never raises."""
    try:
        store.save()
    except Exception as exc:  # the app is going away: log, do not raise into Qt
        import logging

        logging.getLogger(__name__).error("could not save %s: %s", store.path, exc)


class AnnotateWidget(QWidget):
    """Pick an image, open or create its annotation store, paint classes / ignore / eraser."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.store: AnnotationStore | None = None
        self.layer: Labels | None = None
        self.image: Image | None = None
        self._saved_at: float | None = None
        self._shown_counts: Any = None
        self._otsu_worker: Any = None

        # -- source and store
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._image_changed)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("<volume>.annotations.zarr")
        self.classes_edit = QLineEdit(DEFAULT_CLASSES)
        self.classes_edit.setToolTip("class names for ids 1..K of a new store, comma separated")
        self.new_button = QPushButton("New")
        self.open_button = QPushButton("Open")
        browse = QPushButton("...")
        browse.setToolTip("choose the store folder")
        self.new_button.clicked.connect(self.new_store)
        self.open_button.clicked.connect(self.open_store)
        browse.clicked.connect(self._browse)
        self.store_status = QLabel("no annotation store")
        self.store_status.setWordWrap(True)
        source = QGroupBox("Image and annotation store")
        form = QFormLayout(source)
        form.addRow("image", self.image_combo)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit)
        path_row.addWidget(browse)
        form.addRow("store", path_row)
        form.addRow("new classes", self.classes_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.new_button)
        buttons.addWidget(self.open_button)
        form.addRow(buttons)
        form.addRow(self.store_status)

        # -- class table and brushes
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["id", "name", "colour"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(140)
        self.table.itemChanged.connect(self._item_changed)
        self.table.cellDoubleClicked.connect(self._cell_double_clicked)
        self.add_edit = QLineEdit()
        self.add_edit.setPlaceholderText("new class name")
        self.add_button = QPushButton("Add")
        self.remove_button = QPushButton("Remove")
        self.import_button = QPushButton("Import JSON")
        self.export_button = QPushButton("Export JSON")
        self.add_button.clicked.connect(lambda: self.add_class(self.add_edit.text()))
        self.remove_button.clicked.connect(self._remove_selected)
        self.import_button.clicked.connect(lambda: self.import_classes())
        self.export_button.clicked.connect(lambda: self.export_classes())
        self.brushes = QButtonGroup(self)
        self.brushes.setExclusive(True)
        self.brushes.idClicked.connect(self.select_brush)
        self.brush_box = QWidget()
        self.brush_layout = QHBoxLayout(self.brush_box)
        self.brush_layout.setContentsMargins(0, 0, 0, 0)
        classes = QGroupBox("Classes and brushes")
        classes.setToolTip(KEYS_HELP)
        grid = QGridLayout(classes)
        grid.addWidget(self.table, 0, 0, 1, 4)
        grid.addWidget(self.add_edit, 1, 0, 1, 2)
        grid.addWidget(self.add_button, 1, 2)
        grid.addWidget(self.remove_button, 1, 3)
        grid.addWidget(self.import_button, 2, 0, 1, 2)
        grid.addWidget(self.export_button, 2, 2, 1, 2)
        grid.addWidget(self.brush_box, 3, 0, 1, 4)
        grid.addWidget(QLabel(KEYS_HELP), 4, 0, 1, 4)

        # -- Otsu start
        self.above_combo = QComboBox()
        self.middle_combo = QComboBox()
        self.middle_combo.setToolTip("a class here makes three bands (multi-Otsu)")
        self.below_combo = QComboBox()
        self.z_from = QSpinBox()
        self.z_to = QSpinBox()
        self.otsu_button = QPushButton("Fill unlabeled voxels from Otsu")
        self.otsu_button.clicked.connect(self.otsu_fill)
        self.otsu_progress = ProgressRow()
        otsu = QGroupBox("Otsu start (threshold of the whole volume)")
        oform = QFormLayout(otsu)
        oform.addRow("bright band", self.above_combo)
        oform.addRow("middle band (multi-Otsu)", self.middle_combo)
        oform.addRow("dark band", self.below_combo)
        zrow = QHBoxLayout()
        zrow.addWidget(self.z_from)
        zrow.addWidget(QLabel("to"))
        zrow.addWidget(self.z_to)
        oform.addRow("slices z", zrow)
        oform.addRow(self.otsu_button)
        oform.addRow(self.otsu_progress)

        # -- save and counts
        self.autosave_spin = QSpinBox()
        self.autosave_spin.setRange(1, 3600)
        self.autosave_spin.setValue(AUTOSAVE_SECONDS)
        self.autosave_spin.setSuffix(" s")
        self.autosave_spin.valueChanged.connect(lambda s: self.autosave.setInterval(s * 1000))
        self.save_button = QPushButton("Save now")
        self.save_button.clicked.connect(self.save)
        self.save_status = QLabel("")
        self.counts_label = QLabel("")
        self.counts_label.setWordWrap(True)
        self.slice_list = QListWidget()
        self.slice_list.setMaximumHeight(90)
        self.slice_list.itemClicked.connect(self._jump_to_slice)
        state = QGroupBox("Saving and counts")
        sform = QFormLayout(state)
        srow = QHBoxLayout()
        srow.addWidget(QLabel("autosave every"))
        srow.addWidget(self.autosave_spin)
        srow.addWidget(self.save_button)
        sform.addRow(srow)
        sform.addRow(self.save_status)
        sform.addRow(self.counts_label)
        sform.addRow("annotated z slices", self.slice_list)

        layout = QVBoxLayout(self)
        for box in (source, classes, otsu, state):
            layout.addWidget(box)
        layout.addStretch(1)

        self.autosave = QTimer(self)
        self.autosave.setInterval(AUTOSAVE_SECONDS * 1000)
        self.autosave.timeout.connect(self._autosave_tick)
        self.autosave.start()
        self.status_timer = QTimer(self)  # status text and counts after undo / redo
        self.status_timer.setInterval(1000)
        self.status_timer.timeout.connect(self.refresh_status)
        self.status_timer.start()

        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.viewer.layers.events.moved.connect(self._refresh_images)
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._save_on_exit)
        self._refresh_images()
        self._show_store()

    # -- source ------------------------------------------------------------------------
    def _refresh_images(self, event: Any = None) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in image_layers(self.viewer)]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        if self.image_combo.currentText() != current:
            self._image_changed(self.image_combo.currentText())

    def _image_changed(self, name: str) -> None:
        if not name:
            return
        layer = self.viewer.layers[name]
        path = self.default_path(layer)
        self.path_edit.setText(str(path))
        if self.store is None or self.image is not layer:
            hint = "existing store: Open resumes it" if path.exists() else "New creates it"
            self.store_status.setText(f"{path.name}: {hint}")

    def default_path(self, layer: Image) -> Path:
        """The store path offered for ``layer``: remembered, else beside its volume."""
        remembered = layer.metadata.get(STORE_KEY) if isinstance(layer.metadata, dict) else None
        if remembered:
            return Path(remembered)
        source = layer_source(layer)
        if source is None:
            return Path.cwd() / f"{layer.name}.annotations.zarr"
        return default_store_path(source)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Annotation store (.zarr folder)")
        if path:
            self.path_edit.setText(path)

    # -- store -------------------------------------------------------------------------
    def new_store(self) -> None:
        """Create the store at the path field for the chosen image, with the class names."""
        try:
            image = pick_image_layer(self.viewer, self.image_combo.currentText() or None)
            data = level0(image)
            store = AnnotationStore.create(
                self.path_edit.text().strip(),
                shape=data.shape,
                spacing=tuple(float(s) for s in image.scale[-3:]),
                origin=tuple(float(t) for t in image.translate[-3:]),
                classes=ClassTable.from_names(self.classes_edit.text()),
                dtype="uint8",
            )
        except ScrollsegError as exc:
            notify_error(exc)
            return
        self._use(store, image)

    def open_store(self) -> None:
        """Open the store at the path field and check it matches the chosen image."""
        try:
            image = pick_image_layer(self.viewer, self.image_combo.currentText() or None)
            path = self.path_edit.text().strip()
            if not path:
                raise ScrollsegError("give the store's path (a .zarr folder) first")
            store = AnnotationStore.open(path)
            shape = tuple(int(s) for s in level0(image).shape)
            if store.shape != shape:
                raise ScrollsegError(
                    f"annotation {Path(path).name} has shape {store.shape} but image "
                    f"{image.name!r} has {shape}; open the image it was made for or choose "
                    "another store"
                )
        except ScrollsegError as exc:
            notify_error(exc)
            return
        self._use(store, image)

    def _use(self, store: AnnotationStore, image: Image) -> None:
        self.close_store()
        self.store, self.image = store, image
        image.metadata[STORE_KEY] = str(store.path)
        self.layer = self.viewer.add_labels(
            store,
            name=f"{image.name} annotations",
            scale=image.scale[-3:],
            translate=image.translate[-3:],
            opacity=0.6,
            metadata={STORE_KEY: {"path": str(store.path), "image": image.name}},
        )
        self.layer.events.paint.connect(self._painted)
        self._bind_keys(self.layer)
        self.layer.mode = "paint"
        self._saved_at = time.time()
        self._show_store()
        self.select_brush(1)

    def close_store(self) -> None:
        """Save and let go of the current store (its layer is removed)."""
        store, layer = self.store, self.layer
        if store is None:
            return
        self.save()
        self.store = self.layer = None
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
        self._show_store()

    def _layer_removed(self, event: Any) -> None:
        if event.value is self.layer and self.store is not None:
            self.save()
            self.store = self.layer = None
            self._show_store()
        self._refresh_images()

    def _save_on_exit(self) -> None:
        if self.store is not None:
            _save_quietly(self.store)

    def closeEvent(self, event: Any) -> None:
        self._save_on_exit()
        super().closeEvent(event)

    # -- saving ------------------------------------------------------------------------
    def save(self) -> int:
        """Write the painted chunks now; return how many were written."""
        if self.store is None:
            return 0
        try:
            written = self.store.save()
        except (ScrollsegError, OSError) as exc:
            notify_error(
                exc if isinstance(exc, ScrollsegError) else ScrollsegError(f"save failed: {exc}")
            )
            return 0
        self._saved_at = time.time()
        self.refresh_status()
        return written

    def _autosave_tick(self) -> None:
        if self.store is not None and self.store.unsaved:
            self.save()

    def refresh_status(self) -> None:
        """Update "saved hh:mm:ss" / "unsaved changes" and the counts (if they changed)."""
        store = self.store
        if store is None:
            self.save_status.setText("")
            return
        if store.unsaved:
            self.save_status.setText("unsaved changes")
        elif self._saved_at is not None:
            self.save_status.setText(
                "saved " + time.strftime("%H:%M:%S", time.localtime(self._saved_at))
            )
        self.update_counts()

    def _painted(self, event: Any = None) -> None:
        self.save_status.setText("unsaved changes")
        self.update_counts()

    # -- counts ------------------------------------------------------------------------
    def update_counts(self) -> None:
        """Show voxels per class and annotated slices (running counts: no volume scan)."""
        if self.store is None:
            return
        counts = self.store.counts()
        if counts == self._shown_counts:
            return
        self._shown_counts = counts
        names = {c.id: c.name for c in self.store.classes.classes}
        names[self.store.ignore_value] = "ignore"
        parts = [f"{names.get(v, v)}: {n:,}" for v, n in sorted(counts.voxels.items())]
        axes = ", ".join(f"{a}: {len(s)}" for a, s in zip("zyx", counts.slices))
        self.counts_label.setText(
            ("voxels: " + " | ".join(parts) if parts else "nothing painted yet")
            + f"\nannotated slices: {axes}"
        )
        self.slice_list.clear()
        for z in counts.slices[0]:
            item = QListWidgetItem(f"z = {z}")
            item.setData(Qt.ItemDataRole.UserRole, z)
            self.slice_list.addItem(item)

    def _jump_to_slice(self, item: QListWidgetItem) -> None:
        z = int(item.data(Qt.ItemDataRole.UserRole))
        if self.layer is None:
            return
        axis = self.viewer.dims.ndim - 3
        world = self.layer.data_to_world([z, 0, 0])[0]
        self.viewer.dims.set_point(axis, world)

    # -- class table -------------------------------------------------------------------
    def _show_store(self) -> None:
        store = self.store
        for w in (
            self.add_button,
            self.remove_button,
            self.import_button,
            self.export_button,
            self.otsu_button,
            self.save_button,
        ):
            w.setEnabled(store is not None)
        if store is None:
            self.table.setRowCount(0)
            self._fill_brushes()
            self.counts_label.setText("")
            self.slice_list.clear()
            self._shown_counts = None
            return
        self.store_status.setText(f"annotating {self.image.name!r} into {store.path}")
        self.table.blockSignals(True)
        self.table.setRowCount(len(store.classes))
        for row, c in enumerate(store.classes.classes):
            cid = QTableWidgetItem(str(c.id))
            cid.setFlags(cid.flags() & ~Qt.ItemFlag.ItemIsEditable)
            name = QTableWidgetItem(c.name)
            colour = QTableWidgetItem("")
            colour.setFlags(colour.flags() & ~Qt.ItemFlag.ItemIsEditable)
            colour.setBackground(QColor(*c.color))
            colour.setToolTip("double-click to change the colour")
            for col, item in enumerate((cid, name, colour)):
                self.table.setItem(row, col, item)
        self.table.blockSignals(False)
        self._fill_brushes()
        choices = ["(leave unlabeled)", *(f"{c.id}: {c.name}" for c in store.classes.classes)]
        for combo, default in (
            (self.above_combo, 1),
            (self.middle_combo, 0),
            (self.below_combo, 0),
        ):
            old = combo.currentIndex()
            combo.clear()
            combo.addItems(choices)
            combo.setCurrentIndex(old if 0 <= old < len(choices) else default)
        nz = store.shape[0]
        for spin in (self.z_from, self.z_to):
            spin.setRange(0, nz - 1)
        z = self._current_z()
        self.z_from.setValue(z)
        self.z_to.setValue(z)
        if self.layer is not None:
            self._style_layer()
        self._shown_counts = None
        self.refresh_status()

    def _style_layer(self) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        store, layer = self.store, self.layer
        layer.colormap = DirectLabelColormap(
            color_dict=store.classes.as_napari_colors(ignore=store.ignore_value)
        )
        values = [0, *store.classes.ids(), store.ignore_value]
        layer.features = {
            "index": values,
            "class": ["unlabeled", *store.classes.names(), "ignore"],
        }

    def _current_z(self) -> int:
        if self.layer is None:
            return 0
        z = self.layer.world_to_data(self.viewer.dims.point)[-3]
        return int(min(max(round(float(z)), 0), self.store.shape[0] - 1))

    def _table_changed(self) -> None:
        if self.store is not None:
            self.save_status.setText("unsaved changes")
        self._show_store()

    def add_class(self, name: str, color: tuple[int, int, int] | None = None) -> None:
        """Add a class (next id) to the store's table."""
        if self.store is None:
            return
        try:
            if not name.strip():
                raise ScrollsegError("type the new class's name first")
            self.store.add_class(name, color)
        except ScrollsegError as exc:
            notify_error(exc)
            return
        self.add_edit.clear()
        self._table_changed()

    def rename_class(self, class_id: int, name: str) -> None:
        """Rename a class (its voxels keep their id)."""
        try:
            self.store.rename_class(class_id, name)
        except ScrollsegError as exc:
            notify_error(exc)
        self._table_changed()

    def recolor_class(self, class_id: int, color: tuple[int, int, int]) -> None:
        """Give a class another colour (the layer follows)."""
        try:
            self.store.recolor_class(class_id, color)
        except ScrollsegError as exc:
            notify_error(exc)
        self._table_changed()

    def remove_class(self, class_id: int) -> bool:
        """Remove a class; asks first when it has painted voxels (they become unlabeled)."""
        if self.store is None:
            return False
        n = self.store.counts().voxels.get(class_id, 0)
        if n:
            name = self.store.classes.names()[class_id - 1]
            answer = QMessageBox.question(
                self,
                "Remove class",
                f"Class {name!r} has {n:,} painted voxels. Remove it and make them unlabeled?"
                " (Classes after it move down one id.)",
            )
            if answer != QMessageBox.StandardButton.Yes:
                return False
        try:
            self.store.remove_class(class_id)
        except ScrollsegError as exc:
            notify_error(exc)
            return False
        if self.layer is not None:
            self.layer.refresh()
        self._table_changed()
        return True

    def _remove_selected(self) -> None:
        row = self.table.currentRow()
        if row >= 0:
            self.remove_class(row + 1)

    def _item_changed(self, item: QTableWidgetItem) -> None:
        if item.column() == 1 and self.store is not None:
            self.rename_class(item.row() + 1, item.text())

    def _cell_double_clicked(self, row: int, column: int) -> None:
        if column != 2 or self.store is None:
            return
        color = QColorDialog.getColor(QColor(*self.store.classes.classes[row].color), self)
        if color.isValid():
            self.recolor_class(row + 1, (color.red(), color.green(), color.blue()))

    def import_classes(self, path: str | Path | None = None) -> None:
        """Replace the class table from a JSON file (``{name: {"id", "color"}}``)."""
        if self.store is None:
            return
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Class table", "", "JSON (*.json)")
            if not path:
                return
        try:
            self.store.classes = ClassTable.from_json(path)
        except ScrollsegError as exc:
            notify_error(exc)
            return
        self._table_changed()

    def export_classes(self, path: str | Path | None = None) -> None:
        """Write the class table as JSON."""
        if self.store is None:
            return
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Class table", "classes.json", "JSON (*.json)"
            )
            if not path:
                return
        try:
            self.store.classes.to_json(path)
        except OSError as exc:
            notify_error(ScrollsegError(f"cannot write {path}: {exc}"))
            return
        notify_info(f"class table written to {path}")

    # -- brushes -----------------------------------------------------------------------
    def _fill_brushes(self) -> None:
        for button in self.brushes.buttons():
            self.brushes.removeButton(button)
            button.deleteLater()
        if self.store is None:
            return
        entries = [(c.id, c.name, c.color) for c in self.store.classes.classes]
        entries += [(IGNORE, "ignore", (128, 128, 128)), (ERASER, "eraser", None)]
        for bid, name, color in entries:
            button = QPushButton(name)
            button.setCheckable(True)
            if color is not None:
                button.setStyleSheet(f"QPushButton {{ border-left: 8px solid rgb{tuple(color)}; }}")
            key = {IGNORE: "I", ERASER: "E"}.get(bid, str(bid) if bid <= 9 else "")
            button.setToolTip(f"key {key}" if key else name)
            self.brushes.addButton(button, bid)
            self.brush_layout.addWidget(button)
        selected = self.layer.selected_label if self.layer is not None else 1
        self._check_brush(selected)

    def _check_brush(self, value: int) -> None:
        if self.store is None:
            return
        bid = IGNORE if value == self.store.ignore_value else value
        button = self.brushes.button(bid)
        if button is not None:
            button.setChecked(True)

    def select_brush(self, brush: int) -> None:
        """Paint with class ``brush`` (1..K), ``IGNORE`` (-1) or the eraser (0)."""
        if self.store is None or self.layer is None:
            return
        if brush > len(self.store.classes):
            return
        value = self.store.ignore_value if brush == IGNORE else brush
        self.layer.selected_label = value
        if self.layer.mode not in ("paint", "fill", "polygon"):
            self.layer.mode = "paint"
        self._check_brush(value)

    def _bind_keys(self, layer: Labels) -> None:
        def chooser(brush: int):
            def choose(_layer: Any) -> None:
                self.select_brush(brush)

            return choose

        for k in range(1, 10):
            layer.bind_key(str(k), chooser(k), overwrite=True)
        layer.bind_key("I", chooser(IGNORE), overwrite=True)
        layer.bind_key("E", chooser(ERASER), overwrite=True)

    # -- Otsu --------------------------------------------------------------------------
    def otsu_fill(self) -> None:
        """Fill unlabeled voxels of slices z_from..z_to from the volume's Otsu threshold."""
        if self.store is None or self.image is None:
            return
        above = self.above_combo.currentIndex() or None
        middle = self.middle_combo.currentIndex() or None
        below = self.below_combo.currentIndex() or None
        bands = (below, above) if middle is None else (below, middle, above)
        z0, z1 = sorted((self.z_from.value(), self.z_to.value()))

        def done(thresholds: list[float]) -> None:
            self.otsu_button.setEnabled(True)
            if self.layer is not None:
                self.layer.refresh()
            self._painted()
            shown = ", ".join(f"{t:.4g}" for t in thresholds)
            notify_info(f"Otsu threshold(s) {shown}: slices {z0}..{z1} filled")

        self.otsu_button.setEnabled(False)
        self._otsu_worker = start_worker(
            _otsu_job,
            self.store,
            level0(self.image),
            bands=bands,
            z=z0,
            z_stop=z1 + 1,
            on_done=done,
            on_error=lambda exc: self.otsu_button.setEnabled(True),
            progress=self.otsu_progress,
        )


def _otsu_job(store: AnnotationStore, data: Any, **kwargs: Any):
    """The Otsu start as a worker generator (one engine call, no intermediate events)."""
    yield {"done": 0, "total": 1}
    return store.threshold_fill(data, threshold_from="volume", **kwargs)
