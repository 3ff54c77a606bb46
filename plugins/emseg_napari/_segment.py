"""The Segment widget: run an emseg model on the current slice, the whole stack, or the whole volume.

The work runs in a worker thread (the viewer stays responsive) with a progress bar and a Cancel
button. The result is a Labels layer named ``IMAGE [MODEL]`` with the image's scale, translation
and units, the model's class names as features, and emseg's class colours; optionally one image
layer of probabilities per foreground class. Segmenting one slice of a stack fills that slice of
the result layer (created with the stack's shape), so slices can be segmented one by one.

"Segment volume (ortho)" runs the model over every xy, xz and yz plane of a 3D image and combines
them (:mod:`emseg.infer.volume`; mean or vote), for near-isotropic FIB-SEM/SBF-SEM stacks: it needs the
slice spacing (read from the file, or typed in), and shows the result in napari's 3D view; objects
are then connected across slices and measured in 3D (volume, surface, bounding box).

With "find objects and measure them", the objects of the segmented slices become a second Labels
layer, ``IMAGE [MODEL] objects`` (one label per object, per slice), whose ``features`` are the
measurements of ``emseg measure`` (in nm when the image has a pixel size), and the measurements
panel shows their table, a per-class summary and size histograms. The objects layer holds the
objects of the last run only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ._utils import require_napari

require_napari()

from qtpy.QtWidgets import (  # noqa: E402
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ._jobs import ObjectOptions, Outcome, SegmentRequest, class_fractions, segment  # noqa: E402
from ._utils import (  # noqa: E402
    MODEL_KEY,
    PIXEL_SIZE_KEY,
    Z_SPACING_KEY,
    ModelCache,
    find_layer,
    labels_layer_kwargs,
    notify_warning,
    page_index,
    pixel_size_of,
    scale_mismatch,
    voxel_size_of,
)
from ._widgets import (  # noqa: E402
    JobRunner,
    LayerChooser,
    ModelChooser,
    ProgressRow,
    StatusWidget,
    device_choices,
    fit_width,
    scrolling_layout,
    small_label,
)

log = logging.getLogger(__name__)


def _give_pixel_size(layer, value: float) -> None:
    ndim = layer.ndim
    z = layer.metadata.get(Z_SPACING_KEY) if ndim == 3 else None
    if value > 0:
        layer.scale = ((z,) if z else ()) + (value,) * (ndim - (1 if z else 0))
        layer.units = ("nm",) * ndim
        layer.metadata[PIXEL_SIZE_KEY] = float(value)
    else:
        layer.scale = (1.0,) * ndim
        layer.units = ("pixel",) * ndim
        layer.metadata[PIXEL_SIZE_KEY] = None


class SegmentWidget(StatusWidget):
    """Dock widget: model, image layer, tiling, TTA, device; Segment slice / Segment stack; Cancel."""

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from napari.layers import Image
        self.viewer = napari_viewer
        self.models = ModelCache()
        self.runner = JobRunner(self)
        self.last_message = ""
        self.last_layer = None

        self.model = ModelChooser()
        self.model_info = small_label()
        self.image = LayerChooser(napari_viewer, Image)
        self.image.setToolTip("The greyscale image or stack to segment")
        self.pixel_size = QDoubleSpinBox()
        self.pixel_size.setDecimals(4)
        self.pixel_size.setRange(0.0, 10_000.0)
        self.pixel_size.setSpecialValueText("unknown")
        self.pixel_size.setSuffix(" nm/px")
        self.pixel_size.setKeyboardTracking(False)
        self.pixel_size.setToolTip("The image layer's pixel size, read from the file. Set it when the file has "
                                   "none: it becomes the layer's scale (and the scale bar's)")
        self.z_spacing = QDoubleSpinBox()
        self.z_spacing.setDecimals(3)
        self.z_spacing.setRange(0.0, 100_000.0)
        self.z_spacing.setSpecialValueText("unknown")
        self.z_spacing.setSuffix(" nm")
        self.z_spacing.setKeyboardTracking(False)
        self.z_spacing.setToolTip("Distance between the slices of a 3D image, read from the file. Needed for "
                                  "'Segment volume (ortho)'; it becomes the scale of the layer's slice axis")
        self.combine = QComboBox()
        self.combine.addItems(["mean", "vote"])
        self.combine.setToolTip("How 'Segment volume (ortho)' combines the xy, xz and yz planes: the mean of their "
                                "probabilities, or the class two of the three directions agree on")
        self.tile = QSpinBox()
        self.tile.setRange(32, 4096)
        self.tile.setSingleStep(32)
        self.tile.setValue(512)
        self.tile.setSuffix(" px")
        self.tile.setToolTip("Tile side in pixels (a multiple of 32). Smaller tiles need less GPU memory")
        self.overlap = QSpinBox()
        self.overlap.setRange(0, 2048)
        self.overlap.setSingleStep(16)
        self.overlap.setValue(64)
        self.overlap.setSuffix(" px")
        self.overlap.setToolTip("Overlap between tiles; the tiles are blended, so seams disappear")
        self.tta = QCheckBox("test-time augmentation (8x slower)")
        self.tta.setToolTip("Average the predictions of the 8 flips/rotations: smoother, fewer errors")
        self.device = QComboBox()
        self.device.addItems(device_choices())
        self.device.setToolTip("auto: the GPU when there is one, else the CPU")
        self.probabilities = QCheckBox("also add class probabilities")
        self.rescale = QCheckBox("match the model's pixel size")
        self.rescale.setChecked(True)
        self.rescale.setToolTip("Rescale the image to the pixel size the model was trained at (when both "
                                "are known), and the result back. Untick to segment at the image's pixels")
        self.objects = QCheckBox("find objects and measure them")
        self.objects.setToolTip("Number the objects of every foreground class (connected pixels, per slice) and "
                                "measure them: area, diameter, axes, shape, intensity, in nm when the pixel size "
                                "is known. Adds an objects layer and the measurements panel")
        self.object_classes = QLineEdit()
        self.object_classes.setToolTip("Comma-separated classes to find objects of; empty: every foreground class. "
                                       "Filled from the model, without membrane-like classes (a membrane network "
                                       "is not a set of objects)")
        self.split = QCheckBox("split touching objects")
        self.split.setToolTip("Separate touching objects at their necks (distance transform + watershed)")
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 10_000_000)
        self.min_size.setSuffix(" px")
        self.min_size.setSpecialValueText("keep all")
        self.min_size.setToolTip("Drop objects smaller than this many pixels (specks)")
        self.objects.toggled.connect(self._on_objects_toggled)
        self._on_objects_toggled(False)
        self.measurements = None
        self.last_objects_layer = None

        form = QFormLayout()
        form.addRow("Model", self.model)
        form.addRow(self.model_info)
        form.addRow("Image", self.image)
        form.addRow("Pixel size", self.pixel_size)
        form.addRow("Slice spacing", self.z_spacing)
        form.addRow("Tile size", self.tile)
        form.addRow("Overlap", self.overlap)
        form.addRow("Device", self.device)
        form.addRow("Ortho planes", self.combine)
        form.addRow("", self.rescale)
        form.addRow("", self.tta)
        form.addRow("", self.probabilities)
        form.addRow("Objects", self.objects)
        form.addRow("Object classes", self.object_classes)
        form.addRow("", self.split)
        form.addRow("Min. size", self.min_size)

        self.slice_button = QPushButton("Segment slice")
        self.slice_button.setToolTip("Segment the slice shown in the viewer")
        self.stack_button = QPushButton("Segment stack")
        self.stack_button.setToolTip("Segment every slice of the image")
        self.volume_button = QPushButton("Segment volume (ortho)")
        self.volume_button.setToolTip("Whole volume (ortho-plane): segment every xy, xz and yz plane of a 3D image "
                                      "and combine them; for near-isotropic FIB-SEM/SBF-SEM stacks. Shown in 3D")
        buttons = QHBoxLayout()
        buttons.addWidget(self.slice_button)
        buttons.addWidget(self.stack_button)
        buttons.addWidget(self.volume_button)
        self.progress = ProgressRow("Cancel")
        self.status = small_label()

        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.slice_button.clicked.connect(lambda: self.run(whole_stack=False))
        self.stack_button.clicked.connect(lambda: self.run(whole_stack=True))
        self.volume_button.clicked.connect(lambda: self.run(ortho=True))
        self.progress.button.clicked.connect(self.cancel)
        self.model.changed.connect(self._on_model_changed)
        self.image.currentIndexChanged.connect(lambda _i: self._show_pixel_size())
        self.pixel_size.valueChanged.connect(self._set_pixel_size)
        self.z_spacing.valueChanged.connect(self._set_z_spacing)
        self._show_pixel_size()
        self.runner.started.connect(lambda: self._set_running(True))
        self.runner.finished.connect(lambda: self._set_running(False))
        self._on_model_changed()
        fit_width(self)

    # -- state --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.runner.running

    def _set_running(self, running: bool) -> None:
        for w in (self.slice_button, self.stack_button, self.model, self.image, self.tile, self.overlap,
                  self.device, self.tta, self.probabilities, self.rescale, self.pixel_size, self.objects,
                  self.combine, self.volume_button, self.z_spacing):
            w.setEnabled(not running)
        if not running:
            self._show_pixel_size()  # the volume controls only for a 3D image
        self._on_objects_toggled(self.objects.isChecked() and not running)
        self.progress.button.setEnabled(running)
        if running:
            self.progress.set(0.0, "starting…")

    def _on_objects_toggled(self, on: bool) -> None:
        for w in (self.split, self.min_size, self.object_classes):
            w.setEnabled(on)

    def _on_model_changed(self) -> None:
        """Show the model's classes and take its tile size and overlap."""
        from emseg.model.modelfile import load_card
        path = self.model.path()
        if path is None:
            self.model_info.setText("No model file yet: choose one with … (or fine-tune one in the "
                                    "Fine-tune widget)")
            return
        try:
            card = load_card(path)
        except Exception as exc:  # noqa: BLE001 - shown, not raised: the user picks another
            self.model_info.setText(f"⚠ {exc}")
            return
        scale = f", trained at {card.pixel_size_nm:.3g} nm/px" if card.pixel_size_nm else ""
        self.model_info.setText(f"{card.encoder}: {', '.join(card.classes)}{scale}")
        from emseg.analysis.metrics import boundary_class_of
        boundary = boundary_class_of(card.classes)
        self.object_classes.setText(", ".join(c for i, c in enumerate(card.classes) if i and i != boundary))
        self.tile.setValue(card.tile_size)
        self.overlap.setValue(card.overlap)

    def _show_pixel_size(self) -> None:
        image = self.image.layer()
        value = pixel_size_of(image) if image is not None else None
        self.pixel_size.blockSignals(True)
        self.pixel_size.setValue(value or 0.0)
        self.pixel_size.blockSignals(False)
        self.pixel_size.setEnabled(image is not None and not self.running)
        volume = image is not None and not image.rgb and image.ndim == 3
        self.z_spacing.blockSignals(True)
        self.z_spacing.setValue(float(image.metadata.get(Z_SPACING_KEY) or 0.0) if volume else 0.0)
        self.z_spacing.blockSignals(False)
        self.z_spacing.setEnabled(volume and not self.running)
        self.volume_button.setEnabled(volume and not self.running)

    def _set_z_spacing(self, value: float) -> None:
        """Give the 3D image layer (and the layers of its shape and scale) the slice spacing typed in."""
        image = self.image.layer()
        if image is None or image.ndim != 3:
            return
        old = tuple(image.scale)
        for layer in self.viewer.layers:
            if layer.name == image.name or (layer.ndim == 3 and tuple(layer.data.shape) == tuple(image.data.shape)
                                            and tuple(layer.scale) == old):
                layer.metadata[Z_SPACING_KEY] = float(value) if value > 0 else None
                if value > 0 and pixel_size_of(layer):
                    layer.scale = (float(value), *tuple(layer.scale)[1:])

    def _set_pixel_size(self, value: float) -> None:
        """Give the image layer the pixel size typed in: its scale, units and emseg metadata.

        Layers of the same shape that shared the image's old pixel size (its labels, scribbles,
        a ground truth) get it too, so that they stay aligned and the scale bar keeps its unit.
        """
        image = self.image.layer()
        if image is None:
            return
        old = pixel_size_of(image)
        shape = tuple(image.data[0].shape if image.multiscale else image.data.shape)
        for layer in self.viewer.layers:
            same = tuple(layer.data[0].shape if layer.multiscale else layer.data.shape) == shape
            if layer.name == image.name or (same and pixel_size_of(layer) == old):
                _give_pixel_size(layer, value)
        self.viewer.reset_view()

    # -- actions ------------------------------------------------------------------------------

    def cancel(self) -> None:
        if self.running:
            self.runner.stop()
            self.progress.set(self.progress.bar.value() / 1000, "cancelling…")

    def run(self, whole_stack: bool = True, *, ortho: bool = False) -> bool:
        """Start segmenting (``ortho``: the whole volume through its three plane directions); returns False
        (after a notification) when the inputs are not usable."""
        if self.running:
            return False
        image = self.image.layer()
        if image is None:
            self._message("No image layer to segment: open an image (File > Open, or File > Open Sample "
                          "> emseg) and choose it under Image", error=True)
            return False
        model_path = self.model.path()
        if model_path is None:
            self._message("No model chosen: pick a model file with … next to Model", error=True)
            return False
        data = image.data[0] if image.multiscale else image.data
        if image.rgb or data.ndim not in (2, 3):
            self._message(f"'{image.name}' has shape {tuple(data.shape)}{' (RGB)' if image.rgb else ''}; emseg "
                          "segments greyscale 2D images and 3D stacks (pages, height, width)", error=True)
            return False
        if self.tile.value() % 32:
            self._message(f"Tile size {self.tile.value()} is not a multiple of 32; choose "
                          f"{max(32, self.tile.value() // 32 * 32)}", error=True)
            return False
        voxel = None
        if ortho:
            if data.ndim != 3:
                self._message(f"'{image.name}' is a 2D image; 'Segment volume (ortho)' needs a 3D stack", error=True)
                return False
            voxel = voxel_size_of(image)
            if voxel is None:
                self._message(f"'{image.name}': the voxel size is unknown; set the pixel size and the slice "
                              "spacing above (nm), then segment the volume again", error=True)
                return False
            from emseg.errors import InputError
            from emseg.infer.volume import check_volume
            try:
                check_volume(data.shape, voxel, f"'{image.name}'")
            except InputError as exc:
                self._message(str(exc).replace("--planes xy", "'Segment stack'").replace("--voxel-size Z,Y,X",
                              "the slice spacing"), error=True)
                return False
        pages = None
        if data.ndim == 3 and not whole_stack and not ortho:
            pages = [page_index(image, self.viewer.dims.point)]
        pixel_size = pixel_size_of(image) if self.rescale.isChecked() else None
        if pixel_size is not None:
            from emseg.model.modelfile import load_card
            try:
                mismatch = scale_mismatch(pixel_size, load_card(model_path).pixel_size_nm)
            except Exception:  # noqa: BLE001 - the job reports a broken model file
                mismatch = None
            if mismatch:
                notify_warning(f"'{image.name}': {mismatch}")
                pixel_size = None
        object_classes = tuple(c.strip() for c in self.object_classes.text().split(",") if c.strip()) or None
        if self.objects.isChecked() and object_classes:
            from emseg.model.modelfile import load_card
            try:
                known = load_card(model_path).classes
            except Exception:  # noqa: BLE001 - the job reports a broken model file
                known = object_classes
            unknown = [c for c in object_classes if c not in known]
            if unknown:
                self._message(f"Object classes {', '.join(unknown)} are not classes of {model_path.stem} "
                              f"({', '.join(known[1:])}); correct them or leave the field empty for all", error=True)
                return False
        request = SegmentRequest(
            model_path=model_path, image=data, pages=pages, pixel_size_nm=pixel_size,
            tile=self.tile.value(), overlap=min(self.overlap.value(), self.tile.value() - 1), tta=self.tta.isChecked(),
            device=self.device.currentText(), probabilities=self.probabilities.isChecked(),
            objects=ObjectOptions(split=self.split.isChecked(), min_size_px=self.min_size.value(),
                                  classes=object_classes) if self.objects.isChecked() else None,
            measure_pixel_size_nm=pixel_size_of(image), ortho=ortho, voxel_size_nm=voxel,
            combine=self.combine.currentText())
        what = "the whole stack" if data.ndim == 3 and pages is None else (
            f"slice {pages[0] + 1}" if pages else "the image")
        what = "the whole volume (ortho-plane)" if ortho else what

        def job(emit, stop):
            return segment(request, self.models.get, progress=lambda f, t: emit((f, t)), stop=stop)

        self.status.setText(f"Segmenting {what} of '{image.name}' with {model_path.stem}…")
        self.runner.start(job, doing=f"Segmenting '{image.name}'",
                          on_progress=lambda p: self.progress.set(*p),
                          on_done=lambda outcome: self._finished(outcome, image, data.shape, ortho))
        return True

    def _finished(self, outcome: Outcome, image, shape: tuple[int, ...], ortho: bool = False) -> None:
        if outcome.cancelled:
            self.progress.set(0.0, "cancelled")
            self._message("Segmentation cancelled; no layer was changed")
            return
        if outcome.error:
            self.progress.set(0.0, "failed")
            self._message(outcome.error, error=True)
            return
        result = outcome.value
        image = find_layer(self.viewer, image.name)
        if image is None:
            self.progress.set(0.0, "image layer removed")
            self._message("The image layer was removed while it was segmented; the result was dropped")
            return
        layer = self._show_labels(result, image, shape)
        if result.probabilities is not None:
            self._show_probabilities(result, image, shape)
        self.last_layer = layer
        self.progress.set(1.0, "done")
        pages = "" if result.pages is None else (
            f"slice {result.pages[0] + 1} of " if len(result.pages) == 1 else f"{len(result.pages)} slices of ")
        found = ""
        if result.objects is not None:
            self.last_objects_layer = self._show_objects(result, image, shape)
            found = f"; {len(result.objects.table)} {'3D ' if ortho else ''}objects measured"
        if ortho:
            pages = "the whole volume (ortho-plane) of "
            self.viewer.dims.ndisplay = 3  # the result in 3D
        self._message(f"Segmented {pages}'{image.name}' with {result.model_path.stem} in {result.seconds:.1f} s "
                      f"({result.device}): {class_fractions(result.labels, result.classes)}{found}")

    # -- results ------------------------------------------------------------------------------

    def _place(self, name: str, kind: type, shape: tuple[int, ...], fill, make):
        """Put ``fill`` into the layer ``name`` when it exists with ``shape``, else add a new one."""
        existing = find_layer(self.viewer, name, kind)
        if existing is not None and existing.data.shape == shape:
            data = np.asarray(existing.data)
            fill(data)
            existing.data = data
            existing.refresh()
            return existing
        return make()

    def _show_labels(self, result, image, shape):
        from napari.layers import Labels
        name = f"{image.name} [{result.model_path.stem}]"
        labels = result.labels

        def fill(data: np.ndarray) -> None:
            if result.pages is None:
                data[...] = labels
            else:
                data[result.pages] = labels

        def make():
            if result.pages is None or len(result.pages) == shape[0]:
                data = labels
            else:
                data = np.zeros(shape, labels.dtype)
                fill(data)
            kwargs = labels_layer_kwargs(result.classes, pixel_size_of(image), len(shape),
                                         z_spacing_nm=image.metadata.get(Z_SPACING_KEY),
                                         **{MODEL_KEY: str(result.model_path)})
            kwargs.update(scale=tuple(image.scale), translate=tuple(image.translate), units=image.units)
            return self.viewer.add_labels(data, name=name, opacity=0.6, **kwargs)

        return self._place(name, Labels, shape, fill, make)

    def _show_objects(self, result, image, shape):
        """The objects layer (replaced by every run) and the measurements panel."""
        from napari.layers import Labels

        from ._measurements import dock_measurements
        objects = result.objects
        labels = objects.instances.labels
        if result.pages is not None and len(result.pages) != shape[0]:
            data = np.zeros(shape, labels.dtype)
            data[result.pages] = labels
        else:
            data = labels
        name = f"{image.name} [{result.model_path.stem}] objects"
        existing = find_layer(self.viewer, name, Labels)
        if existing is not None:
            self.viewer.layers.remove(existing)
        layer = self.viewer.add_labels(
            data, name=name, features=objects.features, scale=tuple(image.scale), translate=tuple(image.translate),
            units=image.units, opacity=0.7, visible=True,
            metadata={PIXEL_SIZE_KEY: pixel_size_of(image), MODEL_KEY: str(result.model_path),
                      Z_SPACING_KEY: image.metadata.get(Z_SPACING_KEY)})
        self.measurements = dock_measurements(self.viewer, self.measurements)
        self.measurements.show_result(objects, layer)
        return layer

    def _show_probabilities(self, result, image, shape) -> None:
        from napari.layers import Image

        from ._utils import label_colors
        colors = label_colors(len(result.classes))
        for k, cls in enumerate(result.classes):
            if k == 0:
                continue
            name = f"{image.name} [{result.model_path.stem}] p({cls})"
            probs = result.probabilities[:, k] if result.probabilities.ndim == 4 else result.probabilities[k]

            def fill(data: np.ndarray, probs=probs) -> None:
                if result.pages is None:
                    data[...] = probs
                else:
                    data[result.pages] = probs

            def make(name=name, probs=probs, k=k, cls=cls):
                data = probs
                if result.pages is not None and len(result.pages) != shape[0]:
                    data = np.zeros(shape, np.float32)
                    data[result.pages] = probs
                from napari.utils.colormaps import Colormap
                cmap = Colormap([[0, 0, 0, 0], list(colors[k])], name=f"emseg class {k}")
                return self.viewer.add_image(
                    data, name=name, scale=tuple(image.scale), translate=tuple(image.translate),
                    units=image.units, colormap=cmap, contrast_limits=(0, 1), blending="additive",
                    visible=False, metadata={"emseg_class": cls, MODEL_KEY: str(result.model_path)})

            self._place(name, Image, shape, fill, make)

    def select_model(self, path: str | Path) -> None:
        """Offer and select a model file (as the … button does)."""
        self.model.add(path)
