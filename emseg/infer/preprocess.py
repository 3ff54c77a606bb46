"""Page preprocessing shared by inference and training: normalisation and pixel-size rescaling.

Pages are 2D arrays ``(H, W)`` of any real dtype; normalised pages are float32. Both steps are torch
operations on the page's device, so a page uploaded to a GPU in its raw dtype is normalised and
rescaled there, with no host round trip and no host synchronisation (the percentiles stay on the
device as tensors). :func:`normalize_page` is the same computation for numpy pages.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from emseg.errors import InputError
from emseg.model.card import Normalization

_PERCENTILE_SAMPLES = 1_000_000  # enough for stable percentiles; keeps 8k x 8k pages cheap
#: largest page (pixels) that rescaling to the model's pixel size may produce
MAX_SCALED_PIXELS = 2**31


def _order_statistics(sample: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """The ``ranks``-th smallest values (0-based) of a 1-D sample, as 0-d float32 tensors on its
    device: from a histogram for integers of up to 16 bits (one pass), else by selection."""
    if sample.dtype in (torch.uint8, torch.int8, torch.int16, torch.uint16):
        low = -32768 if sample.dtype == torch.int16 else (-128 if sample.dtype == torch.int8 else 0)
        counts = torch.bincount(sample.to(torch.int32) - low, minlength=2**16)
        cumulative = torch.cumsum(counts, 0)
        where = torch.tensor(ranks, device=sample.device, dtype=cumulative.dtype)
        values = (torch.searchsorted(cumulative, where, right=True) + low).to(torch.float32)
        return list(values.unbind())
    sample = sample.to(torch.float32)
    return [sample.kthvalue(k + 1).values for k in ranks]


def _percentiles(page: torch.Tensor, qs: tuple[float, float]) -> list[torch.Tensor]:
    """Percentiles ``qs`` (0-100) of a strided sample of about a million pixels, interpolated linearly
    between order statistics as numpy's default does; 0-d float32 tensors on the page's device."""
    step = max(1, int(math.sqrt(page.numel() / _PERCENTILE_SAMPLES)))
    sample = page[::step, ::step].reshape(-1)
    n = sample.numel()
    positions = [q / 100 * (n - 1) for q in qs]
    ranks = sorted({r for p in positions for r in (math.floor(p), min(n - 1, math.floor(p) + 1))})
    values = dict(zip(ranks, _order_statistics(sample, ranks)))
    out = []
    for p in positions:
        k = math.floor(p)
        frac = p - k
        out.append(values[k] if frac == 0 else torch.lerp(values[k], values[min(n - 1, k + 1)], frac))
    return out


def normalize_tensor(page: torch.Tensor, norm: Normalization, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Map a raw page tensor (any real dtype, any device) to network input as the card says.

    Returns float32 of the page's shape, written into ``out`` when given (a float32 tensor or view
    of that shape on the same device: the padded page's interior, say, so no page-sized buffer is
    allocated). On an accelerator the percentiles stay on the device (no host synchronisation).
    """
    if out is None:
        out = torch.empty(page.shape, dtype=torch.float32, device=page.device)
    out.copy_(page)
    if norm.method == "none":
        return out.sub_(norm.mean).div_(norm.std)
    lo, hi = _percentiles(page, (norm.low, norm.high))
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))  # a flat page: hi = lo + 1
    # clip((x - lo) / span, 0, 1), then (x - mean) / std: one affine map, clipped to the image of [0, 1]
    scale = 1.0 / (span * norm.std)
    shift = -(lo * scale) - norm.mean / norm.std
    if page.device.type == "cpu":  # scalar operands are faster there, and reading them costs nothing
        scale, shift = float(scale), float(shift)
        out.mul_(scale).add_(shift)
    else:
        torch.addcmul(shift, out, scale, out=out)
    return out.clamp_(-norm.mean / norm.std, (1.0 - norm.mean) / norm.std)


def normalize_page(page: np.ndarray, norm: Normalization) -> np.ndarray:
    """Map a raw numpy page to network input as the card says (float32, same shape)."""
    page = np.asarray(page)
    if page.dtype == bool:
        page = page.view(np.uint8)
    if not page.dtype.isnative:
        page = page.astype(page.dtype.newbyteorder("="))
    return normalize_tensor(torch.from_numpy(np.ascontiguousarray(page)), norm).numpy()


def rescale_factor(image_nm: float | None, model_nm: float | None, tolerance: float = 0.02) -> float:
    """How much to zoom an image so its pixels match the model's (1.0 when unknown or already close)."""
    if not image_nm or not model_nm:
        return 1.0
    factor = image_nm / model_nm
    return 1.0 if abs(factor - 1.0) <= tolerance else factor


def resize(array: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(C, H, W)`` (or ``(H, W)``) to ``shape`` on the array's device;
    anti-aliased when shrinking."""
    t = torch.as_tensor(array)
    squeeze = t.ndim == 2
    t = t[None, None] if squeeze else t[None]
    shrinking = shape[0] < t.shape[-2] or shape[1] < t.shape[-1]
    out = F.interpolate(t.float(), size=shape, mode="bilinear", align_corners=False, antialias=shrinking)[0]
    return out[0] if squeeze else out


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``shape`` zoomed by ``factor``, at least 1 pixel per side; an InputError when that would be
    absurdly large (over :data:`MAX_SCALED_PIXELS` pixels), before anything is allocated."""
    if not (math.isfinite(factor) and factor > 0):
        raise InputError(f"cannot rescale a page by {factor!r}; check the pixel sizes of the image and the model")
    h, w = shape[0] * factor, shape[1] * factor
    if h * w > MAX_SCALED_PIXELS:
        raise InputError(f"rescaling a {shape[0]} x {shape[1]} page by {factor:.3g} to the model's pixel size would "
                         f"make it {h:.3g} x {w:.3g} pixels; check the pixel size (--pixel-size, or the file's "
                         "metadata), which is far from the model's")
    return max(1, round(h)), max(1, round(w))


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
    from emseg.errors import InputError
    advice = ("check the pixel size in the file's metadata, or give the right one (--pixel-size, in nm per "
              "pixel)")
    if not (math.isfinite(factor) and 1 / MAX_RESCALE <= factor <= MAX_RESCALE):
        raise InputError(f"{name}: its pixel size {image_nm:.4g} nm differs from the model's {model_nm:.4g} nm "
                         f"by a factor {factor:.3g} (at most {MAX_RESCALE:g} either way); {advice}")
    try:
        h, w = scaled_shape(shape, factor)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None
    need = h * w * 4 * (channels + 1)
    memory = _physical_memory()
    if memory is not None and need > memory:
        raise InputError(f"{name}: at the model's pixel size ({model_nm:.4g} nm, this file {image_nm:.4g} nm) its "
                         f"{shape[0]}x{shape[1]} pages become {h}x{w} pixels: {need / 1e9:.3g} GB to segment, more "
                         f"than this machine's memory ({memory / 1e9:.3g} GB); {advice}, or crop the image")
