"""Output side of the image I/O layer: atomic TIFF stacks and overlay previews.

Import these names from :mod:`emseg.io.read`; they live here only to keep modules short.

Contract:

* Every writer is atomic: data goes to a hidden temporary file in the destination
  folder (``.NAME.partial-PID-N-hHOST.SUFFIX``: process id, a counter and a tag of the
  machine) and is renamed onto the final path with :func:`os.replace` only when complete;
  on error the temporary file is deleted and an existing file at the final path is left
  untouched. A process killed outright cannot delete its temporary files:
  :func:`remove_stale_partials` removes those of processes of this machine that are gone,
  and the commands call it when they start writing into a folder.
* :func:`check_output_folder` / :func:`check_output_file` refuse an output location that
  cannot be written (a file where a folder is wanted, a read-only folder, an input) with
  one line, before any work.
* :class:`TiffStackWriter` writes ONE TIFF series of shape ``(h, w)``, ``(pages, h, w)``
  or ``(pages, C, h, w)`` that :func:`tifffile.imread` returns with that full shape.
  The pixel size (nm/px) is stored twice: as TIFF XResolution/YResolution in pixels per
  centimetre (ResolutionUnit CENTIMETER, read by Fiji) and as ``"pixel_size_nm"`` in
  tifffile's JSON ("shaped") ImageDescription, next to any extra ``metadata``.
* :func:`write_overlay_png` writes an 8-bit RGB PNG whose longer side is ``<= max_size``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import queue
import re
import shutil
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from emseg.errors import InputError

log = logging.getLogger(__name__)

#: Okabe-Ito colours (colour-blind friendly, black left out): label k gets entry (k-1) % 7.
PALETTE = np.array(
    [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
     (0, 114, 178), (213, 94, 0), (204, 121, 167)], dtype=np.float32) / 255.0

_BIGTIFF_BYTES = 3_500_000_000  # above this uncompressed size, write BigTIFF
_MAX_RATIONAL = 2**32 - 1       # TIFF RATIONAL numerators are uint32
_counter = itertools.count()
_END = object()
_ABORT = object()


class _Aborted(Exception):
    """Raised inside the page generator to stop tifffile when the writer is aborted."""


#: tags this machine in temporary names, so that a folder shared by several machines is cleaned
#: only of the files of this machine's dead processes
_HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]
#: what the atomic writers leave when killed: ``.NAME.partial-PID-N-hHOST.SUFFIX`` (older emseg:
#: no host tag) and the zarr writer's ``.NAME.old-PID`` (the replaced store, between two renames)
_STALE = re.compile(r"^\..+\.(?:partial|old)-(?P<pid>\d+)(?:-\d+)?(?:-h(?P<host>[0-9a-f]{6}))?(?:\.[^.]*)?$")


def _temp_path(path: Path) -> Path:
    """Hidden temporary path next to ``path`` that never looks like a finished output."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}-{next(_counter)}-h{_HOST_TAG}{path.suffix}")


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (True when that cannot be told)."""
    if pid == os.getpid():
        return True
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.pid_exists(pid)
    if sys.platform == "win32":  # os.kill would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and stores that killed emseg processes left in ``folder``.

    Only files named as the atomic writers name them, whose process (by id, on this machine) is
    gone; those of other machines sharing the folder, and of live processes, are kept.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _STALE.match(path.name)
        if match is None or (match["host"] is not None and match["host"] != _HOST_TAG):
            continue
        if _process_alive(int(match["pid"])):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.debug("could not remove %s: %s", path, exc)
            continue
        log.info("removed %s, left by an interrupted run (process %s)", path, match["pid"])
        removed.append(path)
    return removed


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None when they can."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".emseg-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc})"
    return None


def check_output_folder(folder: str | os.PathLike, option: str = "-o") -> Path:
    """Create ``folder`` if missing and check that files can be written into it.

    Raises InputError (one line naming the folder and the option) when ``folder`` is a file or
    lies under one, or cannot be written (read-only, no permission).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: {option} must be a folder, but this is a file; give a folder "
                         "(it is created if missing)")
    why = _unwritable(folder)
    if why is not None:
        raise InputError(f"{folder}: {why}; give {option} a folder you can write to")
    return folder


def check_output_file(path: str | os.PathLike, option: str = "-o",
                      inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Check that the file ``path`` can be written (its folder is created if missing) and is no input.

    Raises InputError (one line naming the path and the option) when ``path`` is a folder or one of
    ``inputs``, or when its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: {option} is an existing folder; give the path of a file to write")
    for item in inputs:
        if Path(item).exists() and path.exists() and os.path.samefile(path, item):
            raise InputError(f"{path}: {option} would overwrite the input {item}; choose another file name")
    why = _unwritable(path.parent)
    if why is not None:
        raise InputError(f"{path}: {why}; give {option} a path in a folder you can write to")
    return path


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the folder of ``path``; rename it to ``path`` on success.

    On an exception inside the ``with`` block the temporary file is deleted and
    ``path`` is not touched. The temporary path keeps the suffix of ``path`` so that
    writers that pick a format by suffix (PIL, matplotlib, tifffile) still work.
    """
    path = Path(path)
    tmp = _temp_path(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not tmp.exists():
        raise FileNotFoundError(f"{path}: nothing was written to the temporary file {tmp.name}")
    os.replace(tmp, path)


class StackWriterBase:
    """What the page-by-page writers share: shape and dtype rules, and the atomic close/abort protocol.

    A subclass writes into a temporary path and implements ``_raise_pending()`` (wait for or
    check the background writes, raising if one failed), ``_pages_written()``, ``_commit()``
    (finish and rename the temporary output onto ``path``) and ``_discard()`` (stop and delete it).
    """

    path: Path

    def _init_shape(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: Any,
                    pixel_size_nm: float | None) -> float | None:
        """Set path, shape, dtype, n_pages and the page shape; return the checked pixel size."""
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        if not 2 <= len(self.shape) <= 4 or min(self.shape) < 1:
            raise ValueError(f"{self.path}: cannot write shape {self.shape}; expected (h, w), "
                             "(pages, h, w) or (pages, C, h, w) with all sizes >= 1")
        self.n_pages = 1 if len(self.shape) == 2 else self.shape[0]
        self._page_shape = self.shape if len(self.shape) == 2 else self.shape[1:]
        self._state = "open"  # -> "closed" | "aborted"
        if pixel_size_nm is None:
            return None
        pixel_size_nm = float(pixel_size_nm)
        if not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
            raise ValueError(f"{self.path}: pixel_size_nm must be a positive number, got {pixel_size_nm}")
        return pixel_size_nm

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.path}: write_page() after the writer was {self._state}")

    def _check_cast(self, page: np.ndarray) -> None:
        """Allow safe casts, integer narrowing when values fit, and int/float -> float."""
        src, dst = page.dtype, self.dtype
        if np.can_cast(src, dst, casting="safe") or (dst.kind == "f" and src.kind in "biuf"):
            return
        if dst.kind in "iu" and src.kind in "biu":
            info = np.iinfo(dst)
            if page.size == 0 or (page.min() >= info.min and page.max() <= info.max):
                return
            raise ValueError(f"{self.path}: page values {page.min()}..{page.max()} do not fit {dst}")
        raise ValueError(f"{self.path}: page dtype {src} cannot be stored as {dst}")

    def close(self) -> Path:
        """Wait for the writes, check that every page was written, and rename the output onto the path."""
        if self._state == "closed":
            return self.path
        if self._state == "aborted":
            raise RuntimeError(f"{self.path}: close() after abort(); nothing was saved")
        self._raise_pending()
        written = self._pages_written()
        if written != self.n_pages:
            self.abort()
            raise ValueError(f"{self.path}: {written} of {self.n_pages} pages were written; "
                             "the output was not saved")
        self._commit()
        self._state = "closed"
        log.debug("wrote %s %s %s", self.path, self.shape, self.dtype)
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the temporary output; the final path is never touched."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TiffStackWriter(StackWriterBase):
    """Writes a TIFF page by page, atomically: to a temporary file in the same folder, renamed on close().

    Pages go through a bounded queue (2 pages) to a background thread that runs one
    ``tifffile.TiffWriter.write(iterator, shape=..., dtype=...)`` call, so compression
    overlaps with the caller's computation and the file holds a single series.

    Args:
        path: final output path.
        shape: ``(h, w)`` for one 2D image, ``(pages, h, w)`` for a stack, or
            ``(pages, C, h, w)`` (e.g. class probabilities); ``write_page`` then takes
            ``(h, w)``, ``(h, w)`` or ``(C, h, w)`` arrays respectively.
        dtype: pixel type; integer pages are cast when their values fit, any real
            pages to a float dtype; float pages are never cast to integers.
        pixel_size_nm: physical pixel size in nm/px, or None when unknown.
        compression: tifffile compression name (``"zlib"`` default) or None.
        bigtiff: None chooses BigTIFF when the uncompressed size exceeds ~3.5 GB.
        metadata: extra JSON-serialisable entries for the ImageDescription.
    """

    def __init__(self, path: str | os.PathLike, *, shape: tuple[int, ...], dtype: Any,
                 pixel_size_nm: float | None = None, compression: str | None = "zlib",
                 bigtiff: bool | None = None, metadata: dict | None = None) -> None:
        import tifffile

        pixel_size_nm = self._init_shape(path, shape, dtype, pixel_size_nm)
        meta = dict(metadata or {})
        kwargs: dict[str, Any] = {}
        if pixel_size_nm is not None:
            meta["pixel_size_nm"] = pixel_size_nm
            per_cm = 1e7 / pixel_size_nm
            if per_cm <= _MAX_RATIONAL:
                kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            else:  # below ~0.0023 nm/px the TIFF tag overflows; the JSON entry still holds it
                log.info("%s: pixel size %.3g nm too small for TIFF resolution tags; "
                         "stored in the description only", self.path, pixel_size_nm)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: metadata must be JSON-serialisable: {err}") from None
        if compression in (None, "none", "None"):
            compression = None
        if bigtiff is None:
            bigtiff = math.prod(self.shape) * self.dtype.itemsize > _BIGTIFF_BYTES
        self._write_kwargs = dict(shape=self.shape, dtype=self.dtype, photometric="minisblack",
                                  compression=compression, metadata=meta, **kwargs)
        self._tmp = _temp_path(self.path)
        self._tw = tifffile.TiffWriter(self._tmp, bigtiff=bigtiff)  # fails here on a bad folder
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._written = 0
        self._thread = threading.Thread(target=self._run, name=f"tiff-writer:{self.path.name}",
                                        daemon=True)
        self._thread.start()

    # background side
    def _planes(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted()
            if item.ndim == 3:  # (C, h, w): tifffile pages are 2D planes
                yield from item
            else:
                yield item

    def _run(self) -> None:
        try:
            self._tw.write(self._planes(), **self._write_kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            self._error = err
        finally:
            try:
                self._tw.close()
            except BaseException as err:  # noqa: BLE001
                self._error = self._error or err

    # caller side
    def _put(self, item: object) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    return  # the consumer is gone; its error (if any) is reported next

    def _raise_pending(self) -> None:
        err = self._error
        if err is not None and not isinstance(err, _Aborted):
            self.abort()
            raise OSError(f"{self.path}: writing the TIFF failed: {err}") from err

    def write_page(self, page: np.ndarray) -> None:
        """Queue the next page (in order); raises if the background writer failed.

        ``page`` has the page shape (``shape[1:]``, or ``shape`` for a 2D image), or one
        more leading axis to write several consecutive pages at once.
        """
        self._check_open()
        self._raise_pending()
        page = np.asarray(page)
        if page.shape == self._page_shape:
            block = page[None]
        elif page.shape[1:] == self._page_shape:
            block = page  # several consecutive pages at once
        else:
            raise ValueError(f"{self.path}: page {self._written} has shape {page.shape}, "
                             f"expected {self._page_shape}")
        if self._written + len(block) > self.n_pages:
            raise ValueError(f"{self.path}: more than the {self.n_pages} pages declared in shape")
        self._check_cast(page)
        for one in block:
            # always copy: the caller may reuse its buffer while the thread still compresses
            self._put(np.array(one, dtype=self.dtype, order="C", copy=True))
            self._written += 1
        self._raise_pending()

    def _pages_written(self) -> int:
        return self._written

    def _commit(self) -> None:
        self._put(_END)
        self._thread.join()
        self._raise_pending()
        os.replace(self._tmp, self.path)

    def _discard(self) -> None:
        if self._thread.is_alive():
            self._put(_ABORT)
            self._thread.join()
        self._tmp.unlink(missing_ok=True)


def _downsample_image(image: np.ndarray, f: int) -> np.ndarray:
    """Block-mean downsampling by an integer factor (edges padded by replication)."""
    img = image.astype(np.float32, copy=False)
    if f == 1:
        return img
    h, w = img.shape
    img = np.pad(img, ((0, -h % f), (0, -w % f)), mode="edge")
    return img.reshape(img.shape[0] // f, f, img.shape[1] // f, f).mean(axis=(1, 3))


def _downsample_labels(labels: np.ndarray, f: int) -> np.ndarray:
    """Downsample labels so thin structures survive: a block takes its most frequent
    non-zero label if that covers at least 1/f of the block (a 1-pixel line), else 0."""
    if f == 1:
        return labels
    lab = np.pad(np.maximum(labels, 0), ((0, -labels.shape[0] % f), (0, -labels.shape[1] % f)))
    top = int(lab.max())
    present = np.flatnonzero(np.bincount(lab.ravel())[1:]) + 1 if top <= 4096 else None
    if present is None or len(present) > 64:  # instance labels: counting would be too slow
        return lab[f // 2::f, f // 2::f]
    blocks = lab.reshape(lab.shape[0] // f, f, lab.shape[1] // f, f)
    best = np.zeros((blocks.shape[0], blocks.shape[2]), labels.dtype)
    best_count = np.full(best.shape, f - 1, np.int64)  # need >= f pixels
    for k in present:
        count = (blocks == k).sum(axis=(1, 3))
        better = count > best_count
        best[better], best_count[better] = k, count[better]
    return best


def write_overlay_png(path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, *,
                      class_names: Sequence[str] | None = None, max_size: int = 1024,
                      alpha: float = 0.4) -> Path:
    """Write a small RGB preview PNG: greyscale image with coloured labels (0 transparent).

    Args:
        path: output PNG path (written atomically).
        image: 2D greyscale image; contrast is stretched between its 1st and 99th percentile.
        labels: 2D integer labels of the same shape; label k > 0 gets ``PALETTE[(k-1) % 7]``.
        class_names: names indexed by label (entry 0, background, is not shown); when
            given, a legend of labels 1.. is drawn in the upper right corner.
        max_size: the longer side of the PNG is at most this many pixels.
        alpha: opacity of the label colours.

    Returns:
        The written path.
    """
    from PIL import Image

    path = Path(path)
    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim != 2 or labels.shape != image.shape:
        raise ValueError(f"{path}: overlay needs a 2D image and labels of the same shape, "
                         f"got {image.shape} and {labels.shape}")
    f = max(1, math.ceil(max(image.shape) / max(1, int(max_size))))
    small = _downsample_image(image, f)
    lab = _downsample_labels(labels.astype(np.int64, copy=False), f)
    lo, hi = np.percentile(small, [1, 99])
    grey = np.clip((small - lo) / (hi - lo), 0, 1) if hi > lo else np.full(small.shape, 0.5, np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    mask = lab > 0
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * PALETTE[(lab[mask] - 1) % len(PALETTE)]
    rgb8 = np.round(rgb * 255).astype(np.uint8)
    if class_names is not None and len(class_names) > 1:
        rgb8 = _add_legend(rgb8, list(class_names))
    with atomic_output(path) as tmp:
        Image.fromarray(rgb8, mode="RGB").save(tmp, format="PNG")
    return path


def _add_legend(rgb8: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Draw a legend of class_names[1:] onto an RGB image with matplotlib (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    h, w = rgb8.shape[:2]
    dpi = 100
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(rgb8, interpolation="nearest")
    handles = [Patch(facecolor=PALETTE[(k - 1) % len(PALETTE)], edgecolor="black", label=name)
               for k, name in enumerate(class_names) if k > 0]
    fontsize = float(np.clip(max(h, w) / 60, 6, 14))
    ax.legend(handles=handles, loc="upper right", fontsize=fontsize, framealpha=0.85,
              borderaxespad=0.3, handlelength=1.2)
    canvas.draw()
    out = np.asarray(canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(out)
