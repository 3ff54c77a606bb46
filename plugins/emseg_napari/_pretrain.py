"""The Pretrain widget: self-supervised pretraining on an image layer (``emseg pretrain`` in the viewer).

A lab opens a raw stack it has not annotated, chooses it under Image and presses Start: the U-Net learns
to restore corrupted crops of it, or to fill in hidden patches (the Objective; :mod:`emseg.train.pretrain`), for
the given minutes, with a progress bar, the loss against what the corrupted input scores, and Stop (which keeps
what was learnt).
The run folder (model.safetensors, curves.png, restorations.png) goes into the model folder; the model is
offered as a Base model in Fine-tune (not for segmenting: it has no classes yet), and a picture of clean,
corrupted and restored crops shows in the widget, so a user can see that it learnt something.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ._utils import require_napari

require_napari()

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtGui import QPixmap  # noqa: E402
from qtpy.QtWidgets import (  # noqa: E402
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QWidget,
)

from ._jobs import Outcome, PretrainRequest, pretrain_layer  # noqa: E402
from ._utils import MODELS, pixel_size_of, safe_name, timestamped_model_path, user_model_dir  # noqa: E402
from ._widgets import (  # noqa: E402
    FolderChooser,
    JobRunner,
    LayerChooser,
    TrainingWidget,
    device_choices,
    fit_width,
    spin_box,
)

log = logging.getLogger(__name__)

PICTURE_WIDTH = 360  # px of the restorations (or features) picture in the dock
#: what the validation loss of each objective measures, and what its reference line is
READOUT = {"restoration": ("restoring held-out crops", "the corrupted input itself"),
           "masked": ("filling in the hidden patches of held-out crops", "the masked input itself"),
           "contrastive": ("matching the features of held-out crops' two views", "the untrained network")}


class PretrainWidget(TrainingWidget):
    """Dock widget: image, encoder, minutes, crop and batch size, device, where to save; Start / Stop."""

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from napari.layers import Image

        from emseg.model.networks import DEFAULT_ENCODER, encoder_names
        from emseg.train.pretrain import OBJECTIVES, PretrainConfig
        defaults = PretrainConfig()
        self.viewer = napari_viewer
        self.runner = JobRunner(self)
        self.last_model_path: Path | None = None
        self.last_metrics: dict | None = None
        self._started = 0.0  # time.monotonic() of the run's start

        self.image = LayerChooser(napari_viewer, Image)
        self.image.setToolTip("Raw, unlabelled images: a stack or a single page (every page of a stack is used)")
        self.encoder = QComboBox()
        self.encoder.addItems(encoder_names())
        self.encoder.setCurrentText(DEFAULT_ENCODER)
        self.encoder.setToolTip("The encoder of the model; fine-tuning from it keeps this encoder")
        self.objective = QComboBox()
        self.objective.addItems(OBJECTIVES)
        self.objective.setCurrentText(defaults.objective)
        self.objective.setToolTip("restoration: restore crops spoilt by an intensity curve, shuffled pixels, "
                                  "noise-filled boxes and noise; masked: fill in hidden patches (60 % of 16-px "
                                  "squares); contrastive: the encoder alone learns to give two differently spoilt, "
                                  "turned views of the same place the same features. Contrastive gained about 0.1 IoU "
                                  "on EPFL mitochondria; on ISBI membranes the best start tried gained 0.007 IoU "
                                  "(five seeds); none helped on NASA (docs/training.md)")
        self.minutes = QDoubleSpinBox()
        self.minutes.setRange(0.1, 10_000)
        self.minutes.setDecimals(1)
        self.minutes.setSingleStep(5)
        self.minutes.setValue(defaults.time_limit_minutes)
        self.minutes.setSuffix(" min")
        self.minutes.setToolTip("How long to pretrain: as many steps as fit (thousands a minute on a GPU). "
                                "The best length measured was 20 CPU-minutes (about 4000 steps); longer did worse")
        self.tile = spin_box(32, 1024, defaults.tile_size, step=32, suffix=" px",
                             tip="Side of the corrupted crops (multiple of 32)")
        self.batch = spin_box(1, 512, defaults.batch_size, tip="Crops per step; lower it when the GPU runs out of memory")
        self.device = QComboBox()
        self.device.addItems(device_choices())
        self.folder = FolderChooser(user_model_dir(), title="Save pretrained models in",
                                    tip="Where the run folder (model.safetensors, curves.png, restorations.png) is saved")
        self.name = QLineEdit()
        self.name.setToolTip("The model's name; the run folder is NAME-YYYYmmdd-HHMMSS")

        form = QFormLayout()
        form.addRow("Image", self.image)
        form.addRow("Encoder", self.encoder)
        form.addRow("Objective", self.objective)
        form.addRow("Time", self.minutes)
        form.addRow("Crop size", self.tile)
        form.addRow("Batch size", self.batch)
        form.addRow("Device", self.device)
        form.addRow("Save to", self.folder)
        form.addRow("Name", self.name)

        self.picture = QLabel()
        self.picture.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.picture.setToolTip("Crops of your images: clean, corrupted, and as the model restores them")
        self._lay_out(form, self.picture,
                      status="Teaches a model what your images look like before you annotate: it learns to restore "
                             "corrupted crops of them (or fill in hidden patches). Then choose it as the Base model "
                             "in Fine-tune.")

        self.image.currentIndexChanged.connect(lambda _i: self._default_name())
        self._default_name()
        fit_width(self)

    def _default_name(self) -> None:
        layer = self.image.layer()
        self.name.setText(f"{safe_name(layer.name)}-pretrained" if layer is not None else "pretrained")

    def _inputs(self) -> tuple:
        return (self.image, self.encoder, self.objective, self.minutes, self.tile, self.batch, self.device,
                self.folder, self.name)

    def start(self, *, steps: int | None = None) -> bool:
        """Check the inputs and start pretraining; returns False (after a notification) if not usable.
        ``steps``: at most this many steps (the time limit still holds)."""
        from emseg.errors import InputError
        from emseg.train.pretrain import PretrainConfig, unlabelled_from_arrays
        if self.running:
            return False
        image = self.image.layer()
        if image is None:
            self._message("No image layer: open the raw images you want to pretrain on and choose them under Image",
                          error=True)
            return False
        if self.tile.value() % 32:
            self._message(f"Crop size {self.tile.value()} is not a multiple of 32", error=True)
            return False
        data = image.data[0] if image.multiscale else image.data
        if getattr(image, "rgb", False):
            self._message(f"'{image.name}' is an RGB image; pretraining takes grey-level EM images", error=True)
            return False
        try:  # the checks of the run itself (shape, crop size, masks), on the first page, before the thread
            crop = PretrainConfig(objective=self.objective.currentText(), tile_size=self.tile.value()).crop_size
            unlabelled_from_arrays(data[:1] if data.ndim == 3 else data, tile=crop, name=f"'{image.name}'")
        except (InputError, ValueError) as exc:  # ValueError: settings that do not fit (a crop too small to shift)
            self._message(str(exc), error=True)
            return False
        folder = Path(self.folder.text()).expanduser()
        out_dir = timestamped_model_path(folder, self.name.text() or "pretrained").with_suffix("")
        request = PretrainRequest(image=data, out_dir=out_dir, encoder=self.encoder.currentText(),
                                  objective=self.objective.currentText(), minutes=self.minutes.value(), steps=steps,
                                  tile_size=self.tile.value(),
                                  batch_size=self.batch.value(), device=self.device.currentText(),
                                  pixel_size_nm=pixel_size_of(image),
                                  val_every=min(steps, PretrainConfig.val_every) if steps else None,
                                  name=self.name.text() or "pretrained", layer_name=image.name)
        self.last_metrics = None
        self.readout.setText("")
        self.picture.clear()
        self.status.setText(f"Pretraining on '{image.name}' for {self.minutes.value():g} min…")
        self._started = time.monotonic()

        def job(emit, stop):
            return pretrain_layer(request, progress=emit, stop=stop)

        self.runner.start(job, doing="Pretraining", on_progress=self._on_event, on_done=self._finished)
        return True

    def _on_event(self, event) -> None:
        elapsed = time.monotonic() - self._started
        limit = self.minutes.value() * 60
        fraction = max(event.step / max(event.total_steps, 1), min(elapsed / limit, 1.0))
        text = f"step {event.step} · {elapsed / 60:.1f} of {limit / 60:g} min"
        self.progress.set(fraction, text)
        if event.metrics is not None:
            self.last_metrics = event.metrics
        line = f"{text} · loss {event.loss:.4f}"
        if self.last_metrics:
            what, reference = READOUT[self.objective.currentText()]
            line += (f" · {what}: {self.last_metrics['val_loss']:.4f} ({reference}: "
                     f"{self.last_metrics['copy_loss']:.4f}; lower is better)")
        self.readout.setText(line)

    def _finished(self, outcome: Outcome) -> None:
        if outcome.error:
            self.progress.set(0.0, "failed")
            self._message(outcome.error + " — nothing was saved", error=True)
            return
        if outcome.cancelled or outcome.value.path is None:
            self.progress.set(0.0, "stopped")
            self._message("Stopped before the first step; no model was saved")
            return
        result = outcome.value
        self.last_model_path = result.path
        self.progress.set(1.0, "stopped, saved" if result.stopped else "done, saved")
        MODELS.add(result.path, select=False)
        if result.restorations is not None:
            picture = QPixmap(str(result.restorations))
            if not picture.isNull():
                self.picture.setPixmap(picture.scaledToWidth(PICTURE_WIDTH, Qt.TransformationMode.SmoothTransformation))
        learnt = ""
        if result.validation_loss is not None and result.copy_loss:
            what, reference = READOUT[result.objective]
            learnt = f"; {what}: a loss of {result.validation_loss:.4f}, against {result.copy_loss:.4f} for {reference}"
        self._message(f"{'Stopped' if result.stopped else 'Finished'} after {result.steps_done} steps "
                      f"({result.seconds / 60:.1f} min{learnt}). Saved {result.path.parent}; choose "
                      f"'{result.path.parent.name}' as the Base model in Fine-tune to train your classes from it")
