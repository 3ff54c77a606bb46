"""napari writer: a Labels layer as a (multi-page) TIFF with its pixel size and class names.

The file is written by :class:`emseg.io.write.TiffStackWriter` (atomic, zlib, BigTIFF when large), so
Fiji reads the calibration from the resolution tags and emseg's reader opens it again as a
Labels layer with the same scale and classes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ._utils import CLASSES_KEY, MODEL_KEY, PIXEL_SIZE_KEY

log = logging.getLogger(__name__)


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """Write one Labels layer to ``path`` (``.tif``/``.tiff``); return the paths written."""
    from emseg.io.write import TiffStackWriter

    out = Path(path)
    if out.suffix.lower() not in (".tif", ".tiff"):
        out = out.with_suffix(".tif")
    data = np.asarray(data[0] if attributes.get("multiscale") else data)
    if data.ndim not in (2, 3):
        raise ValueError(f"{out}: emseg writes 2D labels or a 3D stack (pages, height, width); "
                         f"this layer has {data.ndim} dimensions")
    dtype = _smallest_dtype(data)
    meta = attributes.get("metadata") or {}
    pixel_size = _pixel_size(attributes)
    extra: dict[str, Any] = {"emseg_layer": "labels"}
    classes = meta.get(CLASSES_KEY) or _feature_classes(attributes)
    if classes:
        extra["classes"] = [str(c) for c in classes]
    if meta.get(MODEL_KEY):
        extra["model"] = str(meta[MODEL_KEY])
    shape = data.shape
    with TiffStackWriter(out, shape=shape, dtype=dtype, pixel_size_nm=pixel_size, metadata=extra) as writer:
        writer.write_page(data)
    log.info("wrote %s %s %s, pixel size %s nm", out, shape, dtype, pixel_size)
    return [str(out)]


def _smallest_dtype(data: np.ndarray) -> np.dtype:
    if data.size and data.min() < 0:
        raise ValueError("labels with negative values cannot be saved as a mask TIFF; "
                         "erase them (paint with label 0) first")
    top = int(data.max()) if data.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _pixel_size(attributes: dict) -> float | None:
    """nm/px from emseg's metadata, else from the layer's scale when its units are lengths."""
    meta = attributes.get("metadata") or {}
    if PIXEL_SIZE_KEY in meta:
        return float(meta[PIXEL_SIZE_KEY]) if meta[PIXEL_SIZE_KEY] else None
    scale, units = attributes.get("scale"), attributes.get("units")
    if scale is None or not units:
        return None
    try:
        factor = float((1 * units[-1]).to("nm").magnitude)
    except Exception:  # noqa: BLE001 - pixel units or plain strings
        try:
            import pint
            factor = float(pint.UnitRegistry().Quantity(1, str(units[-1])).to("nm").magnitude)
        except Exception:  # noqa: BLE001
            return None
    value = float(scale[-1]) * factor
    return value if value > 0 else None


def _feature_classes(attributes: dict) -> list[str] | None:
    features = attributes.get("features")
    try:
        if features is not None and "class" in features and "index" in features:
            pairs = sorted(zip(features["index"], features["class"]))
            if [int(i) for i, _ in pairs] == list(range(len(pairs))):
                return [str(c) for _, c in pairs]
    except Exception:  # noqa: BLE001 - user-made features in another layout
        pass
    return None
