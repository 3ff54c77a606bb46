"""The measurements panel: the objects of a segmentation as a table, a summary and size histograms.

The Segment widget fills it after "find objects and measure them" (see
:func:`emseg_napari._jobs.measure_segmentation`). The same table is the objects Labels layer's
``features`` (so napari's status bar shows an object's measurements under the cursor); here it is
sortable, a click on a row takes the viewer to that object, and "Save CSV…" writes the table and
the per-class summary exactly as ``emseg measure`` does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ._utils import require_napari

require_napari()

from qtpy.QtWidgets import (  # noqa: E402
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._widgets import small_label  # noqa: E402

log = logging.getLogger(__name__)

MAX_ROWS = 5000  # rows shown in the table (the CSV always has all)


class _NumberItem(QTableWidgetItem):
    """A table cell that sorts by its number, not its text."""

    def __init__(self, value) -> None:
        from emseg.analysis.measure import _fmt
        super().__init__(_fmt(value) if not isinstance(value, (float, np.floating)) else
                         ("" if np.isnan(value) else f"{float(value):.4g}"))
        self.value = float(value) if isinstance(value, (int, float, np.integer, np.floating, bool, np.bool_)) else 0.0

    def __lt__(self, other) -> bool:  # noqa: D105 - Qt's sorting hook
        if isinstance(other, _NumberItem):
            return self.value < other.value
        return super().__lt__(other)


class MeasurementsWidget(QWidget):
    """Summary line, one size histogram per class, and the table of objects of the last run."""

    def __init__(self, viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = viewer
        self.result = None
        self.layer = None
        self.summary = small_label()
        self.figure = Figure(figsize=(4.2, 2.4), dpi=90, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.table = QTableWidget()
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setSortingEnabled(True)
        self.table.setToolTip("One row per object; click a row to go to the object. Click a header to sort")
        self.save_button = QPushButton("Save CSV…")
        self.save_button.setToolTip("Write the objects table and the per-class summary as CSV files")
        self.save_button.setEnabled(False)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.canvas)
        layout.addWidget(self.table, 1)
        layout.addLayout(row)
        self.table.itemSelectionChanged.connect(self._on_select)
        self.save_button.clicked.connect(lambda: self.save())

    # -- content ------------------------------------------------------------------------------

    def show_result(self, objects, layer, *, exclude_border: bool = True) -> None:
        """Show the :class:`~emseg_napari._jobs.ObjectsResult` of ``layer`` (the objects Labels layer)."""
        from emseg.analysis.measure import plot_size_histograms, size_classes
        self.result, self.layer, self.exclude_border = objects, layer, exclude_border
        table = objects.table
        self.summary.setText(summary_text(objects.summary, len(table), three_d=table.three_d))
        self.figure.clear()
        classes = size_classes(table)
        axes = self.figure.subplots(len(classes), 1, squeeze=False)[:, 0]
        plot_size_histograms(list(axes), table, exclude_border=exclude_border, title=False)
        self.canvas.setMinimumHeight(150 * len(classes) + 40)
        self.canvas.draw_idle()
        self._fill_table(objects.columns)
        self.save_button.setEnabled(True)

    def _fill_table(self, columns: dict) -> None:
        names = list(columns)
        n = len(columns[names[0]]) if names else 0
        shown = min(n, MAX_ROWS)
        self.table.setSortingEnabled(False)
        self.table.clear()
        self.table.setColumnCount(len(names))
        self.table.setRowCount(shown)
        self.table.setHorizontalHeaderLabels(names)
        for c, name in enumerate(names):
            values = columns[name]
            for r in range(shown):
                self.table.setItem(r, c, _NumberItem(values[r]))
        self.table.setSortingEnabled(True)
        self.table.resizeColumnsToContents()
        if n > shown:
            self.summary.setText(self.summary.text() + f"\n(the table shows the first {shown} of {n} objects; "
                                 "Save CSV… writes all)")

    # -- actions ------------------------------------------------------------------------------

    def _on_select(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if not rows or self.result is None:
            return
        label_item = self.table.item(rows[0].row(), 0)
        if label_item is not None:
            self.go_to(int(label_item.value))

    def go_to(self, label: int) -> None:
        """Select object ``label`` in the objects layer and centre the view on it (its slice too)."""
        if self.layer is None or self.result is None:
            return
        data = self.result.table.data
        k = int(np.flatnonzero(data["label"] == label)[0])
        self.layer.selected_label = label
        scale, translate = np.asarray(self.layer.scale), np.asarray(self.layer.translate)
        y, x = data["centroid_y"][k], data["centroid_x"][k]
        if self.layer.ndim == 3:
            page = int(data["slice"][k])
            self.viewer.dims.set_point(0, page * scale[0] + translate[0])
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = (y * scale[-2] + translate[-2], x * scale[-1] + translate[-1])

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write ``PATH`` (objects) and ``PATH_summary.csv``; asks for a path when none is given."""
        from emseg.analysis.measure import write_csv
        if self.result is None:
            return None
        if path is None:
            name = f"{self.layer.name if self.layer is not None else 'objects'}.csv".replace(" ", "_")
            path, _ = QFileDialog.getSaveFileName(self, "Save the objects table", name, "CSV (*.csv)")
            if not path:
                return None
        path = Path(path).with_suffix(".csv")
        write_csv(path, self.result.columns)
        write_csv(path.with_name(f"{path.stem}_summary.csv"), self.result.summary)
        log.info("wrote %s and its summary", path)
        return path


def summary_text(summary: list[dict], count: int, *, three_d: bool = False) -> str:
    """``42 objects · mitochondrion: 40, median 212 nm, 3.1 % of the area (2 at the border excluded)``;
    for 3D objects: ``42 3D objects``, ``of the volume``."""
    parts = [f"{count} {'3D ' if three_d else ''}objects"]
    where = "volume" if three_d else "area"
    for row in summary:
        unit = "nm" if any(k.endswith("_nm") for k in row if k.startswith("diameter_median")) else "px"
        median = row.get(f"diameter_median_{unit}", np.nan)
        median_text = "" if median is None or np.isnan(median) else f", median diameter {median:.3g} {unit}"
        border = (f" ({row['n_border']} at the border {row['border_objects']})" if row["n_border"] else "")
        parts.append(f"{row['class']}: {row['count']}{median_text}, {100 * row['area_fraction']:.1f} % of the {where}"
                     f"{border}")
    return "\n".join(parts)


def dock_measurements(viewer, panel: MeasurementsWidget | None) -> MeasurementsWidget:
    """``panel`` when it is still alive, else a new one docked on the right of the viewer's window."""
    if panel is not None:
        try:
            panel.isVisible()  # raises once Qt has deleted it (its dock was closed)
            return panel
        except RuntimeError:
            pass
    panel = MeasurementsWidget(viewer)
    window = getattr(viewer, "window", None)
    if window is not None and hasattr(window, "add_dock_widget"):
        window.add_dock_widget(panel, name="emseg measurements", area="right", tabify=True)
    return panel
