"""Qt-free helpers shared by the plugin: layer scale <-> pixel size, colours, messages, model files.

Layer conventions (what the reader writes and the widgets read):

* ``scale`` is the pixel size in nm on every axis and ``units`` is ``nm``; a stack's page axis
  has the page spacing when the file states it (``metadata["emseg_z_spacing_nm"]``), else the
  pixel size, as napari has no better default. ``metadata["emseg_pixel_size_nm"]`` repeats the
  pixel size, or holds None when the file has no calibration (then the scale is 1 pixel).
* Labels layers made by emseg carry their class names as ``features`` (columns ``index`` and
  ``class``, one row per label value) and in ``metadata["emseg_classes"]``; label k is drawn
  in colour k of :data:`emseg.io.write.PALETTE`, the colours of ``emseg predict``'s overlays.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "emseg[napari]"'
PIXEL_SIZE_KEY = "emseg_pixel_size_nm"
Z_SPACING_KEY = "emseg_z_spacing_nm"
CLASSES_KEY = "emseg_classes"
MODEL_KEY = "emseg_model"
MODEL_SUFFIX = ".safetensors"


class Cancelled(Exception):
    """Raised inside a worker's progress callback when the user pressed Cancel/Stop."""


def load_torch_beside_opengl() -> None:
    """Import torch, and its optional triton with ``RTLD_DEEPBIND`` (Linux), before torchvision needs it.

    torchvision imports triton through ``torch._dynamo``. triton's library carries its own LLVM,
    which crashes (segmentation fault) when it is loaded into a process where Mesa's OpenGL driver
    (llvmpipe, radeonsi: what Xvfb, VMs and AMD GPUs use) has already loaded Mesa's LLVM, as
    napari's canvas has by the time a widget opens. Deep binding keeps triton on its own LLVM.
    """
    import torch  # noqa: F401 - loaded with the normal flags first
    if "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - torch copes without triton; the plugin never compiles
        log.debug("triton not importable: %s", exc)
    finally:
        sys.setdlopenflags(flags)


def require_napari() -> None:
    """Raise an ImportError naming the pip command when napari or its Qt parts are missing."""
    try:
        import magicgui  # noqa: F401
        import napari  # noqa: F401
        import qtpy  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the emseg napari plugin needs napari, magicgui and a Qt binding "
                          f"({err}); install them with: {INSTALL_HINT}") from err


# -- scale -------------------------------------------------------------------------------------

def layer_kwargs(pixel_size_nm: float | None, ndim: int, z_spacing_nm: float | None = None) -> dict[str, Any]:
    """``scale``/``units``/``metadata`` keyword arguments for a layer of ``ndim`` axes (``z_spacing_nm``:
    the page spacing of a stack, its scale along the page axis)."""
    if pixel_size_nm is None:
        return {"metadata": {PIXEL_SIZE_KEY: None}}
    scale = [float(pixel_size_nm)] * ndim
    meta = {PIXEL_SIZE_KEY: float(pixel_size_nm)}
    if z_spacing_nm and ndim == 3:
        scale[0] = float(z_spacing_nm)
        meta[Z_SPACING_KEY] = float(z_spacing_nm)
    return {"scale": tuple(scale), "units": ("nm",) * ndim, "metadata": meta}


def voxel_size_of(layer) -> tuple[float, float, float] | None:
    """``(z, y, x)`` in nm of a 3D layer whose page spacing and pixel size are known, else None."""
    px = pixel_size_of(layer)
    z = (getattr(layer, "metadata", None) or {}).get(Z_SPACING_KEY)
    if px is None or not z or getattr(layer, "ndim", 0) != 3:
        return None
    return float(z), px, px


def pixel_size_of(layer) -> float | None:
    """The pixel size (nm/px) of a napari layer: from emseg's metadata, else its scale and units."""
    meta = getattr(layer, "metadata", None) or {}
    if PIXEL_SIZE_KEY in meta:
        value = meta[PIXEL_SIZE_KEY]
        return float(value) if value else None
    try:
        unit = layer.units[-1]
        factor = float((1 * unit).to("nm").magnitude)
    except Exception:  # noqa: BLE001 - pixel units, or napari without units
        return None
    value = float(layer.scale[-1]) * factor
    return value if math.isfinite(value) and value > 0 else None


#: beyond this ratio between the image's and the model's pixel sizes, images are not rescaled
MAX_RESCALE = 8.0


def scale_mismatch(image_nm: float | None, model_nm: float | None) -> str | None:
    """A message when rescaling an image to the model's pixel size would be absurd, else None.

    Rescaling by more than :data:`MAX_RESCALE` (say a 0.01 nm/px atomic-resolution STEM image
    for a 6 nm/px model) would shrink the image to a few pixels or blow it up beyond memory;
    such images are segmented and trained on at their own pixels instead.
    """
    if not image_nm or not model_nm:
        return None
    ratio = image_nm / model_nm
    if 1 / MAX_RESCALE <= ratio <= MAX_RESCALE:
        return None
    return (f"the image's pixel size ({image_nm:.3g} nm) is {max(ratio, 1 / ratio):.0f}x "
            f"{'finer' if ratio < 1 else 'coarser'} than the model's ({model_nm:.3g} nm); "
            "used at its own pixels, not rescaled")


def find_layer(viewer, name: str, kind: type | None = None):
    """The viewer's layer called ``name`` (of type ``kind``), or None.

    Plugin widgets see the viewer through a proxy that wraps layers anew on every access, so
    layers are found by their (unique) names, never compared by identity.
    """
    return next((layer for layer in viewer.layers
                 if layer.name == name and (kind is None or isinstance(layer, kind))), None)


def layer_position(viewer, name: str) -> int:
    return [layer.name for layer in viewer.layers].index(name)


def page_index(layer, world_point: Sequence[float]) -> int:
    """The page of a 3D ``layer`` shown at the viewer's current ``world_point``."""
    data_point = layer.world_to_data(world_point)
    return int(np.clip(round(float(data_point[0])), 0, layer.data.shape[0] - 1))


# -- classes and colours -----------------------------------------------------------------------

def class_features(classes: Sequence[str]) -> dict[str, list]:
    """A Labels layer's features table: one row per label value with its class name."""
    return {"index": list(range(len(classes))), "class": list(classes)}


def label_colors(n_labels: int) -> dict[int | None, tuple[float, ...]]:
    """Label value -> RGBA: 0 transparent, k -> PALETTE[(k - 1) % 7] (as in emseg's overlays)."""
    from emseg.io.write import PALETTE
    colors: dict[int | None, tuple[float, ...]] = {None: (0.5, 0.5, 0.5, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for k in range(1, max(n_labels, 8)):
        r, g, b = PALETTE[(k - 1) % len(PALETTE)]
        colors[k] = (float(r), float(g), float(b), 1.0)
    return colors


def label_colormap(n_labels: int):
    """A napari DirectLabelColormap with :func:`label_colors`."""
    from napari.utils.colormaps import DirectLabelColormap
    return DirectLabelColormap(color_dict=label_colors(n_labels))


SCRIBBLE_BACKGROUND = (0.92, 0.92, 0.92, 1.0)


def scribble_features(classes: Sequence[str]) -> dict[str, list]:
    """Features of a scribble layer: label 0 is not annotated, label k is class k - 1."""
    return {"index": list(range(len(classes) + 1)), "class": ["(not annotated)", *classes]}


def scribble_colors(n_classes: int) -> dict[int | None, tuple[float, ...]]:
    """Scribble label k + 1 gets the colour of class k in results; class 0 (background) light grey."""
    shown = label_colors(n_classes + 1)
    colors: dict[int | None, tuple[float, ...]] = {None: shown[None], 0: (0.0, 0.0, 0.0, 0.0),
                                                   1: SCRIBBLE_BACKGROUND}
    for k in range(1, max(n_classes, 8)):
        colors[k + 1] = shown[k]
    return colors


def labels_layer_kwargs(classes: Sequence[str], pixel_size_nm: float | None, ndim: int, *,
                        z_spacing_nm: float | None = None, **extra_meta: Any) -> dict[str, Any]:
    """Everything but the data for a Labels layer holding emseg classes."""
    kwargs = layer_kwargs(pixel_size_nm, ndim, z_spacing_nm)
    kwargs["metadata"].update({CLASSES_KEY: list(classes), **extra_meta})
    kwargs["features"] = class_features(classes)
    kwargs["colormap"] = label_colormap(len(classes))
    return kwargs


# -- messages ----------------------------------------------------------------------------------

def describe_error(exc: BaseException, doing: str = "") -> str:
    """A one-line message for the user saying what went wrong and what to do."""
    from emseg.errors import EmsegError
    where = f"{doing}: " if doing else ""
    if isinstance(exc, EmsegError):
        return f"{where}{exc}"
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return (f"{where}out of GPU memory. Lower the tile size (or the batch size), close other "
                "programs that use the GPU, or choose device 'cpu'")
    if isinstance(exc, MemoryError):
        return f"{where}out of memory. Segment the current slice only, or crop the image"
    if isinstance(exc, ValueError):
        return f"{where}{text}"
    return f"{where}{type(exc).__name__}: {text} (see the log for the traceback)"


def notify(message: str, *, error: bool = False) -> None:
    """Show a napari notification; without napari, log the message instead."""
    try:
        from napari.utils.notifications import show_error, show_info
    except ImportError:
        (log.error if error else log.info)("%s", message)
        return
    log.debug("%s", message)
    (show_error if error else show_info)(message)


def notify_warning(message: str) -> None:
    """Show a napari warning notification; without napari, log it."""
    try:
        from napari.utils.notifications import show_warning
    except ImportError:
        log.warning("%s", message)
        return
    log.debug("%s", message)
    show_warning(message)


# -- model files -------------------------------------------------------------------------------

def user_model_dir() -> Path:
    """Where fine-tuned models are saved by default: ``$EMSEG_MODEL_DIR`` or ``~/.emseg/models``."""
    env = os.environ.get("EMSEG_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".emseg" / "models"


def safe_name(text: str) -> str:
    """``text`` reduced to characters that are safe in a file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return name or "model"


def model_label(path: Path) -> str:
    """How a model file is named in the widgets: its stem, or its run folder's name for ``RUN/model.safetensors``."""
    return path.parent.name if path.stem == "model" else path.stem


def timestamped_model_path(folder: Path, name: str) -> Path:
    """``folder/NAME-YYYYmmdd-HHMMSS.safetensors``, not yet existing."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{safe_name(name)}-{stamp}{MODEL_SUFFIX}"
    n = 2
    while path.exists():
        path = folder / f"{safe_name(name)}-{stamp}-{n}{MODEL_SUFFIX}"
        n += 1
    return path


class ModelRegistry:
    """The model files the widgets offer: the bundled default, the user folder, and added files.

    Shared by every Segment and Fine-tune widget of the session, so a model saved by Fine-tune
    appears (and can be selected) in Segment. Listeners get ``(path_to_select_or_None)``.
    """

    def __init__(self) -> None:
        self._added: list[Path] = []
        self._listeners: list[Callable[[Path | None], None]] = []
        self.latest: Path | None = None  # the last model announced with select=True

    def entries(self) -> list[tuple[str, Path]]:
        """``(label, path)`` of every existing model: default first, then newest first."""
        from emseg.model.modelfile import default_model_path
        out: list[tuple[str, Path]] = []
        seen: set[Path] = set()

        def add(label: str, path: Path) -> None:
            key = path.resolve()
            if key not in seen and path.exists():
                seen.add(key)
                out.append((label, path))

        add("default (bundled)", default_model_path())
        folder = user_model_dir()
        found = sorted([*folder.glob(f"*{MODEL_SUFFIX}"), *folder.glob(f"*/model{MODEL_SUFFIX}")], key=_mtime,
                       reverse=True) if folder.is_dir() else []  # files, and run folders (Pretrain's)
        for path in [*reversed(self._added), *found]:
            add(model_label(path), path)
        return out

    def add(self, path: str | os.PathLike, *, select: bool = True) -> Path:
        """Offer ``path`` in every widget (and select it there when ``select``)."""
        path = Path(path)
        if path not in self._added:
            self._added.append(path)
        if select:
            self.latest = path
        for listener in list(self._listeners):
            try:
                listener(path if select else None)
            except RuntimeError:  # its Qt widget was deleted
                self.disconnect(listener)
        return path

    def connect(self, listener: Callable[[Path | None], None]) -> None:
        self._listeners.append(listener)

    def disconnect(self, listener: Callable[[Path | None], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


MODELS = ModelRegistry()


class ModelCache:
    """Loaded models keyed by path and modification time, so re-running does not reload."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], Any] = {}

    def get(self, path: Path):
        from emseg.model.modelfile import load_model
        stat = path.stat() if path.exists() else None
        key = (str(path.resolve()), stat.st_mtime_ns if stat else 0)
        if key not in self._cache:
            self._cache.clear()  # one model at a time: they can be large
            self._cache[key] = load_model(path)
        return self._cache[key]
