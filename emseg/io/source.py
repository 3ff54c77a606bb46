"""The image that every reader returns: :class:`ImageSource`, a greyscale page or stack read lazily, page by page.

The readers (:mod:`emseg.io.read`, :mod:`emseg.io.zarr_store`) build it; its checks of shape and dtype
(:func:`_validate`) and of a pixel-size override (:func:`_check_override`) are shared by them.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from emseg.errors import InputError

log = logging.getLogger(__name__)


def _check_override(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name}: pixel size must be a positive number of nm per pixel, "
                         f"got {value!r}")
    return v


class ImageSource:
    """A lazily read greyscale image or stack, page by page.

    Built by :func:`open_image` or :func:`array_source`; reads are serialised with a
    lock, so pages may be requested from several threads.
    """

    def __init__(self, *, path: Path | None, name: str, shape: tuple[int, int, int],
                 dtype: np.dtype, pixel_size_nm: float | None, is_stack: bool,
                 read: Callable[[int], Any], close: Callable[[], None] | None = None,
                 z_spacing_nm: float | None = None) -> None:
        self.path = path
        self.name = name
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.pixel_size_nm = pixel_size_nm
        self.is_stack = is_stack
        self.z_spacing_nm = z_spacing_nm
        self._read = read
        self._close = close
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"ImageSource({self.name!r}, shape={self.shape}, dtype={self.dtype}, "
                f"pixel_size_nm={self.pixel_size_nm}, is_stack={self.is_stack})")

    @property
    def voxel_size_nm(self) -> tuple[float, float, float] | None:
        """``(z, y, x)`` in nm when the page spacing and the pixel size are both known, else None."""
        if self.z_spacing_nm is None or self.pixel_size_nm is None:
            return None
        return (float(self.z_spacing_nm), float(self.pixel_size_nm), float(self.pixel_size_nm))

    def page(self, i: int) -> np.ndarray:
        """Read page ``i`` (negative counts from the end) as a 2D array in the original dtype.

        The array may be a view of the source data (array sources): do not modify it.
        Raises InputError if the page cannot be read or holds NaN/inf values.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.name}: page {i} out of range for {n} page(s)")
        i %= n
        try:
            with self._lock:
                data = self._read(i)
            data = np.asarray(data.compute() if hasattr(data, "compute") else data)
            data = data.reshape(self.shape[1:])
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder error means a bad file
            raise InputError(f"{self.name}: page {i + 1} of {n} cannot be read: {err}. "
                             "Is the file complete?") from err
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            raise InputError(f"{self.name}: page {i + 1} of {n} has {bad} NaN or infinite "
                             "value(s); replace them (e.g. with the image mean) and save again")
        return data

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.page(i)

    def close(self) -> None:
        """Release the file; further page() calls fail."""
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _grey_from_rgb(rgb: np.ndarray, name: str) -> np.ndarray:
    """Return channel 0 of a (h, w, 3|4) image whose colour channels are equal, else raise."""
    if rgb.ndim == 3 and rgb.shape[-1] in (3, 4):
        opaque = rgb.shape[-1] == 3 or np.all(rgb[..., 3] == rgb[..., 3].flat[0])
        if opaque and np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            log.info("%s: RGB image with equal channels, read as greyscale", name)
            return np.ascontiguousarray(rgb[..., 0])
    raise InputError(f"{name}: is an RGB image; emseg segments single-channel greyscale EM "
                     "images: convert it to greyscale first")


def _validate(shape: Sequence[int], dtype: np.dtype, name: str) -> tuple[int, int, int]:
    """Check dtype and shape of an image whose last two axes are (height, width).

    Returns:
        ``(pages, height, width)`` after dropping leading singleton axes.
    """
    if dtype.names is not None:  # structured dtype: hyperspy's rgb8/rgb16
        raise InputError(f"{name}: is an RGB image; emseg segments single-channel greyscale EM "
                         "images: convert it to greyscale first")
    if dtype.kind == "c":
        raise InputError(f"{name}: has complex values ({dtype}); emseg takes real-valued images: "
                         "save the amplitude or phase as a real image first")
    if dtype.kind not in "biuf":
        raise InputError(f"{name}: has data type {dtype}, not numeric; emseg takes integer or "
                         "floating-point greyscale images")
    if len(shape) < 2 or min(shape) == 0:
        raise InputError(f"{name}: is empty or not an image (shape {tuple(shape)}); "
                         "emseg takes a 2D image or a 3D stack (pages, height, width)")
    lead = [int(n) for n in shape[:-2] if n != 1]
    if len(lead) > 1:
        full = (*lead, *shape[-2:])
        raise InputError(f"{name}: has shape {full}, {len(full)} dimensions; emseg takes a 2D "
                         "image or a 3D stack (pages, height, width): split or reduce it first")
    return (lead[0] if lead else 1, int(shape[-2]), int(shape[-1]))
