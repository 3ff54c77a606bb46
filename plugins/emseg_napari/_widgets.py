"""Qt building blocks shared by the Segment, Fine-tune and Pretrain widgets.

* :class:`LayerChooser`: a combo box of the viewer's layers of one type, kept in sync.
* :class:`ModelChooser`: a combo box of model files (:data:`emseg_napari._utils.MODELS`) with a
  browse button, optionally with a "new model" entry.
* :class:`JobRunner`: runs a Qt-free job (see :mod:`emseg_napari._jobs`) in a napari
  ``thread_worker``, relays its plain-callback progress to the GUI thread through a Qt signal,
  and stops it through a ``threading.Event``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._utils import load_torch_beside_opengl, require_napari

require_napari()
load_torch_beside_opengl()

from qtpy.QtCore import QEvent, QObject, Qt, Signal  # noqa: E402
from qtpy.QtWidgets import (  # noqa: E402
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._jobs import Outcome, run_job  # noqa: E402
from ._utils import MODEL_SUFFIX, MODELS, notify  # noqa: E402

log = logging.getLogger(__name__)

NEW_MODEL = "new model"


class StatusWidget(QWidget):
    """A dock widget with a status line (``self.status``) whose messages also go to napari's notifications."""

    last_message = ""

    def _message(self, text: str, *, error: bool = False) -> None:
        self.last_message = text
        self.status.setText(("⚠ " if error else "") + text)
        notify(text, error=error)


class TrainingWidget(StatusWidget):
    """A dock widget that runs one training job (Fine-tune, Pretrain). The subclass makes ``self.runner``
    (:class:`JobRunner`) and its form, calls :meth:`_lay_out`, defines ``start()`` and lists in ``_inputs()`` the
    widgets to lock while the job runs."""

    def _inputs(self) -> tuple:
        return ()

    def _lay_out(self, form, *below: QWidget, status: str = "") -> None:
        """The dock's layout: ``form``, Start / Stop and save, the progress bar, the readout and status lines,
        then ``below``; Start and Stop wired to ``start()`` and ``stop()``."""
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop and save")
        self.stop_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        self.progress = ProgressRow("Stop")
        self.progress.button.hide()
        self.readout = small_label("")
        self.status = small_label(status)
        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        for widget in (self.progress, self.readout, self.status, *below):
            layout.addWidget(widget)
        layout.addStretch(1)
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.runner.started.connect(lambda: self._set_running(True))
        self.runner.finished.connect(lambda: self._set_running(False))

    @property
    def running(self) -> bool:
        return self.runner.running

    def _set_running(self, running: bool) -> None:
        for w in (self.start_button, *self._inputs()):
            w.setEnabled(not running)
        self.stop_button.setEnabled(running)
        if running:
            self.progress.set(0.0, "starting…")

    def stop(self) -> None:
        """Stop after the current step; the job saves what it has."""
        if self.running:
            self.runner.stop()
            self.stop_button.setEnabled(False)
            self.progress.set(self.progress.bar.value() / 1000, "stopping after this step…")


class FolderChooser(QWidget):
    """A folder path box with a "…" button that opens a folder dialog titled ``title``."""

    def __init__(self, folder: Path, *, title: str, tip: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self.edit = QLineEdit(str(folder))
        self.edit.setToolTip(tip)
        self.button = QPushButton("…")
        self.button.setFixedWidth(32)
        self.button.clicked.connect(self._choose)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit, 1)
        layout.addWidget(self.button)

    def text(self) -> str:
        return self.edit.text()

    def setText(self, text: str) -> None:  # noqa: N802 - Qt's naming, as QLineEdit's
        self.edit.setText(text)

    def _choose(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, self.title, self.edit.text())
        if folder:
            self.edit.setText(folder)


def spin_box(low: int, high: int, value: int, *, step: int = 1, suffix: str = "", tip: str = "") -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    if suffix:
        box.setSuffix(suffix)
    if tip:
        box.setToolTip(tip)
    return box


def form_row(*widgets, stretch_first: bool = False) -> QWidget:
    """Widgets side by side in one row of a form (all stretching alike, or only the first)."""
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    for i, w in enumerate(widgets):
        layout.addWidget(w, 1 if (stretch_first and i == 0) or not stretch_first else 0)
    return row


def device_choices() -> list[str]:
    """``auto``, ``cpu``, and the accelerators torch can use here."""
    import torch
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices.append("cuda")
        if torch.cuda.device_count() > 1:
            choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    return choices


def scrolling_layout(widget: QWidget) -> QVBoxLayout:
    """Give ``widget`` a scroll area and return the layout inside it.

    napari stacks dock widgets; without scrolling a tall form is squeezed until its rows overlap.
    """
    content = QWidget()
    inner = QVBoxLayout(content)
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(content)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    content.installEventFilter(_FitWidth(widget))
    return inner


class _FitWidth(QObject):
    """Re-fit the scrolling widget's width whenever its content's layout or style changes."""

    def __init__(self, widget: QWidget) -> None:
        super().__init__(widget)
        self._widget = widget

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() in (QEvent.Type.LayoutRequest, QEvent.Type.StyleChange, QEvent.Type.FontChange,
                            QEvent.Type.Show):
            fit_width(self._widget)
        return False


def fit_width(widget: QWidget) -> None:
    """Make ``widget`` (built with :func:`scrolling_layout`) at least as wide as its content needs."""
    scroll = widget.findChild(QScrollArea)
    if scroll is not None and scroll.widget() is not None:
        need = scroll.widget().minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width()
        widget.setMinimumWidth(need)


def small_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return label


class LayerChooser(QComboBox):
    """The viewer's layers of ``layer_type`` by name; follows additions, removals and renames."""

    def __init__(self, viewer, layer_type: type, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed,
                      viewer.layers.events.moved):
            event.connect(self._on_layers_changed)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _on_layers_changed(self, event=None) -> None:
        value = getattr(event, "value", None)
        if value is not None and hasattr(value, "events") and getattr(event, "type", "") == "inserted":
            value.events.name.connect(self.refresh)
        self.refresh()

    def layers(self) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, self.layer_type)]

    def refresh(self, event=None) -> None:
        """Re-list the layers, keeping the current one (or taking the newest when it is gone)."""
        try:
            current = self.currentText()
            names = [layer.name for layer in self.layers()]
            self.blockSignals(True)
            self.clear()
            self.addItems(names)
            if current in names:
                self.setCurrentIndex(names.index(current))
            elif names:
                self.setCurrentIndex(len(names) - 1)
            self.blockSignals(False)
            self.currentIndexChanged.emit(self.currentIndex())
        except RuntimeError:  # the Qt widget is gone but the viewer still calls
            pass

    def layer(self):
        """The chosen layer, or None.

        Layers are found by name (unique in napari): plugin widgets see the viewer through a
        proxy that wraps each layer anew, so layer objects cannot be compared by identity.
        """
        name = self.currentText()
        return next((layer for layer in self.layers() if layer.name == name), None)

    def set_layer(self, layer) -> None:
        self.refresh()
        index = self.findText(layer.name)
        if index >= 0:
            self.setCurrentIndex(index)


class ModelChooser(QWidget):
    """Model files (default, user folder, added this session) plus a "…" browse button.

    With ``follow``, a model announced with ``MODELS.add(path, select=True)`` becomes the choice.
    """

    changed = Signal()

    def __init__(self, *, allow_new: bool = False, follow: bool = True, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.allow_new = allow_new
        self.follow = follow  # select models that other widgets announce (a fine-tuned one)
        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(12)
        self.combo.setToolTip("The model to use: the bundled default, models you fine-tuned "
                              "(saved in the model folder), or a model file (…)")
        self.browse = QPushButton("…")
        self.browse.setToolTip(f"Choose an emseg model file ({MODEL_SUFFIX} or a model folder)")
        self.browse.setFixedWidth(32)
        self.browse.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.browse)
        self.combo.currentIndexChanged.connect(lambda _i: self.changed.emit())
        MODELS.connect(self._on_models_changed)
        self.destroyed.connect(lambda *_: MODELS.disconnect(self._on_models_changed))
        self.refresh()

    def refresh(self, select: Path | None = None) -> None:
        """Re-list the models; keep the current choice, or select ``select``.

        ``changed`` is emitted only when the choice changes (not when the list grows).
        """
        before = (self.is_new(), self.path())
        first = self.combo.count() == 0
        keep_new = select is None and self.is_new()
        if select is None and first and self.follow:
            select = MODELS.latest  # a model fine-tuned earlier in this session
        target = str(select) if select is not None else (str(self.path()) if self.path() else None)
        self.combo.blockSignals(True)
        self.combo.clear()
        if self.allow_new:
            self.combo.addItem(NEW_MODEL, None)
        for label, path in MODELS.entries():
            self.combo.addItem(label, str(path))
            self.combo.setItemData(self.combo.count() - 1, str(path), Qt.ItemDataRole.ToolTipRole)
        index = self.combo.findData(target) if target is not None and not keep_new else -1
        if index < 0:
            index = 1 if (self.allow_new and not keep_new and self.combo.count() > 1) else 0
        self.combo.setCurrentIndex(index)
        self.combo.blockSignals(False)
        if first or (self.is_new(), self.path()) != before:
            self.changed.emit()

    def _on_models_changed(self, select: Path | None) -> None:
        self.refresh(select if self.follow else None)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose an emseg model file", "",
                                              f"emseg models (*{MODEL_SUFFIX});;All files (*)")
        if path:
            self.add(path)

    def add(self, path: str | Path) -> None:
        """Offer ``path`` (in every widget) and select it here."""
        MODELS.add(path, select=False)
        self.refresh(Path(path))

    def path(self) -> Path | None:
        """The chosen model file, or None for "new model" (or when there is none)."""
        data = self.combo.currentData()
        return Path(data) if data else None

    def is_new(self) -> bool:
        return self.allow_new and self.combo.currentIndex() == 0


class _Bridge(QObject):
    progress = Signal(object)


class JobRunner(QObject):
    """One background job at a time, with progress relayed to ``on_progress`` in the GUI thread."""

    started = Signal()
    finished = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._bridge = _Bridge()
        self._handler: Callable[[Any], None] | None = None
        self._bridge.progress.connect(self._relay)
        self.worker = None
        self.stop_event = threading.Event()
        from qtpy.QtWidgets import QApplication
        app = QApplication.instance()
        if app is not None:  # quitting napari stops the job instead of waiting for it
            app.aboutToQuit.connect(self.stop)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, job: Callable[[Callable[[Any], None], threading.Event], Any], *, doing: str,
              on_progress: Callable[[Any], None], on_done: Callable[[Outcome], None]) -> None:
        """Run ``job(emit, stop_event)`` in a worker thread; ``on_done(outcome)`` runs in the GUI thread."""
        from napari.qt.threading import create_worker

        if self.running:
            raise RuntimeError("a job is already running")
        self.stop_event = threading.Event()
        stop, emit = self.stop_event, self._bridge.progress.emit
        self._handler = on_progress

        def work() -> Outcome:
            return run_job(lambda: job(emit, stop), doing)

        worker = create_worker(work, _start_thread=False)
        worker.returned.connect(lambda outcome: self._done(outcome, on_done))
        worker.errored.connect(lambda exc: self._done(Outcome(error=f"{doing}: {exc}"), on_done))
        self.worker = worker
        self.started.emit()
        worker.start()

    def stop(self) -> None:
        self.stop_event.set()

    def _relay(self, payload: Any) -> None:
        if self._handler is not None and self.worker is not None:
            self._handler(payload)

    def _done(self, outcome: Outcome, on_done: Callable[[Outcome], None]) -> None:
        self.worker = None
        self._handler = None
        try:
            on_done(outcome)
        finally:
            self.finished.emit()


class ProgressRow(QWidget):
    """A progress bar with a Cancel/Stop button."""

    def __init__(self, button_text: str = "Cancel", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.bar.setFormat("idle")
        self.button = QPushButton(button_text)
        self.button.setEnabled(False)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar, 1)
        layout.addWidget(self.button)

    def set(self, fraction: float, text: str) -> None:
        self.bar.setValue(int(round(1000 * min(max(fraction, 0.0), 1.0))))
        self.bar.setFormat(text)
