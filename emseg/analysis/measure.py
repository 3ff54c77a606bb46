"""Per-object measurements, a summary over inputs, and a histogram/overlay plot (the command: emseg.cli.measure).

Units and conventions:

* Every measurement is made in 2D, per slice, with scikit-image ``regionprops_table``; internally
  in pixels, and converted on output with the pixel size in nm/px: lengths in nm, areas in nm^2.
  When the pixel size is unknown the columns stay in pixels and their names say so
  (``area_px2``, ``equivalent_diameter_px``), never a silent mix.
* One row per object. For 3D objects (:class:`emseg.analysis.objects.Instances` with ``three_d``) the row
  describes the object's largest cross-section: ``slice`` is that slice, ``n_slices`` how many
  slices the object spans; and the object itself (:mod:`emseg.analysis.measure3d`): volume in nm³, surface
  area in nm² (marching cubes), equivalent diameter and sphericity, bounding box (voxel indices),
  in voxels when the voxel size is unknown. A 3D object touching the first or last slice
  ``touches_border`` too.
* ``touches_border`` flags objects that reach the image edge in any slice: their true size is
  unknown. The summary excludes them from counts and size statistics by default and says so in
  its ``border_objects`` column; area fractions always include them (they are pixel fractions).
* Area fraction of a class = pixels of that class's objects / all pixels of the input.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from skimage.measure import regionprops_table

from emseg.analysis.measure3d import add_3d, columns_3d, voxel_size_of
from emseg.analysis.objects import (
    Instances,
    class_names_from_tiff,
    find_instances,
    mask_stem,
    outline_rgb,
    read_pages,
    write_instances,
)
from emseg.errors import InputError

log = logging.getLogger(__name__)

_PROPS = ("label", "area", "equivalent_diameter_area", "perimeter", "axis_major_length", "axis_minor_length",
          "eccentricity", "solidity", "centroid", "bbox")
#: internal name -> (skimage name, power of length: 0 unitless, 1 length, 2 area)
_COLUMNS = {"area": ("area", 2), "equivalent_diameter": ("equivalent_diameter_area", 1),
            "perimeter": ("perimeter", 1), "major_axis": ("axis_major_length", 1),
            "minor_axis": ("axis_minor_length", 1), "eccentricity": ("eccentricity", 0),
            "solidity": ("solidity", 0), "centroid_y": ("centroid-0", 1), "centroid_x": ("centroid-1", 1)}
PERCENTILES = (10, 90)
BORDER_COLOUR = (1.0, 0.0, 1.0)  # magenta: not in the class palette


@dataclass
class ObjectTable:
    """Measurements of one input, in pixel units (see the module docstring).

    ``data`` maps label, class_index, slice, n_slices, the keys of ``_COLUMNS``, mean_intensity
    and touches_border to arrays with one entry per object. ``class_pixels[c]`` counts the pixels
    of class ``c``'s objects; ``total_pixels`` all pixels of the input (all slices).
    """

    name: str
    data: dict[str, np.ndarray]
    pixel_size_nm: float | None
    class_names: tuple[str, ...]
    total_pixels: int
    class_pixels: np.ndarray
    three_d: bool = False
    voxel_size_nm: tuple[float, float, float] | None = None

    def __len__(self) -> int:
        return len(self.data["label"])

    def class_name(self, c: int) -> str:
        """Name of class index ``c`` (``class_c`` beyond the known names)."""
        return self.class_names[c] if c < len(self.class_names) else f"class_{c}"


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """``background, class_1, class_2, ...`` for masks without class names."""
    return ("background", *(f"class_{c}" for c in range(1, num_classes)))


def _measure_page(labels: np.ndarray, image: np.ndarray | None, index: int) -> dict[str, np.ndarray]:
    """regionprops_table of one 2D page, with slice index and border flag."""
    props = _PROPS + (("intensity_mean",) if image is not None else ())
    t = regionprops_table(labels, intensity_image=image, properties=props)
    h, w = labels.shape
    out = {"label": t["label"].astype(np.int64), "slice": np.full(len(t["label"]), index, np.int64)}
    out.update({key: np.asarray(t[name], np.float64) for key, (name, _) in _COLUMNS.items()})
    out["mean_intensity"] = (t["intensity_mean"].astype(np.float64) if image is not None
                             else np.full(len(t["label"]), np.nan))
    out["touches_border"] = ((t["bbox-0"] == 0) | (t["bbox-1"] == 0) | (t["bbox-2"] == h) | (t["bbox-3"] == w))
    return out


def _largest_sections(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Collapse per-slice rows of 3D objects to one row per object (its largest cross-section)."""
    labels = rows["label"]
    order = np.lexsort((-rows["area"], labels))  # by label, largest area first
    first = order[np.r_[True, labels[order][1:] != labels[order][:-1]][:len(order)]]
    out = {k: v[first] for k, v in rows.items()}
    _, inverse = np.unique(labels, return_inverse=True)
    out["n_slices"] = np.bincount(inverse)
    out["touches_border"] = np.bincount(inverse, weights=rows["touches_border"]) > 0
    return out


def measure_objects(instances: Instances, *, image: np.ndarray | None = None, pixel_size_nm: float | None = None,
                    class_names: Sequence[str] | None = None, name: str = "",
                    voxel_size_nm: Sequence[float] | None = None) -> ObjectTable:
    """Measure every object of ``instances`` (pixel units inside, physical units on output).

    Args:
        instances: objects from :func:`emseg.analysis.objects.find_instances`.
        image: the greyscale image of the same shape, for the mean intensity (None: NaN column).
        pixel_size_nm: nm per pixel, or None when unknown (outputs then in px).
        class_names: names by class index (default ``background, class_1, ...``).
        name: the input's name, for the summary.
        voxel_size_nm: ``(z, y, x)`` in nm, for the 3D measurements of 3D objects.

    Returns:
        An :class:`ObjectTable`, one row per object, ordered by label.
    """
    labels = instances.labels
    pages = labels[None] if labels.ndim == 2 else labels
    if image is not None:
        image = np.asarray(image)
        if image.shape != labels.shape:
            raise ValueError(f"{name}: image shape {image.shape} differs from the mask shape {labels.shape}")
        image = image[None] if image.ndim == 2 else image
    per_page = [_measure_page(p, None if image is None else image[i], i) for i, p in enumerate(pages)]
    rows = {k: np.concatenate([r[k] for r in per_page]) for k in per_page[0]}
    rows = _largest_sections(rows) if instances.three_d else {**rows, "n_slices": np.ones(len(rows["label"]), np.int64)}
    voxel = tuple(float(v) for v in voxel_size_nm) if voxel_size_nm is not None else None
    if instances.three_d:
        rows = add_3d(rows, labels, voxel)
    rows["class_index"] = instances.classes[rows["label"]]
    num_classes = max(len(class_names or ()), int(instances.classes.max()) + 1)
    class_pixels = np.bincount(instances.classes[labels.ravel()], minlength=num_classes)
    class_pixels[0] = 0
    names = tuple(class_names) if class_names else default_class_names(num_classes)
    return ObjectTable(name, rows, pixel_size_nm, names, int(labels.size), class_pixels, instances.three_d, voxel)


def object_columns(table: ObjectTable, pixel_size_nm: float | None = None) -> dict[str, np.ndarray]:
    """The output columns of a table, converted to nm (or kept in px when no pixel size is known).

    Args:
        table: measurements.
        pixel_size_nm: override the table's pixel size (None: use the table's).

    Returns:
        Column name -> values, in the order written to the CSV.
    """
    px = pixel_size_nm or table.pixel_size_nm
    d = table.data
    cols: dict[str, np.ndarray] = {
        "label": d["label"], "class": np.array([table.class_name(int(c)) for c in d["class_index"]], dtype=object),
        "class_index": d["class_index"], "slice": d["slice"]}
    if table.three_d:
        cols["n_slices"] = d["n_slices"]
    for key, (_, power) in _COLUMNS.items():
        name = f"{key}_{'nm' if px else 'px'}{'2' if power == 2 else ''}" if power else key
        cols[name] = d[key] * (px ** power if px and power else 1.0)
    if table.three_d and "volume" in d:
        cols.update(columns_3d(d, table.voxel_size_nm is not None))
    cols["mean_intensity"] = d["mean_intensity"]
    cols["touches_border"] = d["touches_border"].astype(bool)
    return cols


def _fmt(value) -> str:
    """CSV text of one value: integers as such, floats to 8 significant digits, NaN as empty."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else format(float(value), ".8g")
    return str(value)


def write_csv(path: str | os.PathLike, columns: dict[str, Sequence] | list[dict],
              header: Sequence[str] = ()) -> Path:
    """Write columns (name -> values) or rows (dicts with the same keys) to a CSV file, atomically;
    ``header``: the column names to write when there are no rows."""
    from emseg.io.write import atomic_output
    if not isinstance(columns, dict):
        columns = {k: [r[k] for r in columns] for k in (columns[0] if columns else header)}
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        writer.writerows([[_fmt(v) for v in row] for row in zip(*columns.values())])
    return Path(path)


def _unit(tables: Sequence[ObjectTable]) -> str:
    return "nm" if tables and all(t.pixel_size_nm for t in tables) else "px"


def summary_fields(unit: str) -> list[str]:
    """The columns of :func:`summarize`'s rows, diameters in ``unit``."""
    return ["input", "class", "count", "n_border", "border_objects", "area_fraction", f"diameter_mean_{unit}",
            f"diameter_median_{unit}", *(f"diameter_p{p}_{unit}" for p in PERCENTILES), "pixel_size_nm"]


def write_summary(path: str | os.PathLike, tables: Sequence[ObjectTable], *, exclude_border: bool = True) -> Path:
    """``summary.csv`` of :func:`summarize`; with its header even when no input has a class to count."""
    return write_csv(path, summarize(tables, exclude_border=exclude_border), header=summary_fields(_unit(tables)))


def summarize(tables: Sequence[ObjectTable], *, exclude_border: bool = True) -> list[dict]:
    """Per input and class (and over all inputs, when several): counts, area fractions, diameters.

    Diameters are equivalent diameters in nm when every input has a pixel size, else in px for all
    (logged); of 3D objects with a voxel size, the diameter of the sphere of the same volume. Objects touching the border are left out of counts and diameters when
    ``exclude_border``; ``n_border`` counts them either way.

    Returns:
        Rows (dicts with the same keys, CSV column order): classes 1.. of each input, then of "ALL".
    """
    unit = _unit(tables)
    if unit == "px" and any(t.pixel_size_nm for t in tables):
        log.warning("some inputs have no pixel size: the summary gives diameters in px for all inputs")
    num_classes = max((len(t.class_pixels) for t in tables), default=1)
    groups = [(t.name, [t], t.pixel_size_nm) for t in tables]
    if len(tables) > 1:
        groups.append(("ALL", list(tables), None))
    return [_summary_row(name, group, c, unit, exclude_border, px)
            for name, group, px in groups for c in range(1, num_classes)]


def _summary_row(name: str, group: list[ObjectTable], c: int, unit: str, exclude_border: bool,
                 px: float | None) -> dict:
    """Summary statistics of class ``c`` over the tables of ``group`` (diameters in ``unit``)."""
    diam, n_border, area, total = [], 0, 0, 0
    for t in group:
        of_class = t.data["class_index"] == c
        border = of_class & t.data["touches_border"]
        kept = of_class & ~border if exclude_border else of_class
        if t.three_d and t.voxel_size_nm and unit == "nm":  # 3D objects: the diameter of the same-volume sphere
            diam.append(t.data["equivalent_diameter_3d"][kept])
        else:
            diam.append(t.data["equivalent_diameter"][kept] * (t.pixel_size_nm if unit == "nm" else 1.0))
        n_border += int(border.sum())
        area += int(t.class_pixels[c]) if c < len(t.class_pixels) else 0
        total += t.total_pixels
    d = np.concatenate(diam)
    cls = next((t.class_name(c) for t in group if c < len(t.class_names)), f"class_{c}")
    stats = [d.mean(), np.median(d), *(np.percentile(d, p) for p in PERCENTILES)] if len(d) else \
        [np.nan] * (2 + len(PERCENTILES))
    values = [name, cls, len(d), n_border, "excluded" if exclude_border else "included", area / total, *stats,
              px or np.nan]
    return dict(zip(summary_fields(unit), values))


def plot_size_histograms(axes: Sequence, table: ObjectTable, *, exclude_border: bool = True,
                         title: bool = True) -> None:
    """Draw the equivalent-diameter histogram of each class of ``table`` on ``axes`` (matplotlib
    axes, one per class of :func:`size_classes`), with the median as a dashed line."""
    from matplotlib.ticker import MaxNLocator

    from emseg.io.write import PALETTE

    px = table.pixel_size_nm
    unit, what = "nm" if px else "px", "equivalent diameter"
    d, ci = table.data["equivalent_diameter"] * (px or 1.0), table.data["class_index"]
    if table.three_d and "equivalent_diameter_3d" in table.data:  # of the 3D objects, not their sections
        unit, what = "nm" if table.voxel_size_nm else "vox", "3D equivalent diameter"
        d = table.data["equivalent_diameter_3d"]
    keep = ~table.data["touches_border"] if exclude_border else np.ones(len(d), bool)
    note = "objects touching the border excluded" if exclude_border else "objects touching the border included"
    for row, (ax, c) in enumerate(zip(axes, size_classes(table))):
        dc = d[keep & (ci == c)]
        if len(dc):
            ax.hist(dc, bins=min(30, max(5, int(np.sqrt(len(dc))) * 2)), color=PALETTE[(c - 1) % len(PALETTE)],
                    edgecolor="black", linewidth=0.5)
            ax.axvline(np.median(dc), color="black", linestyle="--", linewidth=1)
        ax.set_title((f"Size distribution per class ({note})\n" if row == 0 and title else "") +
                     f"{table.class_name(c)}: n = {len(dc)}, median {np.median(dc) if len(dc) else np.nan:.3g} {unit}",
                     fontsize=10)
        ax.set_xlabel(f"{what} ({unit})")
        ax.set_ylabel("objects")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def size_classes(table: ObjectTable) -> list[int]:
    """The class indices that have objects in ``table`` (one histogram each)."""
    return [int(c) for c in np.unique(table.data["class_index"])] or [0]


def plot_measurements(path: str | os.PathLike, table: ObjectTable, instances: Instances, *,
                      image: np.ndarray | None = None, exclude_border: bool = True, max_side: int = 900) -> Path:
    """Write a PNG: an equivalent-diameter histogram per class, and object outlines over the image.

    For a stack the middle slice is shown. Objects are tinted and outlined by class (emseg's
    palette); objects touching the border are outlined in magenta.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from emseg.io.write import atomic_output

    px = table.pixel_size_nm
    unit = "nm" if px else "px"
    classes = size_classes(table)
    fig = Figure(figsize=(13, max(5.6, 2.2 * len(classes))), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(classes), 2, width_ratios=(1, 1.1))
    plot_size_histograms([fig.add_subplot(grid[row, 0]) for row in range(len(classes))], table,
                         exclude_border=exclude_border)
    page = instances.labels.shape[0] // 2 if instances.labels.ndim == 3 else None
    ax_img = fig.add_subplot(grid[:, 1])
    h, w = instances.labels.shape[-2:]
    scale = px or 1.0
    border_ids = table.data["label"][table.data["touches_border"]]
    rgb = outline_rgb(instances, image, page=page, highlight=border_ids, highlight_colour=BORDER_COLOUR,
                      max_side=max_side)
    ax_img.imshow(rgb, extent=(0, w * scale, h * scale, 0), interpolation="nearest")
    ax_img.set_xlabel(f"x ({unit})")
    ax_img.set_ylabel(f"y ({unit})")
    where = "" if page is None else f", slice {page} of {instances.labels.shape[0]}"
    ax_img.set_title(f"{table.name}: {len(table)} objects{where}\n"
                     "(colour = class; magenta outline = touches the border)")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


# ---------------------------------------------------------------- files and the `emseg measure` command

#: a class mask with more classes than this (and no names for them) is taken for instance labels
MAX_CLASSES = 64


def check_class_labels(mask: np.ndarray, path, named: int = 0) -> None:
    """Refuse a mask that cannot be class labels: negative values, or more classes than
    ``max(MAX_CLASSES, named)`` (instance labels, one value per object, or a stray huge value)."""
    if mask.size == 0:
        return
    low, high = int(mask.min()), int(mask.max())
    if low < 0:
        raise InputError(f"{path}: mask holds negative values (down to {low}); class masks hold 0 (background) "
                         "and 1..N: pass the NAME_mask.tif written by `emseg predict`, or correct the mask")
    limit = max(MAX_CLASSES, named)
    if high >= limit:
        distinct = (f", {np.count_nonzero(np.bincount(mask.ravel())[1:])} different"
                    if high < 2**16 else "")
        raise InputError(
            f"{path}: holds label values up to {high}{distinct}: an instance-label image (one value per object) "
            f"or a stray value, not a class mask of at most {limit} classes; emseg measure takes class masks such "
            "as the NAME_mask.tif of `emseg predict`: turn instance labels into a class mask first (e.g. 1 where "
            "the labels are above 0), or name this many classes with --classes")


def measure_file(mask_path: Path, outdir: Path, *, image_path: Path | None = None,
                 class_names: Sequence[str] | None = None, pixel_size_nm: float | None = None,
                 instance_options: dict | None = None, exclude_border: bool = True, plot: bool = True,
                 write_labels: bool = True, object_classes: Sequence[str] | None = None,
                 voxel_size_nm: Sequence[float] | None = None) -> ObjectTable:
    """Find and measure the objects of one mask file; write ``NAME_objects.csv`` (and PNG, instance TIFF).

    Args:
        mask_path: class-label mask (TIFF from ``emseg predict``, or PNG).
        outdir: output folder (created).
        image_path: the matching greyscale image (mean intensity, plot background).
        class_names: names by class index when the mask does not store them.
        pixel_size_nm: overrides the mask's pixel size (nm/px).
        instance_options: keyword arguments of :func:`emseg.analysis.objects.find_instances`.
        exclude_border: leave border-touching objects out of the plot's histogram.
        plot, write_labels: also write ``NAME_measure.png`` and ``NAME_instances.tif``.
        object_classes: names of the classes to find objects of (default: every class but 0).
        voxel_size_nm: ``(z, y, x)`` in nm for 3D objects (default: the mask's, else the image's).

    Returns:
        The measurements.
    """
    mask, px = read_pages(mask_path, pixel_size_nm)
    if mask.dtype.kind not in "biu":
        raise InputError(f"{mask_path}: mask has {mask.dtype} values, not class labels; "
                         "pass the NAME_mask.tif written by `emseg predict` (integer labels)")
    names = class_names_from_tiff(mask_path) or (tuple(class_names) if class_names else None)
    check_class_labels(mask, mask_path, len(names or ()))
    image = None
    if image_path is not None:
        image, image_px = read_pages(image_path)
        if image.shape != mask.shape:
            raise InputError(f"{image_path}: image shape {image.shape} differs from its mask {mask_path} "
                             f"{mask.shape}; pass the image the mask was predicted from")
        px = px or image_px
    options = dict(instance_options or {})
    if object_classes:
        known = list(names or [])
        unknown = [c for c in object_classes if c not in known]
        if unknown:
            raise InputError(f"{mask_path}: no class named {', '.join(unknown)}; its classes are "
                             f"{', '.join(known) or 'unnamed (give --classes)'}")
        options["class_ids"] = [known.index(c) for c in object_classes]
    instances = find_instances(mask, **options)
    stem = mask_stem(mask_path)
    voxel = voxel_size_nm or (voxel_size_of(mask_path, image_path) if instances.three_d else None)
    table = measure_objects(instances, image=image, pixel_size_nm=px, class_names=names, name=stem,
                            voxel_size_nm=voxel)
    outdir.mkdir(parents=True, exist_ok=True)
    write_csv(outdir / f"{stem}_objects.csv", object_columns(table))
    if write_labels:
        write_instances(outdir / f"{stem}_instances.tif", instances, pixel_size_nm=px, class_names=table.class_names)
    if plot:
        plot_measurements(outdir / f"{stem}_measure.png", table, instances, image=image, exclude_border=exclude_border)
    return table


