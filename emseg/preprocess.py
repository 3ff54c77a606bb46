"""Page preprocessing shared by inference and training: normalisation and pixel-size rescaling.

Pages are 2D arrays ``(H, W)`` of any real dtype; normalised pages are float32.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from .card import Normalization

_PERCENTILE_SAMPLES = 1_000_000  # enough for stable percentiles; keeps 8k x 8k pages cheap


def normalize_page(page: np.ndarray, norm: Normalization) -> np.ndarray:
    """Map a raw page to network input as the card says (float32, same shape)."""
    page = np.asarray(page)
    x = page.astype(np.float32, copy=False)
    if norm.method == "none":
        return ((x - norm.mean) / norm.std).astype(np.float32, copy=False)
    step = max(1, int(math.sqrt(page.size / _PERCENTILE_SAMPLES)))
    lo, hi = np.percentile(x[::step, ::step], [norm.low, norm.high])
    if hi <= lo:
        hi = lo + 1.0
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return ((x - norm.mean) / norm.std).astype(np.float32, copy=False)


def rescale_factor(image_nm: float | None, model_nm: float | None, tolerance: float = 0.02) -> float:
    """How much to zoom an image so its pixels match the model's (1.0 when unknown or already close)."""
    if not image_nm or not model_nm:
        return 1.0
    factor = image_nm / model_nm
    return 1.0 if abs(factor - 1.0) <= tolerance else factor


def resize(array: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(C, H, W)`` (or ``(H, W)``) to ``shape``; anti-aliased when shrinking."""
    t = torch.as_tensor(array)
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    shrinking = shape[0] < t.shape[-2] or shape[1] < t.shape[-1]
    out = F.interpolate(t.float(), size=shape, mode="bilinear", align_corners=False, antialias=shrinking)[0]
    return out[0] if squeeze else out


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``shape`` zoomed by ``factor``, at least 1 pixel per side."""
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


#: the most an input's pixel size may differ from the model's (either way) before emseg refuses it:
#: beyond this the structures the model learnt are smaller than a pixel, or many tiles wide
MAX_RESCALE = 100.0


def _physical_memory() -> int | None:
    """Bytes of physical memory of this machine, None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_rescale(name: str, shape: tuple[int, int], image_nm: float | None, model_nm: float | None,
                  channels: int = 1) -> None:
    """Refuse, before anything is allocated, a page whose pixel size would rescale it absurdly.

    Raises :class:`emseg.errors.InputError` (one line naming ``name``) when the input's pixel size
    differs from the model's by more than :data:`MAX_RESCALE` either way, or when the rescaled page
    with ``channels`` float32 planes (network input, class probabilities) would not fit in this
    machine's memory.
    """
    factor = rescale_factor(image_nm, model_nm)
    if factor == 1.0:
        return
    from .errors import InputError
    advice = ("check the pixel size in the file's metadata, or give the right one (--pixel-size, in nm per "
              "pixel)")
    if not (math.isfinite(factor) and 1 / MAX_RESCALE <= factor <= MAX_RESCALE):
        raise InputError(f"{name}: its pixel size {image_nm:.4g} nm differs from the model's {model_nm:.4g} nm "
                         f"by a factor {factor:.3g} (at most {MAX_RESCALE:g} either way); {advice}")
    h, w = scaled_shape(shape, factor)
    need = h * w * 4 * (channels + 1)
    memory = _physical_memory()
    if memory is not None and need > memory:
        raise InputError(f"{name}: at the model's pixel size ({model_nm:.4g} nm, this file {image_nm:.4g} nm) its "
                         f"{shape[0]}x{shape[1]} pages become {h}x{w} pixels: {need / 1e9:.3g} GB to segment, more "
                         f"than this machine's memory ({memory / 1e9:.3g} GB); {advice}, or crop the image")
