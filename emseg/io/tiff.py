"""TIFF metadata helpers for :mod:`emseg.io.read`: pixel size, unit conversion, damage checks.

Pixel sizes are in nanometres per pixel (x axis); values above 10 µm/px (10000 nm), such
as the 72 dpi default that many programs write, are not microscope calibrations and read
as None. Import public names from :mod:`emseg.io.read`.
"""

from __future__ import annotations

import logging
import math
import threading
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from emseg.errors import InputError

log = logging.getLogger(__name__)

MAX_PIXEL_SIZE_NM = 10_000.0
#: the smallest pixel size emseg accepts where one is given (model cards, options): 1 pm
MIN_PIXEL_SIZE_NM = 0.001
#: length units (lower case, micro sign normalised) -> nanometres
_UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "nanometre": 1.0, "pm": 1e-3, "å": 0.1,
            "angstrom": 0.1, "µm": 1e3, "um": 1e3, "micron": 1e3, "microns": 1e3,
            "micrometer": 1e3, "micrometre": 1e3, "mm": 1e6, "cm": 1e7, "m": 1e9,
            "inch": 2.54e7, "in": 2.54e7}


def _unit_to_nm(unit: Any) -> float | None:
    """Nanometres per ``unit`` (e.g. 'µm', 'micron', '\\u00B5m', 'Å'), None if not a length."""
    if not isinstance(unit, str):
        return None
    u = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").replace("\\u00C5", "Å")
    u = u.replace("\u03bc", "µ").replace("\u212b", "Å").lower()
    return _UNIT_NM.get(u)


def _physical(nm: float | None, where: str) -> float | None:
    """Return ``nm`` if it is a plausible microscope pixel size, else None (logged)."""
    if nm is None or not math.isfinite(nm) or nm <= 0:
        return None
    if nm > MAX_PIXEL_SIZE_NM:
        log.debug("%s: ignoring pixel size %.4g nm (not a microscope calibration)", where, nm)
        return None
    return float(nm)


@contextmanager
def _catch_tifffile_warnings() -> Iterator[list[str]]:
    """Collect warnings that tifffile logs in this thread (it logs, not raises, on bad offsets)."""
    records: list[str] = []
    me = threading.get_ident()

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == me and record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = _Grab()
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


_TRUNCATION_HINTS = ("invalid page offset", "failed to reshape", "truncat", "corrupt",
                     "failed to read", "invalid tag", "not a TIFF")


def _check_tiff_extent(path: Path, series, fail: Callable[[object], InputError]) -> None:
    """Raise if the image data of the series' last page extends past the end of the file."""
    size = path.stat().st_size
    try:
        if series.dataoffset is not None:
            end = series.dataoffset + series.nbytes
        else:
            last = series[len(series) - 1]
            end = max((o + c for o, c in zip(last.dataoffsets, last.databytecounts)), default=0)
    except Exception as err:  # noqa: BLE001
        raise fail(err) from err
    if end > size:
        raise fail(f"image data needs {end} bytes but the file has only {size}")


def _ome_physical_size(tif: Any, axis: str, where: str) -> float | None:
    """OME-XML ``PhysicalSize{axis}`` in nm (its unit, default µm), None when absent or implausible."""
    if not (tif.is_ome and tif.ome_metadata):
        return None
    try:
        for el in ET.fromstring(tif.ome_metadata).iter():
            if el.tag.rsplit("}", 1)[-1] == "Pixels":
                value = el.get(f"PhysicalSize{axis}")
                unit_nm = _unit_to_nm(el.get(f"PhysicalSize{axis}Unit", "µm"))
                if value is not None and unit_nm is not None:
                    return _physical(float(value) * unit_nm, where)
                return None
    except (ET.ParseError, ValueError) as err:
        log.debug("%s: unreadable OME-XML: %s", where, err)
    return None


def pixel_size_from_tiff(tif: Any) -> float | None:
    """Physical pixel size in nm/px stored in an open ``tifffile.TiffFile``, None if unknown.

    Looks, in order, at: our 'pixel_size_nm' in tifffile's JSON description; OME-XML
    PhysicalSizeX (+PhysicalSizeXUnit, default µm); ImageJ 'unit' with XResolution;
    XResolution with ResolutionUnit CENTIMETER or INCH. Values above 10 µm/px are ignored.
    """
    where = str(getattr(tif, "filename", "TIFF"))
    for meta in tif.shaped_metadata or ():
        if isinstance(meta, dict) and meta.get("pixel_size_nm") is not None:
            try:
                return _physical(float(meta["pixel_size_nm"]), where)
            except (TypeError, ValueError):
                break
    ome = _ome_physical_size(tif, "X", where)
    if ome is not None:
        return ome
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value
    if not num or not den:
        return None
    units_per_px = den / num
    ij = tif.imagej_metadata or {}
    unit_nm = _unit_to_nm(ij.get("unit"))
    if unit_nm is not None:
        return _physical(units_per_px * unit_nm, where)
    res_unit = page.tags.get("ResolutionUnit")
    res_unit = int(res_unit.value) if res_unit is not None else 2  # TIFF default: INCH
    unit_nm = {2: 2.54e7, 3: 1e7, 4: 1e6, 5: 1e3}.get(res_unit)  # 4, 5: tifffile mm, µm
    return _physical(units_per_px * unit_nm, where) if unit_nm else None


def z_spacing_from_tiff(tif: Any) -> float | None:
    """Distance between the pages of a stack (z spacing) in nm stored in an open ``tifffile.TiffFile``.

    Looks, in order, at: emseg's ``voxel_size_nm`` (z, y, x) in tifffile's JSON description; OME-XML
    PhysicalSizeZ (+PhysicalSizeZUnit, default µm); ImageJ ``spacing`` in its ``unit``. None when
    the file states none (or an implausible one, above 10 µm).
    """
    where = str(getattr(tif, "filename", "TIFF"))
    for meta in tif.shaped_metadata or ():
        voxel = meta.get("voxel_size_nm") if isinstance(meta, dict) else None
        if isinstance(voxel, (list, tuple)) and len(voxel) == 3:
            try:
                return _physical(float(voxel[0]), where)
            except (TypeError, ValueError):
                break
    ome = _ome_physical_size(tif, "Z", where)
    if ome is not None:
        return ome
    ij = tif.imagej_metadata or {}
    unit_nm = _unit_to_nm(ij.get("unit"))
    if ij.get("spacing") is not None and unit_nm is not None:
        try:
            return _physical(float(ij["spacing"]) * unit_nm, where)
        except (TypeError, ValueError):
            return None
    return None
