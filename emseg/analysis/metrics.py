"""Segmentation metrics: per-class IoU and Dice, pixel error, adapted Rand error.

Label arrays are integer class indices of equal shape; pixels whose target is :data:`IGNORE`
(unannotated) count nowhere. IoU and Dice come from one confusion matrix so that several pages can
be accumulated before the ratios are taken. The adapted Rand error is scikit-image's, as used by the
ISBI 2012 challenge, on connected regions (see :func:`rand_regions`); with a boundary class it is
foreground-restricted and the predicted boundaries are thinned, as in that challenge (see
:func:`adapted_rand_error`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE = 255  # target value of unannotated pixels


def confusion(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` counts, rows = target class, columns = predicted class."""
    keep = target != IGNORE
    t = target[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray, class_names: Sequence[str]) -> dict:
    """IoU and Dice per class (None where a class is absent from both target and prediction),
    their means over the classes other than the first (background), and the pixel error."""
    tp = np.diag(matrix).astype(np.float64)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    union = tp + fp + fn
    iou = {name: (float(tp[i] / union[i]) if union[i] else None) for i, name in enumerate(class_names)}
    dice = {name: (float(2 * tp[i] / (2 * tp[i] + fp[i] + fn[i])) if union[i] else None)
            for i, name in enumerate(class_names)}
    total = matrix.sum()
    foreground = [v for name, v in list(iou.items())[1:] if v is not None]
    foreground_dice = [v for name, v in list(dice.items())[1:] if v is not None]
    return {
        "iou": iou,
        "dice": dice,
        "mean_iou": float(np.mean(foreground)) if foreground else None,
        "mean_dice": float(np.mean(foreground_dice)) if foreground_dice else None,
        "pixel_error": float(1 - tp.sum() / total) if total else None,
        "pixels": int(total),
    }


def rand_regions(labels: np.ndarray, boundary_class: int | None) -> np.ndarray:
    """Regions for the Rand error: with a boundary class (membranes), the connected components of
    everything else (cells, 0 on the boundary); without one, connected components of each
    non-background class."""
    from skimage.measure import label
    if boundary_class is not None:
        return label(labels != boundary_class, connectivity=1)
    regions = np.zeros(labels.shape, np.int64)
    offset = 0
    for c in np.unique(labels):
        if c == 0:
            continue
        comp = label(labels == c, connectivity=1)
        regions[comp > 0] = comp[comp > 0] + offset
        offset += comp.max()
    return regions


def adapted_rand_error(target: np.ndarray, pred: np.ndarray, boundary_class: int | None, *,
                       thin: bool = True) -> float:
    """scikit-image's adapted Rand error between the regions of a dense target and a prediction.

    With a boundary class, the target's boundary pixels are left out (foreground-restricted) and,
    with ``thin``, every predicted boundary pixel is given to the nearest predicted region (border
    thinning), so a boundary drawn thicker than the target's costs nothing while a gap that merges
    two regions, or a spurious boundary that splits one, still does. ``thin=False`` scores the
    predicted boundary pixels as one more region, which penalises thick boundaries heavily.
    """
    from skimage.metrics import adapted_rand_error as are
    from skimage.segmentation import expand_labels
    true_regions = rand_regions(target, boundary_class)
    pred_regions = rand_regions(pred, boundary_class)
    if boundary_class is not None and thin and pred_regions.any():
        pred_regions = expand_labels(pred_regions, distance=max(pred_regions.shape))
    error, _, _ = are(true_regions, pred_regions, ignore_labels=(0,))
    return float(error)


def boundary_class_of(class_names: Sequence[str]) -> int | None:
    """Index of a class named like a membrane/boundary, if any."""
    for i, name in enumerate(class_names):
        if name.lower().rstrip("s") in ("membrane", "boundary", "boundarie", "border", "edge"):
            return i
    return None
