"""Objects (instances) from a class mask: connected components, split, size filter, hole filling.

Shapes and dtypes:

* input ``mask``: integer class labels, ``(H, W)`` or a stack ``(pages, H, W)``; 0 is background
  (matrix, cytoplasm), every other value ``c`` is class ``c``.
* output :class:`Instances`: ``labels`` has the mask's shape, dtype uint16 when there are at most
  65535 objects and uint32 otherwise; 0 is "no object", objects are numbered 1..n without gaps,
  class by class. ``classes[k]`` is the class of object ``k`` (``classes[0] == 0``).

Each class is labelled on its own, so touching objects of different classes are always separate.
For stacks, objects are found per slice (``three_d=False``: every slice gets its own objects,
numbered on from the previous slice) or in 3D (``three_d=True``: an object may span slices).

Also here: reading mask files (:func:`read_pages`, :func:`class_names_from_tiff`), pairing masks with
their images (:func:`match_images`), and drawing objects over an image (:func:`outline_rgb`).

Units: sizes here are pixels (``min_size_px``: object area in pixels, or voxels in 3D;
``split_depth_px``: a distance in pixels). Hole filling is always per slice (holes are a 2D
segmentation artefact) and fills only background pixels, never another class.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as cc_label
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from emseg.errors import EmsegError, InputError

log = logging.getLogger(__name__)

UINT16_MAX_OBJECTS = int(np.iinfo(np.uint16).max)


@dataclass(frozen=True)
class Instances:
    """Object labels of a mask and the class of each object (see the module docstring)."""

    labels: np.ndarray
    classes: np.ndarray
    three_d: bool = False

    @property
    def count(self) -> int:
        """Number of objects (all classes)."""
        return len(self.classes) - 1

    def count_per_class(self, num_classes: int) -> np.ndarray:
        """Objects per class index ``0..num_classes-1`` (entry 0, background, is 0)."""
        return np.bincount(self.classes[1:], minlength=num_classes)[:num_classes]


def instance_dtype(count: int) -> np.dtype:
    """uint16 for up to 65535 objects, else uint32."""
    return np.dtype(np.uint16 if count <= UINT16_MAX_OBJECTS else np.uint32)


def split_touching(binary: np.ndarray, *, depth_px: float = 2.0, connectivity: int | None = None) -> np.ndarray:
    """Split touching objects of a binary mask with a distance transform and a seeded watershed.

    Seeds are the regional maxima of the Euclidean distance to the background whose height above
    the saddle that joins them to a neighbouring maximum is at least ``depth_px`` (h-maxima), so a
    narrow neck between two round objects splits them and a shallow dent in one object does not.
    Components without any seed (thinner than about ``depth_px``) keep their own label.

    Args:
        binary: 2D or 3D boolean array.
        depth_px: minimum depth of the neck between two objects, in pixels of distance.
        connectivity: pixel connectivity of the components (None: full, 8 in 2D, 26 in 3D).

    Returns:
        int32 labels of the same shape, 0 outside ``binary``, objects numbered 1..n.
    """
    binary = np.asarray(binary, dtype=bool)
    if not binary.any():
        return np.zeros(binary.shape, np.int32)
    dist = ndi.distance_transform_edt(binary)
    comps = cc_label(binary, connectivity=connectivity)
    seeds = np.zeros(binary.shape, bool)
    for k, box in enumerate(ndi.find_objects(comps), start=1):  # per component: 4x faster on sparse masks
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        own = comps[box] == k
        seeds[box] |= h_maxima(np.where(own, dist[box], 0.0), float(depth_px)).astype(bool) & own
    markers = cc_label(seeds, connectivity=binary.ndim).astype(np.int32)
    labels = watershed(-dist, markers, mask=binary, connectivity=1).astype(np.int32)
    unseeded = binary & (labels == 0)
    if unseeded.any():
        extra = cc_label(unseeded, connectivity=connectivity).astype(np.int32)
        labels[extra > 0] = extra[extra > 0] + labels.max()
    return labels


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects smaller than ``min_size`` pixels and renumber the rest 1..n in order."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(1, int(min_size))
    keep[0] = False
    new_ids = np.cumsum(keep) * keep
    return new_ids[labels].astype(np.int32, copy=False)


def _fill_holes_2d(binary: np.ndarray, free: np.ndarray) -> np.ndarray:
    """``binary`` with its enclosed holes filled, slice by slice, but only where ``free`` is True."""
    if binary.ndim == 2:
        return binary | (ndi.binary_fill_holes(binary) & free)
    return np.stack([_fill_holes_2d(b, f) for b, f in zip(binary, free)])


def _label_block(mask: np.ndarray, class_ids: Sequence[int], *, split: bool, split_depth_px: float,
                 min_size_px: int, fill_holes: bool, connectivity: int | None) -> tuple[np.ndarray, list[int]]:
    """Objects of one 2D page or one 3D volume: int64 labels 1..n and the class of each."""
    out = np.zeros(mask.shape, np.int64)
    classes: list[int] = []
    free = mask == 0
    for c in class_ids:
        binary = mask == c
        if not binary.any():
            continue
        if fill_holes:
            filled = _fill_holes_2d(binary, free)
            free &= ~filled
            binary = filled
        if split:
            comps = split_touching(binary, depth_px=split_depth_px, connectivity=connectivity)
        else:
            comps = cc_label(binary, connectivity=connectivity).astype(np.int32)
        comps = _drop_small(comps, min_size_px)
        n = int(comps.max())
        if n:
            out[comps > 0] = comps[comps > 0] + len(classes)
            classes += [int(c)] * n
    return out, classes


def find_instances(mask: np.ndarray, *, split: bool = False, split_depth_px: float = 2.0,
                   min_size_px: int = 0, fill_holes: bool = False, three_d: bool = False,
                   connectivity: int | None = None, class_ids: Sequence[int] | None = None) -> Instances:
    """Turn a class mask into numbered objects.

    Args:
        mask: integer class labels ``(H, W)`` or ``(pages, H, W)``; 0 is background.
        split: split touching objects (distance transform + seeded watershed, :func:`split_touching`).
        split_depth_px: neck depth needed to split, in pixels (larger splits less).
        min_size_px: drop objects with fewer pixels (voxels with ``three_d``); 0 keeps all.
        fill_holes: fill background holes enclosed by an object (per slice).
        three_d: for stacks, connect objects across slices instead of labelling each slice.
        connectivity: 1 for face neighbours only, None for full (8 in 2D, 26 in 3D).
        class_ids: classes to find objects of (default: every non-zero value in the mask).

    Returns:
        :class:`Instances` with labels of the mask's shape.
    """
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3) or mask.dtype.kind not in "biu":
        raise ValueError(f"find_instances needs integer class labels (H, W) or (pages, H, W), "
                         f"got {mask.dtype} {mask.shape}")
    if class_ids is None:
        class_ids = [int(c) for c in np.unique(mask) if c != 0]
    options = dict(split=split, split_depth_px=split_depth_px, min_size_px=min_size_px,
                   fill_holes=fill_holes, connectivity=connectivity)
    if mask.ndim == 2 or three_d:
        labels, classes = _label_block(mask, class_ids, **options)
    else:
        labels = np.zeros(mask.shape, np.int64)
        classes = []
        for i, page in enumerate(mask):
            page_labels, page_classes = _label_block(page, class_ids, **options)
            labels[i] = np.where(page_labels > 0, page_labels + len(classes), 0)
            classes += page_classes
    dtype = instance_dtype(len(classes))
    log.debug("found %d objects in a %s mask (split=%s, 3D=%s)", len(classes), mask.shape, split, three_d)
    return Instances(labels.astype(dtype), np.array([0, *classes], dtype=np.int64),
                     three_d=bool(three_d and mask.ndim == 3))


def write_instances(path: str | os.PathLike, instances: Instances, *, pixel_size_nm: float | None = None,
                    class_names: Sequence[str] | None = None) -> Path:
    """Write instance labels as a TIFF (uint16/uint32), atomically, with the pixel size in nm/px.

    The JSON ImageDescription also holds ``classes`` (names, when given) and ``instance_class``
    (the class index of object 1, 2, ...), so the file alone says what each object is.

    Returns:
        The written path.
    """
    from emseg.io.write import TiffStackWriter

    labels = instances.labels
    metadata = {"instance_class": [int(c) for c in instances.classes[1:]], "three_d": instances.three_d}
    if class_names is not None:
        metadata["classes"] = list(class_names)
    with TiffStackWriter(path, shape=labels.shape, dtype=labels.dtype, pixel_size_nm=pixel_size_nm,
                         metadata=metadata) as writer:
        writer.write_page(labels)
    return Path(path)


def read_pages(path: str | os.PathLike, pixel_size_nm: float | None = None) -> tuple[np.ndarray, float | None]:
    """All pages of an image or mask file, ``(H, W)`` or ``(pages, H, W)``, and its pixel size (nm/px).

    Args:
        path: any file :func:`emseg.io.read.open_image` reads.
        pixel_size_nm: overrides the file's pixel size.
    """
    from emseg.io.read import open_image
    with open_image(path, pixel_size_nm=pixel_size_nm) as src:
        data = np.stack(list(src)) if src.is_stack else src.page(0)
        return data, src.pixel_size_nm


def class_names_from_tiff(path: str | os.PathLike) -> tuple[str, ...] | None:
    """The ``classes`` list that ``emseg predict`` stores in a mask TIFF's JSON description, or None."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            for meta in tif.shaped_metadata or ():
                if isinstance(meta, dict) and isinstance(meta.get("classes"), list):
                    return tuple(str(c) for c in meta["classes"])
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        log.debug("%s: no class names readable (%s)", path, exc)
    return None


def outline_rgb(instances: Instances, image: np.ndarray | None = None, *, page: int | None = None,
                highlight: Sequence[int] = (), highlight_colour=(1.0, 0.0, 1.0), max_side: int = 900) -> np.ndarray:
    """Render objects over their image: tinted and outlined by class, some outlines highlighted.

    Args:
        instances: the objects; ``page`` picks the slice of a stack.
        image: the greyscale image of the same shape (contrast stretched to its 1-99th percentiles);
            None draws objects on a dark background.
        highlight: labels outlined in ``highlight_colour`` instead of their class colour.
        max_side: the image is subsampled by an integer step so that its longer side is at most this.

    Returns:
        float32 RGB array ``(h, w, 3)`` in [0, 1].
    """
    from skimage.segmentation import find_boundaries

    from emseg.io.write import PALETTE
    labels = instances.labels if page is None else instances.labels[page]
    step = max(1, int(np.ceil(max(labels.shape) / max_side)))
    labels = labels[::step, ::step]
    if image is not None:
        back = np.asarray(image if page is None else image[page], np.float32)[::step, ::step]
        lo, hi = np.percentile(back, [1, 99])
        back = np.clip((back - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    else:
        back = np.where(labels > 0, 0.35, 0.1).astype(np.float32)
    rgb = np.repeat(back[..., None], 3, axis=-1)
    inside = labels > 0
    colour = PALETTE[(instances.classes[labels] - 1) % len(PALETTE)]
    rgb[inside] = 0.7 * rgb[inside] + 0.3 * colour[inside]
    edges = find_boundaries(labels, mode="inner")
    if max(labels.shape) >= 300:  # 2-px outlines stay visible when the figure is scaled down
        edges = ndi.binary_dilation(edges) & inside
    rgb[edges] = colour[edges]
    rgb[edges & np.isin(labels, np.asarray(highlight, dtype=np.int64))] = highlight_colour
    return rgb


def mask_stem(mask_path: Path) -> str:
    """``NAME`` of ``NAME_mask.tif`` (or of any other file name, without its suffix)."""
    name = mask_path.name
    stem = name[:name.lower().rindex(".ome.")] if name.lower().endswith((".ome.tif", ".ome.tiff")) else mask_path.stem
    return stem[:-5] if stem.endswith("_mask") else stem


def match_images(masks: Sequence[Path], images: Sequence[str] | None) -> list[Path | None]:
    """The image of each mask file.

    Args:
        masks: mask files (``NAME_mask.*`` or any name).
        images: None; or one folder, whose ``NAME.*`` file goes with ``NAME_mask.*`` (or ``NAME.*``);
            or files, folders or globs giving exactly one image per mask, in the same order.

    Returns:
        One image path (or None without ``images``) per mask. Raises InputError when they do not pair up.
    """
    from emseg.io.read import SUPPORTED_SUFFIXES, expand_inputs

    if not images:
        return [None] * len(masks)
    if len(images) == 1 and Path(images[0]).is_dir():
        folder = Path(images[0])
        by_stem: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith("."):
                by_stem.setdefault(mask_stem(p), p)
        missing = [m for m in masks if mask_stem(m) not in by_stem]
        if missing:
            raise InputError(f"{missing[0]}: no image named {mask_stem(missing[0])}.* in {folder}; "
                             "name images like their masks (NAME.tif for NAME_mask.tif) or list the files in order")
        return [by_stem[mask_stem(m)] for m in masks]
    files, errors = expand_inputs(images)
    if errors:
        raise errors[0]
    if len(files) != len(masks):
        raise InputError(f"{images[0]}: --images gives {len(files)} image(s) for {len(masks)} mask(s); "
                         "give one image per mask in the same order, or a folder of images named like the masks")
    return list(files)


def mask_files(items: Sequence[str]) -> tuple[list[Path], list[EmsegError]]:
    """Expand mask arguments (files, folders, globs); in a folder keep its ``*_mask.*`` files if it has any.

    Returns:
        The mask files, and one error per argument that gave none.
    """
    from emseg.io.read import expand_inputs
    files, errors = [], []
    for item in items:
        found, errs = expand_inputs([item])
        if Path(item).is_dir() and any(mask_stem(f) != f.stem for f in found):
            found = [f for f in found if mask_stem(f) != f.stem]
        files += found
        errors += errs
    return files, errors
