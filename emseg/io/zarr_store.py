"""Zarr and OME-Zarr input and output, page by page, never holding the volume.

Contract:

* :func:`open_zarr` opens a zarr array, a group holding one array, or an OME-Zarr image
  (NGFF 0.4 ``multiscales`` attributes, or 0.5 under ``ome``; the full-resolution level is
  used) as an :class:`emseg.io.source.ImageSource` of shape ``(pages, height, width)``; the last
  two axes are y and x, and at most one leading axis (z, t or c) may be longer than 1.
  Pages are read lazily: when a chunk spans several pages, the chunk-aligned slab of pages
  is read once and kept (only while it is under :data:`SLAB_BYTES`), so a stack chunked
  ``(64, 256, 256)`` is not decoded 64 times.
* The pixel size (nm/px) comes from the x scale of the OME-Zarr coordinate transformations
  with the x axis unit, or from a ``pixel_size_nm`` attribute (what emseg writes); the page
  spacing of a stack from the scale of an axis named ``z`` with its unit, or from emseg's
  ``voxel_size_nm`` attribute.
* :class:`ZarrStackWriter` writes an OME-Zarr (NGFF 0.4, zarr format 2, one chunk per page,
  Blosc-lz4) with the same ``write_page``/``close``/``abort`` interface and shapes as
  :class:`emseg.io.write.TiffStackWriter`, except that per-class probabilities are stored with
  the class axis first, ``(C, pages, h, w)``, as NGFF orders axes ``c, z, y, x``.
  It writes into a hidden temporary folder beside the final path and renames it onto the
  path on close; an existing output is replaced only then (moved aside, the new one
  renamed in, the old one deleted).
* :func:`stack_writer` picks the zarr writer for a path ending in ``.zarr`` and the TIFF
  writer otherwise.

zarr (>= 3) is an optional dependency, imported only here and only when needed.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from emseg.errors import InputError
from emseg.io.source import ImageSource, _validate
from emseg.io.tiff import _physical, _unit_to_nm
from emseg.io.write import StackWriterBase, TiffStackWriter, _temp_path

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'emseg[distributed]' (or: pip install 'zarr>=3')"
#: keep at most this many bytes of a multi-page chunk slab in memory while reading
SLAB_BYTES = 256 * 2**20
#: pages larger than this many pixels are chunked in 4096 x 4096 blocks instead of one chunk
MAX_CHUNK_PIXELS = 64 * 2**20
_NGFF_UNITS = {"picometer": 1e-3, "angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3,
               "millimeter": 1e6, "centimeter": 1e7, "meter": 1e9}
_MARKERS = (".zarray", ".zgroup", "zarr.json")


def _zarr(name: str):
    try:
        import zarr
    except ImportError:
        raise InputError(f"{name}: zarr stores need the zarr package, which is not installed: "
                         f"{INSTALL_HINT}") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise InputError(f"{name}: emseg needs zarr 3 or newer, found {zarr.__version__}: {INSTALL_HINT}")
    return zarr


def is_zarr(path: str | os.PathLike) -> bool:
    """True for a folder that is a zarr store: it ends in ``.zarr`` or holds zarr metadata."""
    p = Path(path)
    return p.is_dir() and (p.suffix.lower() == ".zarr" or any((p / m).is_file() for m in _MARKERS))


# ------------------------------------------------------------------ reading

def _multiscales(attrs: dict) -> list | None:
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):
        ms = attrs["ome"].get("multiscales")
    return ms if isinstance(ms, list) and ms else None


def _scale(transforms: Any) -> list[float] | None:
    for t in transforms or ():
        if isinstance(t, dict) and t.get("type") == "scale" and isinstance(t.get("scale"), list):
            return [float(v) for v in t["scale"]]
    return None


def _ome_pixel_size(ms: dict, ndim: int, name: str) -> float | None:
    """nm/px of the x axis of the first dataset of an NGFF multiscales entry, None if unknown."""
    axes = ms.get("axes") or []
    if len(axes) != ndim:
        return None
    x_axis = axes[-1]
    unit = x_axis.get("unit") if isinstance(x_axis, dict) else None
    unit_nm = _NGFF_UNITS.get(str(unit).lower()) if unit else None
    unit_nm = unit_nm or _unit_to_nm(unit)
    scale = _scale(ms["datasets"][0].get("coordinateTransformations"))
    if unit_nm is None or scale is None or len(scale) != ndim:
        return None
    outer = _scale(ms.get("coordinateTransformations"))
    x = scale[-1] * (outer[-1] if outer and len(outer) == ndim else 1.0)
    return _physical(x * unit_nm, name)


def _ome_z_spacing(ms: dict, ndim: int, name: str) -> float | None:
    """nm between z planes of the first dataset of an NGFF multiscales entry (an axis named z), or None."""
    axes = ms.get("axes") or []
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    if len(axes) != ndim or "z" not in names:
        return None
    k = names.index("z")
    unit = axes[k].get("unit") if isinstance(axes[k], dict) else None
    unit_nm = (_NGFF_UNITS.get(str(unit).lower()) or _unit_to_nm(unit)) if unit else None
    scale = _scale(ms["datasets"][0].get("coordinateTransformations"))
    if unit_nm is None or scale is None or len(scale) != ndim:
        return None
    outer = _scale(ms.get("coordinateTransformations"))
    return _physical(scale[k] * (outer[k] if outer and len(outer) == ndim else 1.0) * unit_nm, name)


def _emseg_z_spacing(attrs: dict, name: str) -> float | None:
    """z spacing from emseg's own ``voxel_size_nm`` attribute (top level or under ``emseg``)."""
    for where in (attrs, attrs.get("emseg") if isinstance(attrs.get("emseg"), dict) else {}):
        voxel = where.get("voxel_size_nm")
        if isinstance(voxel, (list, tuple)) and len(voxel) == 3 and isinstance(voxel[0], (int, float)):
            return _physical(float(voxel[0]), name)
    return None


def zarr_z_spacing(path: str | os.PathLike) -> float | None:
    """The z spacing (nm) that a zarr/OME-Zarr store states, or None (see :func:`open_zarr`)."""
    zarr = _zarr(str(path))
    root = zarr.open(str(path), mode="r")
    name = str(path)
    if isinstance(root, zarr.Array):
        return _emseg_z_spacing(dict(root.attrs), name)
    ms = _multiscales(dict(root.attrs))
    if ms is not None:
        try:
            ndim = root[ms[0]["datasets"][0]["path"]].ndim
        except (KeyError, IndexError, TypeError):
            return None
        return _ome_z_spacing(ms[0], ndim, name) or _emseg_z_spacing(dict(root.attrs), name)
    arrays = sorted(root.array_keys())
    return _emseg_z_spacing(dict(root[arrays[0]].attrs), name) if len(arrays) == 1 else None


def _resolve_array(root, name: str):
    """The image array of an opened zarr node and its pixel size (nm/px or None)."""
    zarr = _zarr(name)
    if isinstance(root, zarr.Array):
        px = root.attrs.get("pixel_size_nm")
        return root, _physical(float(px), name) if isinstance(px, (int, float)) else None
    ms = _multiscales(dict(root.attrs))
    if ms is not None:
        first = ms[0]
        try:
            path = first["datasets"][0]["path"]
            array = root[path]
        except (KeyError, IndexError, TypeError) as err:
            raise InputError(f"{name}: OME-Zarr multiscales metadata names no readable dataset ({err}); "
                             "is the store complete?") from None
        px = _ome_pixel_size(first, array.ndim, name)
        if px is None and isinstance(root.attrs.get("emseg"), dict):
            value = root.attrs["emseg"].get("pixel_size_nm")
            px = _physical(float(value), name) if isinstance(value, (int, float)) else None
        return array, px
    arrays = sorted(root.array_keys())
    if len(arrays) == 1:
        return _resolve_array(root[arrays[0]], name)
    if not arrays:
        raise InputError(f"{name}: zarr group holds no array and no OME-Zarr image; point at the array "
                         "(e.g. STORE.zarr/raw) or write the data as OME-Zarr")
    raise InputError(f"{name}: zarr group holds {len(arrays)} arrays ({', '.join(arrays[:8])}); "
                     f"point at one of them, e.g. {Path(name) / arrays[0]}")


def open_zarr(path: str | os.PathLike) -> ImageSource:
    """Open a zarr/OME-Zarr store (see the module docstring) for page-by-page reading."""

    path = Path(path)
    name = str(path)
    zarr = _zarr(name)
    try:
        root = zarr.open(str(path), mode="r")
    except Exception as err:  # noqa: BLE001 - any open failure means a bad store
        raise InputError(f"{name}: cannot be opened as zarr: {err}. Is it a complete zarr store?") from err
    array, px = _resolve_array(root, name)
    dtype = np.dtype(array.dtype)
    pages, h, w = _validate(array.shape, dtype, name)
    lead = [i for i, n in enumerate(array.shape[:-2]) if n != 1]
    axis = lead[0] if lead else None
    is_stack = axis is not None
    page_bytes = h * w * dtype.itemsize
    z_chunk = array.chunks[axis] if axis is not None else 1
    slab_pages = z_chunk if 1 < z_chunk and z_chunk * page_bytes <= SLAB_BYTES else 1
    if z_chunk > 1 and slab_pages == 1:
        log.info("%s: chunks span %d pages (%.0f MiB); each page read decodes them all. Rechunk to one "
                 "page per chunk for speed", name, z_chunk, z_chunk * page_bytes / 2**20)
    cache: dict[str, Any] = {"start": None, "data": None}

    def index(lo: int, hi: int | None = None) -> tuple:
        idx: list[Any] = [0] * (array.ndim - 2) + [slice(None), slice(None)]
        if axis is not None:
            idx[axis] = slice(lo, hi) if hi is not None else lo
        return tuple(idx)

    def read(i: int) -> np.ndarray:
        if slab_pages == 1:
            return np.asarray(array[index(i)])
        start = i - i % slab_pages
        if cache["start"] != start:
            cache["data"] = None  # free the old slab before reading the next one
            cache["data"] = np.asarray(array[index(start, min(start + slab_pages, pages))])
            cache["start"] = start
        return cache["data"][i - start]  # the slab is (pages, h, w): integer indices dropped the rest

    def close() -> None:
        cache["data"] = None

    return ImageSource(path=path, name=name, shape=(pages, h, w), dtype=dtype, pixel_size_nm=px,
                       is_stack=is_stack, read=read, close=close,
                       z_spacing_nm=zarr_z_spacing(path) if is_stack else None)


# ------------------------------------------------------------------ writing

def _ngff_attrs(ndim: int, probabilities: bool, pixel_size_nm: float | None, name: str,
                z_spacing_nm: float | None = None) -> dict:
    """NGFF 0.4 multiscales attributes for one level stored at path '0' (z scale: ``z_spacing_nm``)."""
    axes: list[dict] = []
    if probabilities:
        axes.append({"name": "c", "type": "channel"})
    z_known = bool(z_spacing_nm and pixel_size_nm)  # one unit for all spatial axes
    if ndim - len(axes) == 3:
        axes.append({"name": "z", "type": "space", **({"unit": "nanometer"} if z_known else {})})
    xy_unit = {"type": "space", "unit": "nanometer"} if pixel_size_nm else {"type": "space"}
    axes += [{"name": "y", **xy_unit}, {"name": "x", **xy_unit}]
    px = float(pixel_size_nm) if pixel_size_nm else 1.0
    scale = [1.0] * (ndim - 2) + [px, px]
    if z_known and ndim - (1 if probabilities else 0) == 3:
        scale[-3] = float(z_spacing_nm)
    return {"multiscales": [{"version": "0.4", "name": name, "axes": axes,
                             "datasets": [{"path": "0", "coordinateTransformations": [
                                 {"type": "scale", "scale": scale}]}]}]}


class ZarrStackWriter(StackWriterBase):
    """Writes an OME-Zarr page by page into a temporary folder, renamed onto ``path`` on close().

    Args:
        path: final store path (a folder, conventionally ending in ``.zarr``).
        shape: ``(h, w)``, ``(pages, h, w)`` or ``(pages, C, h, w)`` as for TiffStackWriter;
            the last is stored as ``(C, pages, h, w)``.
        dtype: pixel type; values are cast with the same rules as TiffStackWriter.
        pixel_size_nm: physical pixel size in nm/px (y and x scale of the NGFF metadata), or None.
        metadata: extra JSON-serialisable entries, stored under the ``emseg`` attribute.

    ``write_page(page, index=None)`` writes pages in order, or at ``index`` in any order; pages
    are compressed and stored by one background thread (at most two pages queued).
    """

    def __init__(self, path: str | os.PathLike, *, shape: tuple[int, ...], dtype: Any,
                 pixel_size_nm: float | None = None, metadata: dict | None = None,
                 z_spacing_nm: float | None = None) -> None:
        zarr = _zarr(str(path))
        pixel_size_nm = self._init_shape(path, shape, dtype, pixel_size_nm)
        self._probabilities = len(self.shape) == 4
        stored = (self.shape[1], self.shape[0], *self.shape[2:]) if self._probabilities else self.shape
        h, w = self.shape[-2:]
        ch, cw = (h, w) if h * w <= MAX_CHUNK_PIXELS else (min(h, 4096), min(w, 4096))
        chunks = (*[1] * (len(stored) - 2), ch, cw)
        if self._probabilities:
            chunks = (stored[0], *chunks[1:])  # all classes of one page in one chunk
        self._tmp = _temp_path(self.path)
        attrs = _ngff_attrs(len(stored), self._probabilities, pixel_size_nm, self.path.stem, z_spacing_nm)
        attrs["emseg"] = {**(metadata or {}), "pixel_size_nm": pixel_size_nm,
                          "layout": "cz" if self._probabilities else "z"}
        try:
            group = zarr.open_group(str(self._tmp), mode="w", zarr_format=2)
            group.attrs.update(attrs)
            self._array = group.create_array("0", shape=stored, chunks=chunks, dtype=self.dtype,
                                             fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})
        except Exception:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"zarr-writer:{self.path.name}")
        self._pending: list[Future] = []
        self._done: set[int] = set()
        self._next = 0

    def _store(self, index: int, page: np.ndarray) -> None:
        if len(self.shape) == 2:
            self._array[...] = page
        elif self._probabilities:
            self._array[:, index] = page
        else:
            self._array[index] = page

    def _check(self, page: np.ndarray) -> np.ndarray:
        page = np.asarray(page)
        if page.shape != self._page_shape:
            raise ValueError(f"{self.path}: page has shape {page.shape}, expected {self._page_shape}")
        self._check_cast(page)
        return np.array(page, dtype=self.dtype, order="C", copy=True)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            future = self._pending.pop(0)
            try:
                future.result()
            except Exception as err:
                self.abort()
                raise OSError(f"{self.path}: writing the zarr store failed: {err}") from err

    def write_page(self, page: np.ndarray, index: int | None = None) -> None:
        """Write the next page (or page ``index``); raises if an earlier background write failed."""
        self._check_open()
        index = self._next if index is None else int(index)
        if not 0 <= index < self.n_pages:
            raise ValueError(f"{self.path}: page {index} is outside the {self.n_pages} pages declared in shape")
        data = self._check(page)
        self._drain(keep=1)
        self._pending.append(self._pool.submit(self._store, index, data))
        self._done.add(index)
        self._next = index + 1

    def _raise_pending(self) -> None:
        self._drain(keep=0)

    def _pages_written(self) -> int:
        return len(self._done)

    def _commit(self) -> None:
        self._pool.shutdown(wait=True)
        old = None
        if self.path.exists() or self.path.is_symlink():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self._tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)

    def _discard(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._tmp, ignore_errors=True)


def stack_writer(path: str | os.PathLike, *, shape: tuple[int, ...], dtype: Any,
                 pixel_size_nm: float | None = None, metadata: dict | None = None,
                 z_spacing_nm: float | None = None):
    """A :class:`ZarrStackWriter` for a path ending in ``.zarr``, else a :class:`TiffStackWriter`.

    ``z_spacing_nm`` (a stack's page spacing) is stored with the pixel size as ``voxel_size_nm``
    ``[z, y, x]`` in the metadata, and as the z scale of an OME-Zarr.
    """
    metadata = dict(metadata or {})
    if z_spacing_nm and pixel_size_nm and len(shape) >= 3:
        metadata["voxel_size_nm"] = [float(z_spacing_nm), float(pixel_size_nm), float(pixel_size_nm)]
    if Path(path).suffix.lower() == ".zarr":
        return ZarrStackWriter(path, shape=shape, dtype=dtype, pixel_size_nm=pixel_size_nm, metadata=metadata,
                               z_spacing_nm=z_spacing_nm if len(shape) >= 3 else None)
    return TiffStackWriter(path, shape=shape, dtype=dtype, pixel_size_nm=pixel_size_nm, metadata=metadata)
