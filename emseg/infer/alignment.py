"""A systematic sub-pixel offset between annotations and the structures they trace.

Annotations can sit a fraction of a pixel off the image: ISBI 2012's membrane masks lie about half a
pixel above the dark lines they mark, on every slice (docs/training.md). A network trained with
flips and 90-degree rotations sees that offset in every direction, so it cannot learn it: it draws
the structure where the image has it, and every edge then disagrees with the annotation by that
fraction of a pixel.

A quarter of the way into a run, emseg measures the offset on the held-out annotation
(:func:`estimate_offset`) and moves the training images by it (:func:`shift_image`), so that image and
annotation agree and every flip and rotation of a crop agrees too; the model card stores the
offset (``label_offset``, in the model's pixels) and the predictor shifts its probabilities by it
(:func:`shift_probabilities`), so that the masks follow the annotators' convention. Every later
validation until 90 % of the run measures it again (one measurement moves by 0.1-0.3 px from one
validation to the next), and the images follow the mean of the measurements so far, moved anew when
that mean has changed by a tenth of a pixel and scores better; the end of the run measures once
more and keeps whichever offset, the images' or the mean's, scores the higher held-out IoU. On
annotation without such an offset the estimate is near zero and nothing moves.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from scipy import ndimage as ndi

from emseg.analysis.metrics import IGNORE

#: offsets smaller than this (pixels, in both axes) are treated as none
MIN_OFFSET = 0.05
#: whole-pixel moves of the prediction at which the agreement with the annotation is measured
SHIFTS = (-2, -1, 0, 1, 2)


def _agreement(probs: np.ndarray, target: np.ndarray, axis: int, shift: int) -> tuple[float, int]:
    """Sum of the probability given to the annotated class, with the prediction moved by ``shift``
    pixels along ``axis`` (1 = rows, 2 = columns of ``probs``), over the annotated pixels at least two
    pixels from the border, and their count."""
    h, w = target.shape
    b = max(SHIFTS)
    inner = target[b:h - b, b:w - b]
    if axis == 1:
        moved = probs[:, b - shift:h - b - shift, b:w - b]
    else:
        moved = probs[:, b:h - b, b - shift:w - b - shift]
    known = inner != IGNORE
    if not known.any():
        return 0.0, 0
    cls = np.where(known, inner, 0).astype(np.intp)[None]
    hit = np.take_along_axis(moved, cls, axis=0)[0]
    return float(hit[known].sum(dtype=np.float64)), int(known.sum())


def estimate_offset(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """The shift (rows, columns; pixels) that best moves predictions onto their annotations.

    ``pairs``: ``(probabilities (K, H, W), target (H, W))`` with ``IGNORE`` for unannotated pixels.
    For each axis the mean probability of the annotated class is taken with the prediction moved
    by -2 to +2 pixels; the offset is the peak of the parabola through the best whole shift (of -1, 0,
    +1) and its two neighbours, so at most 1.5 pixels (0 where there is no peak). Positive moves the
    prediction down / right, as :func:`scipy.ndimage.shift`.
    """
    sums = np.zeros((2, len(SHIFTS)))
    count = 0
    for probs, target in pairs:
        for a, axis in enumerate((1, 2)):
            for s, shift in enumerate(SHIFTS):
                total, n = _agreement(probs, target, axis, shift)
                sums[a, s] += total
        count += n  # the same pixels for every shift
    if count == 0:
        return 0.0, 0.0
    offset = []
    for curve in sums / count:
        k = 1 + int(np.argmax(curve[1:4]))  # index of the best of -1, 0, +1
        left, mid, right = curve[k - 1:k + 2]
        curvature = left - 2 * mid + right
        peak = SHIFTS[k] + (left - right) / (2 * curvature) if curvature < 0 else 0.0
        offset.append(float(np.clip(peak, -1.5, 1.5)))
    return offset[0], offset[1]


def is_offset(offset) -> bool:
    """Whether ``offset`` (rows, columns) is large enough to apply."""
    return offset is not None and max(abs(float(o)) for o in offset) >= MIN_OFFSET


def shift_image(image: np.ndarray, offset, pad: int = 16) -> np.ndarray:
    """A 2D image moved by ``offset`` (rows, columns) pixels without blurring it: a Fourier shift of
    the image mirror-padded by ``pad`` pixels (no ringing from the far edge), cropped back, and clipped
    to the image's own range (a Fourier shift overshoots at sharp edges; augmentations such as gamma
    need the values to stay within [0, 1])."""
    if not is_offset(offset):
        return image
    padded = np.pad(image.astype(np.float64, copy=False), pad, mode="reflect" if min(image.shape) > pad else "edge")
    moved = np.fft.irfft2(ndi.fourier_shift(np.fft.rfft2(padded), tuple(float(o) for o in offset), n=padded.shape[1]),
                          s=padded.shape)
    moved = moved[pad:pad + image.shape[0], pad:pad + image.shape[1]]
    return np.clip(moved, image.min(), image.max()).astype(image.dtype, copy=False)


def _shift_axis(t: torch.Tensor, shift: float, dim: int) -> torch.Tensor:
    """``t`` moved by ``shift`` pixels along ``dim``: linear interpolation, edges repeating their value."""
    n = t.shape[dim]
    where = (torch.arange(n, dtype=torch.float64, device=t.device) - shift).clamp_(0, n - 1)  # made on the device
    below = where.floor()
    frac = (where - below).to(t.dtype)
    below = below.long()
    above = (below + 1).clamp_(max=n - 1)
    shape = [1] * t.ndim
    shape[dim] = n
    return torch.lerp(t.index_select(dim, below), t.index_select(dim, above), frac.view(shape))


def shift_probabilities(probs, offset, scale: float = 1.0):
    """``probs`` (K, H, W) moved by ``offset`` (rows, columns) times ``scale`` pixels, by linear
    interpolation (each pixel's probabilities still sum to one); edges repeat their nearest value, as
    ``scipy.ndimage.shift(order=1, mode="nearest")``. A torch tensor is moved on its device; a numpy
    array gives a numpy array."""
    if not is_offset(offset):
        return probs
    dy, dx = (float(o) * scale for o in offset)
    t = torch.as_tensor(probs)
    moved = _shift_axis(_shift_axis(t, dy, t.ndim - 2), dx, t.ndim - 1)
    return moved if isinstance(probs, torch.Tensor) else moved.numpy()
