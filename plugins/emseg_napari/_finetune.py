"""The Fine-tune widget: train a model on scribbles painted in a Labels layer, in a worker thread.

Workflow: choose a base model (or "new model" with an encoder), the image, and a Labels layer
of sparse annotations ("New scribble layer" makes one: label 0 = not annotated, label k = class
k - 1 of the class table, whose names can be edited and whose rows pick the paint label). Start
trains for the given number of steps with a live loss / IoU readout and progress bar, and shows
the current model's prediction of the current slice in a preview layer at every validation.
Stop (or the end) saves the best model so far as a new file (the base model file is never
written) in the model folder and selects it in every Segment widget.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ._utils import require_napari

require_napari()

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtGui import QColor, QIcon, QPixmap  # noqa: E402
from qtpy.QtWidgets import (  # noqa: E402
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHeaderView,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from emseg.train import FINETUNE_DEFAULTS  # noqa: E402

from ._jobs import FinetuneRequest, Outcome, check_annotations, finetune  # noqa: E402
from ._utils import (  # noqa: E402
    CLASSES_KEY,
    MODELS,
    Z_SPACING_KEY,
    find_layer,
    labels_layer_kwargs,
    layer_kwargs,
    layer_position,
    model_label,
    page_index,
    pixel_size_of,
    safe_name,
    scribble_colors,
    scribble_features,
    timestamped_model_path,
    user_model_dir,
)
from ._widgets import (  # noqa: E402
    FolderChooser,
    JobRunner,
    LayerChooser,
    ModelChooser,
    TrainingWidget,
    device_choices,
    fit_width,
    form_row,
    spin_box,
)

log = logging.getLogger(__name__)

SCRIBBLES_KEY = "emseg_scribbles"
DEFAULT_NEW_CLASSES = ("background", "foreground")


class FinetuneWidget(TrainingWidget):
    """Dock widget: base model, image, scribbles, classes, steps; Start / Stop; live readout."""

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from napari.layers import Image, Labels

        from emseg.model.networks import DEFAULT_ENCODER, encoder_names
        self.viewer = napari_viewer
        self.runner = JobRunner(self)
        self.last_message = ""
        self.last_model_path: Path | None = None
        self.last_metrics: dict | None = None
        self.preview_layer = None
        self._preview_page: int | None = None
        self._preview_target = None

        self.base = ModelChooser(allow_new=True, follow=False)
        self.encoder = QComboBox()
        self.encoder.addItems(encoder_names())
        self.encoder.setCurrentText(DEFAULT_ENCODER)
        self.encoder.setToolTip("The encoder of a new model (`emseg models` lists their size and cost)")
        self.image = LayerChooser(napari_viewer, Image)
        self.annotations = LayerChooser(napari_viewer, Labels)
        self.annotations.setToolTip("A Labels layer with your scribbles: 0 = not annotated, "
                                    "label k = the k-th class of the table")
        self.new_scribbles = QPushButton("New scribble layer")
        self.new_scribbles.setToolTip("Add an empty Labels layer over the image to paint on")
        self.dense = QCheckBox("complete mask")
        self.dense.setToolTip("Tick when the layer is a complete ground-truth mask (0 is the first class), "
                              "not scribbles")

        self.classes = QTableWidget(0, 2)
        self.classes.setHorizontalHeaderLabels(["label", "class name"])
        self.classes.verticalHeader().setVisible(False)
        self.classes.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.classes.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.classes.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.classes.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.classes.setMinimumHeight(100)
        self.classes.setMaximumHeight(150)
        self.classes.setToolTip("Click a row to paint that class; double-click a name to rename it")
        self.add_class = QPushButton("+ class")
        self.remove_class = QPushButton("− class")

        self.steps = spin_box(10, 1_000_000, FINETUNE_DEFAULTS["steps"], step=50, tip="Training steps (batches)")
        self.batch = spin_box(1, 128, 4, tip="Crops per step; lower it when the GPU runs out of memory")
        self.tile = spin_box(64, 1024, 256, step=32, suffix=" px", tip="Side of the training crops (multiple of 32)")
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(0.0, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setSpecialValueText("auto")  # 0: by whether the classes change
        self.lr.setValue(0.0)
        self.lr.setToolTip(f"Learning rate (AdamW, with warm-up and cosine decay). auto: {FINETUNE_DEFAULTS['lr']:g} "
                           f"when the base model's classes are kept, {FINETUNE_DEFAULTS['new_task_lr']:g} for other "
                           "classes, a pretrained base or a new model (docs/training.md, \"Fine-tuning that pays\")")
        self.val_every = spin_box(1, 100_000, 50, step=10, tip="Validate, keep the best model and refresh "
                               "the preview every this many steps")
        self.device = QComboBox()
        self.device.addItems(device_choices())
        self.ortho = QCheckBox("learn from all three planes (a 3D volume)")
        self.ortho.setToolTip("Train on the xy, xz and yz planes of the annotated volume (paint slices in any "
                              "direction), so that the model also knows xz/yz slices, as 'Segment volume (ortho)' "
                              "shows them. Needs a 3D image with a pixel size and slice spacing")
        self.freeze = QCheckBox("freeze the encoder")
        self.freeze.setToolTip("Train only the decoder: faster, and safer with very few scribbles")
        self.blend = QCheckBox("blend with the base model")
        self.blend.setChecked(True)
        self.blend.setToolTip("When the base model's classes are kept: average the fine-tuned weights with the "
                              "base's (WiSE-FT), keeping the share of the base (0, 25, 50 or 75 %) that scores best "
                              "on the held-out part of your annotation (none when the base alone scores far below "
                              "the fine-tuned model there); it keeps what the base knew where your images are like "
                              "its own (docs/training.md, \"Fine-tuning that pays\"). Other classes start a fresh "
                              "output: nothing to blend")
        self.self_train = QCheckBox("learn from the unannotated slices too")
        self.self_train.setToolTip("Self-training, for a stack with a few slices annotated: halfway through, the "
                                   "model labels the other slices itself where it is at least 90 % sure and learns "
                                   "from them too. On two ISBI slices it raised the membrane IoU (with a worse "
                                   "Rand error); on mitochondria it did worse, on a superalloy no better "
                                   "(docs/training.md, \"Tenth attempt\")")
        self.folder = FolderChooser(user_model_dir(), title="Save fine-tuned models in",
                                    tip="Where the fine-tuned model file is saved")
        self.name = QLineEdit()
        self.name.setToolTip("The model's name; the file is NAME-YYYYmmdd-HHMMSS.safetensors")

        form = QFormLayout()
        form.addRow("Base model", self.base)
        form.addRow("Encoder", self.encoder)
        form.addRow("Image", self.image)
        form.addRow("Annotations", self.annotations)
        form.addRow("", form_row(self.new_scribbles, self.dense))
        form.addRow("Classes", self.classes)
        form.addRow("", form_row(self.add_class, self.remove_class))
        form.addRow("Steps", self.steps)
        form.addRow("Batch size", self.batch)
        form.addRow("Crop size", self.tile)
        form.addRow("Learning rate", self.lr)
        form.addRow("Preview every", self.val_every)
        form.addRow("Device", self.device)
        form.addRow("", self.freeze)
        form.addRow("", self.blend)
        form.addRow("", self.ortho)
        form.addRow("", self.self_train)
        form.addRow("Save to", self.folder)
        form.addRow("Name", self.name)

        self._lay_out(form)

        self.base.changed.connect(self._on_base_changed)
        self.new_scribbles.clicked.connect(self.make_scribble_layer)
        self.add_class.clicked.connect(lambda: self._append_class(f"class_{self.classes.rowCount()}"))
        self.remove_class.clicked.connect(self._remove_class)
        self.classes.itemChanged.connect(lambda _item: self._sync_layer_classes())
        self.classes.itemSelectionChanged.connect(self._on_class_selected)
        self.annotations.currentIndexChanged.connect(lambda _i: self._on_annotations_changed())
        self.dense.toggled.connect(lambda _on: self._fill_label_column())
        self._on_base_changed()
        fit_width(self)

    # -- classes ------------------------------------------------------------------------------

    def class_names(self) -> tuple[str, ...]:
        names = []
        for row in range(self.classes.rowCount()):
            item = self.classes.item(row, 1)
            names.append(item.text().strip() if item is not None else "")
        return tuple(names)

    def set_classes(self, names) -> None:
        self.classes.blockSignals(True)
        self.classes.setRowCount(0)
        for name in names:
            self._append_class(name, sync=False)
        self.classes.blockSignals(False)
        self._fill_label_column()

    def _append_class(self, name: str, sync: bool = True) -> None:
        row = self.classes.rowCount()
        self.classes.insertRow(row)
        value = QTableWidgetItem("")
        value.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
        self.classes.setItem(row, 0, value)
        self.classes.setItem(row, 1, QTableWidgetItem(name))
        if sync:
            self._fill_label_column()

    def _remove_class(self) -> None:
        if self.classes.rowCount() > 2:
            self.classes.removeRow(self.classes.rowCount() - 1)
            self._fill_label_column()

    def label_of(self, class_index: int) -> int:
        """The paint label of class ``class_index`` (k + 1 for scribbles, k for a complete mask)."""
        return class_index if self.dense.isChecked() else class_index + 1

    def _fill_label_column(self) -> None:
        colors = scribble_colors(self.classes.rowCount())
        self.classes.blockSignals(True)
        for row in range(self.classes.rowCount()):
            item = self.classes.item(row, 0)
            label = self.label_of(row)
            item.setText(str(label))
            r, g, b, a = colors[row + 1] if not self.dense.isChecked() else colors.get(label + 1, colors[None])
            swatch = QPixmap(14, 14)
            swatch.fill(QColor.fromRgbF(r, g, b, 1.0))
            item.setIcon(QIcon(swatch))  # an icon stays visible when the row is selected
        self.classes.blockSignals(False)
        self._sync_layer_classes()

    def _sync_layer_classes(self) -> None:
        """Give an emseg scribble layer the table's class names and colours."""
        layer = self.annotations.layer()
        if layer is None or not layer.metadata.get(SCRIBBLES_KEY):
            return
        names = self.class_names()
        layer.features = scribble_features(names)
        layer.metadata[CLASSES_KEY] = list(names)
        from napari.utils.colormaps import DirectLabelColormap
        layer.colormap = DirectLabelColormap(color_dict=scribble_colors(len(names)))

    def _on_class_selected(self) -> None:
        layer = self.annotations.layer()
        rows = self.classes.selectionModel().selectedRows()
        if layer is None or not rows:
            return
        layer.selected_label = self.label_of(rows[0].row())
        layer.mode = "paint"
        self.viewer.layers.selection.active = layer

    def _on_annotations_changed(self) -> None:
        layer = self.annotations.layer()
        if layer is None:
            return
        if layer.metadata.get(SCRIBBLES_KEY):
            self.dense.setChecked(False)
        elif CLASSES_KEY in layer.metadata:  # an emseg result or ground truth: a complete mask
            self.dense.setChecked(True)

    def _on_base_changed(self) -> None:
        from emseg.model.modelfile import load_card
        path = self.base.path()
        self.encoder.setEnabled(self.base.is_new())
        self._base_has_classes = False  # a segmentation model to blend the result with (not new, not pretrained)
        self.blend.setEnabled(False)
        if self.base.is_new() or path is None:
            if not self.class_names():
                self.set_classes(DEFAULT_NEW_CLASSES)
            self.name.setText("new-model")
            return
        try:
            card = load_card(path)
        except Exception as exc:  # noqa: BLE001 - shown; the user picks another
            self.status.setText(f"⚠ {exc}")
            return
        self.encoder.setCurrentText(card.encoder)
        stem = path.stem.split("-finetuned")[0]
        if card.is_pretrained:  # emseg pretrain: no classes yet; the model gets a fresh head for these
            if not self.class_names():
                self.set_classes(DEFAULT_NEW_CLASSES)
            self.status.setText(f"{path.name}: pretrained on unlabelled images; its encoder and decoder are kept, "
                                "with a new output for your classes")
            self.name.setText(f"{safe_name(model_label(path))}-trained")
            return
        self.set_classes(card.classes)
        self.name.setText(f"{safe_name(stem)}-finetuned")
        self._base_has_classes = True
        self.blend.setEnabled(True)

    # -- layers -------------------------------------------------------------------------------

    def make_scribble_layer(self):
        """Add an empty scribble layer over the chosen image and select it for painting."""
        image = self.image.layer()
        if image is None:
            self._message("No image layer: open an image first, then press 'New scribble layer'", error=True)
            return None
        data = image.data[0] if image.multiscale else image.data
        names = self.class_names()
        kwargs = layer_kwargs(pixel_size_of(image), data.ndim, image.metadata.get(Z_SPACING_KEY))
        kwargs["metadata"].update({SCRIBBLES_KEY: True, CLASSES_KEY: list(names)})
        from napari.utils.colormaps import DirectLabelColormap
        dtype = np.uint8 if len(names) < 255 else np.uint16
        layer = self.viewer.add_labels(
            np.zeros(data.shape, dtype), name=f"{image.name} scribbles", scale=tuple(image.scale),
            translate=tuple(image.translate), units=image.units, metadata=kwargs["metadata"],
            features=scribble_features(names), colormap=DirectLabelColormap(color_dict=scribble_colors(len(names))))
        layer.brush_size = max(3, int(min(data.shape[-2:]) / 100))
        layer.mode = "paint"
        layer.selected_label = 1
        self.dense.setChecked(False)
        self.annotations.set_layer(layer)
        self.viewer.layers.selection.active = layer
        self._message(f"Paint on '{layer.name}': label 1 = {names[0]}, 2 = {names[1]}… (click a class row "
                      "to pick its label); 0 erases. Then press Start")
        return layer

    def _show_preview(self, preview: np.ndarray) -> None:
        """Put the preview of the current slice into the preview layer (made on first use)."""
        from napari.layers import Labels
        image = find_layer(self.viewer, self._preview_target or "")
        if image is None:
            return
        data = image.data[0] if image.multiscale else image.data
        name = f"{image.name} preview"
        layer = find_layer(self.viewer, name, Labels)
        if layer is None or layer.data.shape != data.shape:
            kwargs = labels_layer_kwargs(self.class_names(), pixel_size_of(image), data.ndim)
            kwargs.update(scale=tuple(image.scale), translate=tuple(image.translate), units=image.units)
            if layer is not None:
                self.viewer.layers.remove(name)
            layer = self.viewer.add_labels(np.zeros(data.shape, preview.dtype), name=name, opacity=0.5, **kwargs)
            # keep the scribbles on top, so that painting stays visible
            annotations = self.annotations.layer()
            if annotations is not None:
                self.viewer.layers.move(layer_position(self.viewer, name),
                                        layer_position(self.viewer, annotations.name))
                self.viewer.layers.selection.active = annotations
        if data.ndim == 3:
            layer.data[self._preview_page] = preview
        else:
            layer.data[...] = preview
        layer.refresh()
        self.preview_layer = layer

    # -- running ------------------------------------------------------------------------------

    def _inputs(self) -> tuple:
        return (self.base, self.encoder, self.image, self.annotations, self.new_scribbles, self.dense,
                self.add_class, self.remove_class, self.steps, self.batch, self.tile, self.lr, self.val_every,
                self.device, self.freeze, self.blend, self.folder, self.name, self.ortho)

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        if not running:
            self.encoder.setEnabled(self.base.is_new())
            self.blend.setEnabled(self._base_has_classes)

    def start(self) -> bool:
        """Check the inputs and start training; returns False (after a notification) if not usable."""
        from emseg.errors import InputError
        if self.running:
            return False
        image, annotations = self.image.layer(), self.annotations.layer()
        if image is None:
            self._message("No image layer: open the image you want to train on and choose it under Image",
                          error=True)
            return False
        if annotations is None:
            self._message("No annotation layer: press 'New scribble layer', paint a few strokes of each "
                          "class, then press Start", error=True)
            return False
        data = image.data[0] if image.multiscale else image.data
        # a copy: painting may go on while the model trains
        labels = np.array(annotations.data[0] if annotations.multiscale else annotations.data)
        names = self.class_names()
        if len(names) < 2 or len(set(names)) != len(names) or not all(names):
            self._message("The classes need at least two distinct, non-empty names", error=True)
            return False
        if labels.shape != tuple(data.shape):
            self._message(f"'{annotations.name}' has shape {labels.shape} but '{image.name}' has "
                          f"{tuple(data.shape)}; paint on a layer of the image's shape ('New scribble layer')",
                          error=True)
            return False
        try:
            check_annotations(labels, names, sparse=not self.dense.isChecked(), name=f"'{annotations.name}'")
        except InputError as exc:
            self._message(str(exc), error=True)
            return False
        if self.tile.value() % 32:
            self._message(f"Crop size {self.tile.value()} is not a multiple of 32", error=True)
            return False
        voxel = None
        if self.ortho.isChecked():
            from ._utils import voxel_size_of
            voxel = voxel_size_of(image)
            if data.ndim != 3 or voxel is None:
                self._message(f"'{image.name}': learning from all three planes needs a 3D image with a known pixel "
                              "size and slice spacing (set them in the Segment widget)", error=True)
                return False
        page = page_index(image, self.viewer.dims.point) if data.ndim == 3 else None
        self._preview_page, self._preview_target = page, image.name
        preview_source = data[page] if page is not None else data
        folder = Path(self.folder.text()).expanduser()
        request = FinetuneRequest(
            image=data, labels=labels, classes=names,
            out_path=timestamped_model_path(folder, self.name.text() or "model"),
            base_path=None if self.base.is_new() else self.base.path(),
            encoder=self.encoder.currentText(), sparse=not self.dense.isChecked(), steps=self.steps.value(),
            batch_size=self.batch.value(), tile_size=self.tile.value(), lr=self.lr.value() or None,
            val_every=self.val_every.value(), device=self.device.currentText(),
            freeze_encoder=self.freeze.isChecked(), base_share=None if self.blend.isChecked() else 0.0,
            pixel_size_nm=pixel_size_of(image),
            preview_page=np.asarray(preview_source), name=self.name.text() or "model",
            layer_name=annotations.name, planes="ortho" if voxel else "xy", voxel_size_nm=voxel,
            self_train=self.self_train.isChecked())
        if request.base_path is None and not self.base.is_new():
            self._message("No base model: choose one, or 'new model'", error=True)
            return False
        self.last_metrics = None
        self.readout.setText("")
        base = request.base_path.stem if request.base_path else f"a new {request.encoder} model"
        self.status.setText(f"Training {base} on '{annotations.name}'…")

        def job(emit, stop):
            return finetune(request, progress=emit, stop=stop)

        self.runner.start(job, doing="Fine-tuning", on_progress=self._on_event, on_done=self._finished)
        return True

    def _on_event(self, event) -> None:
        text = f"step {event.step}/{event.total_steps}"
        self.progress.set(event.step / max(event.total_steps, 1), text)
        if event.metrics is not None:
            self.last_metrics = event.metrics
        line = f"{text} · loss {event.loss:.3f}"
        if self.last_metrics and self.last_metrics.get("mean_iou") is not None:
            ious = ", ".join(f"{k} {v:.2f}" for k, v in self.last_metrics["iou"].items() if v is not None)
            line += f" · held-out IoU {self.last_metrics['mean_iou']:.3f} ({ious})"
        elif event.step >= self.val_every.value() and self.last_metrics is None:
            line += (" · no held-out scribbles: paint some in the right-hand fifth of a slice to "
                     "measure the IoU")
        self.readout.setText(line)
        if event.preview is not None:
            self._show_preview(event.preview)

    def _finished(self, outcome: Outcome) -> None:
        if outcome.error:
            self.progress.set(0.0, "failed")
            self._message(outcome.error + " — nothing was saved; the viewer's layers are unchanged", error=True)
            return
        result = outcome.value
        if result.path is None:
            self.progress.set(0.0, "stopped")
            self._message("Stopped before the first step; no model was saved")
            return
        self.last_model_path = result.path
        self.progress.set(1.0, "stopped, saved" if result.stopped else "done, saved")
        MODELS.add(result.path, select=True)
        best = f", held-out IoU {result.held_out_iou:.3f}" if result.held_out_iou is not None else ""
        blend = (f"; blended with the base model, {result.base_share:.0%} of its weights kept"
                 if result.base_share else "")
        self._message(f"{'Stopped' if result.stopped else 'Finished'} after {result.steps_done} steps "
                      f"({result.seconds:.0f} s{best}{blend}). Saved {result.path}; it is selected in the Segment "
                      "widget: segment again to see the result")

