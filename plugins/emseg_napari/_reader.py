"""napari reader: microscope files (DM3/DM4, EMD, SER, MRC, hspy) and TIFF stacks with their scale.

Reading goes through :func:`emseg.io.read.open_image`, so napari sees exactly what ``emseg predict``
sees: the same first image signal, greyscale pages, and the physical pixel size (nm/px), which
becomes the layer's ``scale`` with ``units`` nm (napari's scale bar then reads right); a stack's
page spacing, when the file states it, is the scale of its page axis (3D views to scale). A TIFF
whose emseg metadata lists ``classes`` and holds integers (a mask written by ``emseg predict``
or by this plugin's writer) opens as a Labels layer with those class names.

``get_reader`` returns None for paths it does not handle; the returned reader returns None
(after a warning notification saying why) for a file that turns out to be unreadable, so napari
can try other readers and nothing raises into the viewer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._utils import labels_layer_kwargs, layer_kwargs, notify_warning

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
MICROSCOPE_SUFFIXES = (".dm3", ".dm4", ".emd", ".ser", ".mrc", ".ali", ".rec", ".hspy")
READ_SUFFIXES = MICROSCOPE_SUFFIXES + TIFF_SUFFIXES
#: images up to this size are read into memory; larger ones become lazy dask arrays
IN_MEMORY_BYTES = 2 * 1024**3

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | os.PathLike | list):
    """Return :func:`read_em` if ``path`` is one file emseg can read, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = Path(path)
    if p.suffix.lower() not in READ_SUFFIXES or not p.is_file():
        return None
    return read_em


def read_em(path: str | os.PathLike | list) -> list[LayerData] | None:
    """Read each path into napari layer data; unreadable files give a warning and are left out."""
    from emseg.errors import EmsegError

    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    layers = []
    for p in paths:
        try:
            layers.append(read_layer(p))
        except EmsegError as err:
            notify_warning(f"emseg cannot open it: {err}")
    return layers or None


def read_layer(path: str | os.PathLike) -> LayerData:
    """One file as ``(data, layer kwargs, layer type)``; raises :class:`emseg.errors.InputError`."""
    from emseg.io.read import open_image

    path = Path(path)
    source = open_image(path)
    try:
        data = _array(source)
    except BaseException:
        source.close()
        raise
    if isinstance(data, np.ndarray):
        source.close()
    ndim = data.ndim
    classes = _mask_classes(path) if np.dtype(data.dtype).kind in "biu" else None
    name = _display_name(path)
    if classes:
        kwargs = labels_layer_kwargs(classes, source.pixel_size_nm, ndim, z_spacing_nm=source.z_spacing_nm)
        kwargs["metadata"]["emseg_source"] = str(path)
        return data, {"name": name, **kwargs}, "labels"
    kwargs = layer_kwargs(source.pixel_size_nm, ndim, source.z_spacing_nm)
    kwargs["metadata"]["emseg_source"] = str(path)
    log.info("%s: %s %s, pixel size %s nm", path, data.shape, data.dtype, source.pixel_size_nm)
    return data, {"name": name, **kwargs}, "image"


def _array(source):
    """All pages as a numpy array (2D for a single image), or a lazy dask array when large."""
    pages, height, width = source.shape
    nbytes = pages * height * width * source.dtype.itemsize
    if nbytes <= IN_MEMORY_BYTES:
        if not source.is_stack:
            return np.asarray(source.page(0))
        out = np.empty(source.shape, source.dtype)
        for i in range(pages):
            out[i] = source.page(i)
        return out
    import dask
    import dask.array as da
    read = dask.delayed(source.page, pure=True)
    stack = da.stack([da.from_delayed(read(i), (height, width), source.dtype) for i in range(pages)])
    return stack if source.is_stack else stack[0]


def _mask_classes(path: Path) -> list[str] | None:
    """The class names stored by emseg in a mask TIFF's metadata, or None."""
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            for meta in tif.shaped_metadata or ():
                classes = meta.get("classes") if isinstance(meta, dict) else None
                if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
                    return classes
    except Exception:  # noqa: BLE001 - metadata is optional; the image itself was read fine
        log.debug("%s: no readable emseg metadata", path)
    return None


def _display_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
