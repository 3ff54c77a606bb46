"""Reading: open EM images and stacks lazily, page by page; find the inputs of a run.

Contract:

* :func:`open_image` / :func:`array_source` return an :class:`~emseg.io.source.ImageSource` of shape
  ``(pages, height, width)``; a 2D image has 1 page and ``is_stack`` False.
  :meth:`ImageSource.page` returns one 2D ``(height, width)`` array in the file's own
  dtype (integer, bool or floating point; never complex, never RGB) and reads only
  that page. Floating-point pages are checked for NaN/inf.
* ``pixel_size_nm`` is the physical pixel size in nanometres per pixel (x axis), or
  None when unknown. Values above 10 µm/px (10000 nm) are treated as unknown: they come
  from screen-resolution defaults such as 72 dpi, not from a microscope.
* ``z_spacing_nm`` is the distance between the pages of a stack in nm (ImageJ ``spacing``,
  OME PhysicalSizeZ, the MRC header, hyperspy's navigation axis, OME-Zarr's z scale, or
  emseg's own ``voxel_size_nm``), or None; ``voxel_size_nm`` is ``(z, y, x)`` in nm when both
  it and the pixel size are known, else None.
* Bad input raises :class:`emseg.errors.InputError` whose message starts with the file
  (or array name), says what is wrong and what to do.
* Zarr / OME-Zarr stores (folders) are read lazily by :mod:`emseg.io.zarr_store`.
* TIFF (incl. BigTIFF, OME-TIFF, ImageJ) is read with tifffile from ``series[0]``;
  PNG/JPEG/BMP with Pillow; DM3/DM4/EMD/SER/MRC/HSPY with hyperspy (``lazy=True``).
* Writers (:class:`~emseg.io.write.TiffStackWriter`, :func:`~emseg.io.write.atomic_output`,
  :func:`~emseg.io.write.write_overlay_png`) live in :mod:`emseg.io.write`.
"""

from __future__ import annotations

import errno
import glob
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from emseg.errors import InputError
from emseg.io.source import ImageSource, _check_override, _grey_from_rgb, _validate
from emseg.io.tiff import (
    _TRUNCATION_HINTS,
    _catch_tifffile_warnings,
    _check_tiff_extent,
    _physical,
    _unit_to_nm,
    pixel_size_from_tiff,
    z_spacing_from_tiff,
)

__all__ = ["SUPPORTED_SUFFIXES", "open_image", "array_source", "expand_inputs", "check_voxel_size",
           "parse_voxel_size", "voxel_size_arg"]

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: suffix -> hyperspy file_format (None: let hyperspy infer it from the suffix)
HYPERSPY_FORMATS = {".dm3": None, ".dm4": None, ".emd": None, ".ser": None,
                    ".mrc": "MRC", ".ali": "MRC", ".rec": "MRC", ".hspy": None}
SUPPORTED_SUFFIXES: tuple[str, ...] = TIFF_SUFFIXES + PILLOW_SUFFIXES + tuple(HYPERSPY_FORMATS)

def array_source(array: Any, *, pixel_size_nm: float | None = None,
                 name: str = "array", voxel_size_nm: Sequence[float] | None = None) -> ImageSource:
    """Wrap a 2D ``(h, w)`` or 3D ``(pages, h, w)`` numpy/dask/array-like as an ImageSource.

    Leading singleton axes are dropped; a 3D array whose last axis has 3 or 4 entries is
    taken as RGB (accepted only when its channels are equal). Dask pages are computed
    one at a time. ``voxel_size_nm`` ``(z, y, x)`` sets the page spacing and the pixel size.
    """
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        array = np.asarray(array)
    dtype = np.dtype(array.dtype)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
        array = _grey_from_rgb(np.asarray(array), name)
    pages, h, w = _validate(array.shape, dtype, name)
    is_stack = array.ndim >= 3
    data = array.reshape((pages, h, w)) if array.ndim != 3 else array
    voxel = check_voxel_size(voxel_size_nm, name) if voxel_size_nm is not None else None
    src = ImageSource(path=None, name=name, shape=(pages, h, w), dtype=dtype,
                      pixel_size_nm=_check_override(pixel_size_nm, name), is_stack=is_stack,
                      read=lambda i: data[i])
    return _overridden(src, None, voxel)


def open_image(path: str | os.PathLike, *, pixel_size_nm: float | None = None,
               voxel_size_nm: Sequence[float] | None = None) -> ImageSource:
    """Open an image or stack for page-by-page reading, dispatching on the file suffix.

    Args:
        path: TIFF/OME-TIFF/BigTIFF, PNG/JPEG/BMP, or DM3/DM4/EMD/SER/MRC/HSPY file.
        pixel_size_nm: overrides the pixel size stored in the file (nm/px).
        voxel_size_nm: ``(z, y, x)`` in nm, overriding the file's page spacing and pixel size
            (y must equal x: emseg takes square pixels); wins over ``pixel_size_nm``.

    Returns:
        An open ImageSource; close it (or use ``with``) when done.
    """
    path = Path(path).expanduser()
    name = str(path)
    override = _check_override(pixel_size_nm, name)
    voxel = check_voxel_size(voxel_size_nm, name) if voxel_size_nm is not None else None
    if not path.exists():
        raise InputError(f"{name}: file not found; check the path and spelling")
    if _is_zarr(path):  # zarr / OME-Zarr store (a folder): emseg.io.zarr_store
        from emseg.io.zarr_store import open_zarr
        src = _overridden(open_zarr(path), override, voxel)
        log.debug("opened %r", src)
        return src
    if path.is_dir():
        raise InputError(f"{name}: is a folder, not an image file; pass the files inside it")
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        src = _open_tiff(path)
    elif suffix in PILLOW_SUFFIXES:
        src = _open_pillow(path)
    elif suffix in HYPERSPY_FORMATS:
        src = _open_hyperspy(path, HYPERSPY_FORMATS[suffix])
    else:
        raise InputError(f"{name}: unsupported file type {path.suffix!r}; emseg reads "
                         f"{', '.join(SUPPORTED_SUFFIXES)}: convert the image to TIFF")
    src = _overridden(src, override, voxel)
    log.debug("opened %r", src)
    return src


def parse_voxel_size(text: str) -> tuple[float, float, float]:
    """``"Z,Y,X"`` in nm (``"5"`` alone means 5,5,5; ``x`` also separates) as three floats; ValueError otherwise."""
    parts = [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"expected three positive numbers Z,Y,X in nm (e.g. 8,5,5), got {text!r}")
    return values  # type: ignore[return-value]


def voxel_size_arg(text: str) -> tuple[float, float, float]:
    """argparse type of ``--voxel-size Z,Y,X``: a checked voxel size, or a one-line usage error."""
    import argparse
    try:
        return check_voxel_size(parse_voxel_size(text), "--voxel-size")
    except (ValueError, InputError) as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--voxel-size: ")) from None


def check_voxel_size(value: Sequence[float], name: str = "--voxel-size") -> tuple[float, float, float]:
    """``(z, y, x)`` as positive finite floats with y equal to x (within 2 %), else InputError."""
    try:
        voxel = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        voxel = ()
    if len(voxel) != 3 or not all(math.isfinite(v) and v > 0 for v in voxel):
        raise InputError(f"{name}: voxel size must be three positive numbers Z,Y,X in nm, got {value!r}")
    if not math.isclose(voxel[1], voxel[2], rel_tol=0.02):
        raise InputError(f"{name}: voxel size {voxel[0]:g} x {voxel[1]:g} x {voxel[2]:g} nm has non-square "
                         "pixels (Y differs from X); emseg takes square pixels: resample the stack first")
    return voxel  # type: ignore[return-value]


def _overridden(src: ImageSource, pixel_size_nm: float | None,
                voxel: tuple[float, float, float] | None) -> ImageSource:
    if pixel_size_nm is not None:
        src.pixel_size_nm = pixel_size_nm
    if voxel is not None:
        src.z_spacing_nm, src.pixel_size_nm = voxel[0], voxel[2]
    return src


def _open_tiff(path: Path) -> ImageSource:
    """Open series 0 of a TIFF, kept open; one page is decoded per page() call."""
    import tifffile

    name = str(path)

    def fail(reason: object) -> InputError:
        return InputError(f"{name}: cannot be read as TIFF: {reason}. Is the file complete?")

    tif = None
    try:
        with _catch_tifffile_warnings() as warned:
            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            axes, shape = _unsqueezed(tif, series)
    except Exception as err:  # noqa: BLE001
        if tif is not None:
            tif.close()
        raise fail(err) from err
    try:
        bad = [w for w in warned if any(h.lower() in w.lower() for h in _TRUNCATION_HINTS)]
        if bad:
            raise fail(bad[0])
        if len(tif.series) > 1:
            log.info("%s: holds %d image series; using the first", name, len(tif.series))
        _check_tiff_extent(path, series, fail)  # before _tiff_source, which reads an RGB page whole
        return _tiff_source(path, tif, series, axes, shape)
    except BaseException:
        tif.close()
        raise


def _unsqueezed(tif, series) -> tuple[str, tuple[int, ...]]:
    """Axes and shape of the first series with its length-1 dimensions kept.

    tifffile 2026.5.2 removed ``TiffPageSeries.get_axes``/``get_shape``: there a series is asked for
    unsqueezed through ``TiffFile.series(squeeze=False)``; Python 3.11 stops at tifffile 2026.3.3."""
    if hasattr(series, "get_axes"):
        return series.get_axes(False), tuple(series.get_shape(False))
    full = tif.series(squeeze=False)[0]
    return full.axes, tuple(full.shape)


def _tiff_source(path, tif, series, axes: str, shape: tuple[int, ...]) -> ImageSource:
    """Build the ImageSource of a TIFF series from its unsqueezed axes and shape."""
    name = str(path)
    samples = shape[axes.index("S")] if "S" in axes else 1
    if "S" in axes:
        i = axes.index("S")
        axes, shape = axes[:i] + axes[i + 1:], shape[:i] + shape[i + 1:]
    if not axes.endswith("YX"):
        raise InputError(f"{name}: TIFF axes {axes!r} do not end with height and width (YX); "
                         "save it as a plain greyscale TIFF")
    dims = _validate(shape, np.dtype(series.dtype), name)
    px = pixel_size_from_tiff(tif)
    if samples > 1:
        if dims[0] != 1 or samples not in (3, 4):
            raise InputError(f"{name}: is an RGB image; emseg segments single-channel greyscale "
                             "EM images: convert it to greyscale first")
        try:
            data = series.asarray()
        except Exception as err:  # noqa: BLE001 - any decoder error means a bad file
            raise InputError(f"{name}: cannot be read as TIFF: {err}. Is the file complete?") from err
        data = data.reshape(dims[1:] + (samples,) if series.axes.endswith("S") else (samples,) + dims[1:])
        grey = _grey_from_rgb(data if series.axes.endswith("S") else np.moveaxis(data, 0, -1), name)
        tif.close()
        return ImageSource(path=path, name=name, shape=dims, dtype=grey.dtype, pixel_size_nm=px,
                           is_stack=False, read=lambda i: grey)
    is_stack = dims[0] > 1 or (series.kind == "shaped" and len(shape) > 2)
    return ImageSource(path=path, name=name, shape=dims, dtype=series.dtype, pixel_size_nm=px,
                       is_stack=is_stack, read=lambda i: tif.asarray(key=i, series=0),
                       close=tif.close, z_spacing_nm=z_spacing_from_tiff(tif) if is_stack else None)


def _open_pillow(path: Path) -> ImageSource:
    """Read a PNG/JPEG/BMP fully (one page) with Pillow."""
    from PIL import Image

    name = str(path)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # EM montages exceed Pillow's decompression-bomb limit
        with Image.open(path) as im:
            im.load()
            dpi = im.info.get("dpi")
            if im.mode == "P":
                im = im.convert("RGBA")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode in ("LA", "La", "PA"):
                im = im.getchannel(0)
            data = np.asarray(im)
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{name}: cannot be read as {path.suffix.lstrip('.').upper()}: "
                         f"{err}. Is the file complete?") from err
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if data.ndim == 3:
        data = _grey_from_rgb(data, name)
    dims = _validate(data.shape, data.dtype, name)
    px = None
    if dpi and dpi[0]:
        px = _physical(25.4e6 / float(dpi[0]), name)
    return ImageSource(path=path, name=name, shape=dims, dtype=data.dtype, pixel_size_nm=px,
                       is_stack=False, read=lambda i: data)


def _open_hyperspy(path: Path, file_format: str | None) -> ImageSource:
    """Open the first 2D/3D image signal of a microscope file with hyperspy, lazily."""
    name = str(path)
    fmt = file_format or path.suffix.lstrip(".").upper()
    try:
        import hyperspy.api as hs

        loaded = hs.load(str(path), lazy=True, file_format=file_format)
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{name}: cannot be read as {fmt}: {err}. Is the file complete?") from err
    signals = loaded if isinstance(loaded, list) else [loaded]

    def close() -> None:
        if path.suffix.lower() in (".emd", ".hspy"):  # h5py-backed dask arrays hold the file
            for s in signals:
                try:
                    s.close_file()
                except Exception:  # noqa: BLE001 - already closed or not h5py
                    pass

    images = [s for s in signals if s.axes_manager.signal_dimension == 2]
    fits = [s for s in images if sum(n > 1 for n in s.data.shape[:-2]) <= 1]
    if not fits:
        close()
        if images:
            _validate(images[0].data.shape, np.dtype(images[0].data.dtype), name)
        found = ", ".join(f"{type(s).__name__} {tuple(s.data.shape)}" for s in signals)
        raise InputError(f"{name}: holds no 2D image or image stack (found {found}); "
                         "emseg takes a 2D image or a 3D stack (pages, height, width)")
    sig = fits[0]
    if len(signals) > 1:
        log.info("%s: holds %d signals; using %r", name, len(signals), sig.metadata.General.title)
    data = sig.data
    try:
        dims = _validate(data.shape, np.dtype(data.dtype), name)
    except InputError:
        close()
        raise
    data = data.reshape(dims)
    px = None
    x_ax, y_ax = sig.axes_manager.signal_axes[:2]
    unit_nm = _unit_to_nm(getattr(x_ax, "units", None))
    if unit_nm is not None and getattr(x_ax, "is_uniform", True):
        px = _physical(float(x_ax.scale) * unit_nm, name)
        if px and not math.isclose(x_ax.scale, y_ax.scale, rel_tol=1e-3):
            log.warning("%s: pixels are not square (%g x %g %s); using the x size",
                        name, x_ax.scale, y_ax.scale, x_ax.units)
    else:
        log.info("%s: no length calibration (units %r); pixel size unknown", name,
                 getattr(x_ax, "units", None))
    is_stack = len(data.shape) == 3 and sig.axes_manager.navigation_dimension >= 1
    z = _hyperspy_z_spacing(sig, fmt, name) if is_stack else None
    return ImageSource(path=path, name=name, shape=dims, dtype=data.dtype, pixel_size_nm=px,
                       is_stack=is_stack, read=lambda i: data[i], close=close, z_spacing_nm=z)


def _hyperspy_z_spacing(sig, fmt: str, name: str) -> float | None:
    """Page spacing (nm) of a hyperspy image stack: the MRC header's Zlen / MZ (Å), else the
    navigation axis when it is a uniform length axis."""
    if fmt.upper() == "MRC":
        try:
            header = sig.original_metadata.std_header
            zlen, mz = float(np.ravel(header.Zlen)[0]), float(np.ravel(header.MZ)[0])
        except (AttributeError, IndexError, TypeError, ValueError):
            zlen = mz = 0.0
        return _physical(zlen / mz / 10.0, name) if zlen > 0 and mz > 0 else None
    nav = [ax for ax in sig.axes_manager.navigation_axes if ax.size > 1]
    if len(nav) != 1 or not getattr(nav[0], "is_uniform", True):
        return None
    unit_nm = _unit_to_nm(getattr(nav[0], "units", None))
    return _physical(float(nav[0].scale) * unit_nm, name) if unit_nm is not None else None


def _natural_key(text: str) -> list:
    """Sort key that orders 'img2' before 'img10'."""
    return [int(t) if i % 2 else t.lower() for i, t in enumerate(re.split(r"(\d+)", text))]


def _is_zarr(p: Path) -> bool:
    """A zarr store folder (``.zarr`` suffix or zarr metadata inside); see :mod:`emseg.io.zarr_store`."""
    from emseg.io.zarr_store import is_zarr
    return is_zarr(p)


def _supported(p: Path) -> bool:
    if p.name.startswith("."):
        return False
    return (p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES) or _is_zarr(p)


def _dangling(p: Path) -> bool:
    """A symbolic link with an image suffix whose target is missing or loops (skipped with a message)."""
    if p.name.startswith(".") or p.suffix.lower() not in SUPPORTED_SUFFIXES or not p.is_symlink():
        return False
    try:
        p.stat()
    except OSError:
        return True
    return False


def _dangling_error(p: Path) -> InputError:
    try:
        p.stat()
        why = "is unreadable"
    except OSError as exc:
        why = ("is a symbolic link that loops" if exc.errno == errno.ELOOP
               else "is a symbolic link to a file that does not exist")
    return InputError(f"{p}: {why}; skipped (fix or remove the link)")


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[InputError]]:
    """Expand files, glob patterns and folders (not recursive) into image files.

    Hidden files (names starting with '.', e.g. macOS '._x.tif' or our '.partial' files)
    are skipped in folders and globs. Explicitly named files are kept whatever their suffix
    (open_image reports unsupported ones).

    Returns:
        The files found (deduplicated, in input order; folder and glob matches sorted
        naturally) and one InputError per input item that gave no file, and per symbolic
        link with an image suffix whose target is missing or loops (such links are skipped).
    """
    files: list[Path] = []
    errors: list[InputError] = []
    seen: set[str] = set()
    supported = ", ".join(SUPPORTED_SUFFIXES)
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        p = Path(text)
        if _is_zarr(p):  # a zarr store is one input, not a folder of inputs
            found = [p]
        elif p.is_dir():
            children = list(p.iterdir())
            errors += [_dangling_error(c) for c in sorted(children, key=lambda c: _natural_key(c.name))
                       if _dangling(c)]
            found = sorted((c for c in children if _supported(c)), key=lambda c: _natural_key(c.name))
            if not found:
                errors.append(InputError(f"{text}: folder has no supported images "
                                         f"(supported: {supported})"))
        elif p.exists():
            found = [p]
        elif re.search(r"[*?\[]", text):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            errors += [_dangling_error(m) for m in sorted(matches, key=lambda m: _natural_key(str(m))) if _dangling(m)]
            found = sorted((m for m in matches if _supported(m)), key=lambda m: _natural_key(str(m)))
            if not found:
                why = (f"matches no supported image (supported: {supported})" if matches
                       else "matches no file; check the pattern and the folder")
                errors.append(InputError(f"{text}: {why}"))
        elif p.is_symlink():
            found = []
            errors.append(_dangling_error(p))
        else:
            found = []
            errors.append(InputError(f"{text}: file or folder not found; check the path and spelling"))
        for f in found:
            key = os.path.normcase(str(f.resolve()))
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, errors
