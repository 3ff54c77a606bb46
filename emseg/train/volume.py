"""Training a 2D model from volume annotations: crops from the xy, xz and yz planes of labelled volumes.

Contract:

* Input: an image volume ``(Z, Y, X)`` and a mask volume of the same shape in one of the mask
  conventions of :mod:`emseg.train.data` (dense class indices or 0/255, or sparse scribbles where
  0 = not annotated), and the voxel size ``(z, y, x)`` in nm. A dense sub-volume and a few
  annotated slices in any direction (sparse) both work.
* Output: :class:`emseg.train.data.Annotated` pages for :func:`emseg.train.loop.train`: every xy page,
  every xz plane (one per y) and every yz plane (one per x) that holds an annotated pixel. An xz or
  yz plane of an anisotropic volume is resampled along z to the in-plane pixel size (image
  bilinear, annotation nearest), so that every page has square pixels; each page is normalised on
  its own, as inference does (:func:`emseg.train.data.normalise01`). The crop sampler weighs pages by
  their annotated pixels, so a dense sub-volume gives each direction a third of the crops.
* Validation (:func:`volume_splits`): the right-hand ``fraction`` of the volume along x is held out
  before the planes are cut, so no held-out voxel is seen in training through another direction.
* Memory: the planes copy the volume three times (float32 images, uint8 targets); above
  :data:`MAX_PLANE_PIXELS` per direction only every k-th xz/yz plane is kept (neighbouring planes
  are nearly alike).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from emseg.analysis.metrics import IGNORE
from emseg.errors import InputError
from emseg.infer.volume import SQUARE_TOLERANCE, check_volume
from emseg.model.card import Normalization
from emseg.train.data import Annotated, mask_to_target, normalise01, rescale_items

log = logging.getLogger(__name__)

#: at most this many pixels of xz (and of yz) planes are kept per volume; more: every k-th plane
MAX_PLANE_PIXELS = 256 * 2**20 // 8


def _square(plane: np.ndarray, length: int, *, labels: bool) -> np.ndarray:
    """``plane`` (a, b) resampled along a to ``length`` rows: bilinear for images, nearest for targets."""
    if plane.shape[0] == length:
        return plane
    t = torch.from_numpy(np.ascontiguousarray(plane, np.float32))[None, None]
    if labels:
        out = F.interpolate(t, size=(length, plane.shape[1]), mode="nearest-exact")
        return out[0, 0].numpy().astype(np.uint8)
    out = F.interpolate(t, size=(length, plane.shape[1]), mode="bilinear", align_corners=False,
                        antialias=length < plane.shape[0])
    return out[0, 0].numpy()


def volume_items(image: np.ndarray, mask: np.ndarray, *, voxel_size_nm: Sequence[float], sparse: bool,
                 norm: Normalization, num_classes: int | None = None, target_pixel_size_nm: float | None = None,
                 name: str = "volume", directions: Sequence[str] = ("xy", "xz", "yz")) -> list[Annotated]:
    """Annotated pages from the planes of a labelled volume (see the module docstring)."""
    image, mask = np.asarray(image), np.asarray(mask)
    if image.shape != mask.shape:
        raise InputError(f"{name}: mask shape {mask.shape} differs from the image shape {image.shape}; "
                         "masks must match their images")
    z, y, x = check_volume(image.shape, voxel_size_nm, name)
    target = mask_to_target(mask, sparse=sparse, name=name, num_classes=num_classes)
    items: list[Annotated] = []
    cuts = {"xy": (image.shape[0], lambda i: (image[i], target[i]), y),
            "xz": (image.shape[1], lambda i: (image[:, i, :], target[:, i, :]), z),
            "yz": (image.shape[2], lambda i: (image[:, :, i], target[:, :, i]), z)}
    for direction in directions:
        count, cut, first = cuts[direction]
        page_px = image.size // count
        step = 1 if direction == "xy" else max(1, math.ceil(count * page_px / MAX_PLANE_PIXELS))
        if step > 1:
            log.info("%s: %d %s planes; every %dth is used for training", name, count, direction, step)
        second = x if direction != "yz" else y
        for i in range(0, count, step):
            plane, labels = cut(i)
            if not np.any(labels != IGNORE):
                continue
            if abs(first / second - 1) > SQUARE_TOLERANCE:
                length = max(1, round(plane.shape[0] * first / second))
                plane, labels = _square(plane, length, labels=False), _square(labels, length, labels=True)
            items.append(Annotated(normalise01(plane, norm), np.ascontiguousarray(labels), f"{name} {direction}[{i}]",
                                   second))
    if not items:
        raise InputError(f"{name}: no voxel is annotated; annotate some voxels (0 = not annotated with --sparse)")
    counts = {d: sum(it.annotated for it in items if f" {d}[" in it.name) for d in directions}
    log.info("%s: %s annotated pixels from the xy, xz and yz planes", name, " / ".join(map(str, counts.values())))
    return rescale_items(items, target_pixel_size_nm)


def volume_splits(image: np.ndarray, mask: np.ndarray, fraction: float | None, **options
                  ) -> tuple[list[Annotated], list[Annotated]]:
    """Training and validation pages of a volume: the right-hand ``fraction`` along x is held out
    (None or 0: nothing held out). ``options`` go to :func:`volume_items`."""
    if not fraction:
        return volume_items(image, mask, **options), []
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be between 0 and 1, got {fraction}")
    cut = int(round(image.shape[2] * (1 - fraction)))
    if cut < 1 or cut >= image.shape[2]:
        return volume_items(image, mask, **options), []
    name = options.pop("name", "volume")
    train = volume_items(image[..., :cut], mask[..., :cut], name=name, **options)
    try:
        val = volume_items(image[..., cut:], mask[..., cut:], name=f"{name} (val)", **options)
    except InputError:  # nothing annotated in the held-out strip
        val = []
    return train, val


def load_volume_pairs(pairs: Sequence[tuple[Path, Path]], *, sparse: bool, norm: Normalization,
                      pixel_size_nm: float | None = None, voxel_size_nm: Sequence[float] | None = None,
                      target_pixel_size_nm: float | None = None, num_classes: int | None = None,
                      val_fraction: float | None = None) -> tuple[list[Annotated], list[Annotated]]:
    """Read image/mask volume files (each pair one volume) into training and validation pages."""
    from emseg.io.read import open_image
    train: list[Annotated] = []
    val: list[Annotated] = []
    for image_path, mask_path in pairs:
        with open_image(image_path, pixel_size_nm=pixel_size_nm, voxel_size_nm=voxel_size_nm) as img, \
                open_image(mask_path) as msk:
            if img.shape != msk.shape:
                raise InputError(f"{mask_path}: mask shape {msk.shape} differs from image {image_path} shape "
                                 f"{img.shape} (pages, height, width); masks must match their images")
            check_volume(img.shape, img.voxel_size_nm, str(image_path), is_stack=img.is_stack)
            image, mask = np.stack(list(img)), np.stack(list(msk))
            t, v = volume_splits(image, mask, val_fraction, voxel_size_nm=img.voxel_size_nm, sparse=sparse,
                                 norm=norm, num_classes=num_classes, target_pixel_size_nm=target_pixel_size_nm,
                                 name=image_path.name)
        train += t
        val += v
    return train, val
