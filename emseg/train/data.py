"""Annotated training data: image/mask pairs, mask conventions, splits and crop sampling.

An :class:`Annotated` page holds the normalised image ``(H, W)`` float32 in [0, 1] (the card's
percentile normalisation, before its mean/std step) and a target ``(H, W)`` uint8 of class indices
with :data:`~emseg.analysis.metrics.IGNORE` (255) where nothing is annotated.

Mask conventions:

* dense (default): class indices 0..N-1, or a binary mask of 0/255 (read as 0/1);
* sparse (scribbles, as painted in a napari Labels layer): 0 = not annotated, 1..N = the classes,
  so class ``k`` is stored as ``k - 1`` and unpainted pixels are ignored by the loss and metrics.
"""

from __future__ import annotations

import copy
import logging
import queue
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from emseg.analysis.metrics import IGNORE
from emseg.errors import InputError
from emseg.infer.preprocess import check_rescale, resize, scaled_shape
from emseg.model.card import Normalization

log = logging.getLogger(__name__)

_MASK_SUFFIXES = re.compile(r"([_-](mask|masks|label|labels|labeled|gt|annotation|annotations|seg))+$", re.I)


@dataclass
class Annotated:
    """One annotated page: normalised image, target, where it came from, its pixel size, and how often the crops
    come from it per annotated pixel (``sampling_weight``: 1 for every page unless a run says otherwise)."""

    image: np.ndarray
    target: np.ndarray
    name: str
    pixel_size_nm: float | None = None
    sampling_weight: float = 1.0

    @property
    def annotated(self) -> int:
        return int(np.count_nonzero(self.target != IGNORE))


def normalise01(page: np.ndarray, norm: Normalization) -> np.ndarray:
    """The card's percentile normalisation to [0, 1] (without its final mean/std step)."""
    from emseg.infer.preprocess import normalize_page
    return normalize_page(page, norm) * norm.std + norm.mean


def mask_to_target(mask: np.ndarray, *, sparse: bool, name: str, num_classes: int | None = None) -> np.ndarray:
    """Convert a mask in one of the documented conventions to a uint8 target (IGNORE = unannotated)."""
    mask = np.asarray(mask)
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise InputError(f"{name}: mask holds non-integer values; masks must be class indices "
                             "(0..N-1), binary 0/255, or sparse labels (0 = not annotated)")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    values = np.unique(mask)
    if values.min() < 0:
        raise InputError(f"{name}: mask holds negative values {values[values < 0][:5].tolist()}; "
                         "use class indices 0..N-1")
    if sparse:
        if values.max() > 254:
            raise InputError(f"{name}: sparse labels go up to {int(values.max())}; use 1..N for N classes "
                             "(0 = not annotated)")
        target = np.where(mask == 0, IGNORE, mask.astype(np.int64) - 1).astype(np.uint8)
    elif set(values.tolist()) <= {0, 255}:
        target = (mask == 255).astype(np.uint8)
    else:
        if values.max() >= 255:
            raise InputError(f"{name}: mask values {values[-5:].tolist()} are neither class indices nor a "
                             "binary 0/255 mask; for scribbles use --sparse (0 = not annotated)")
        target = mask.astype(np.uint8)
    if num_classes is not None:
        bad = np.unique(target[(target != IGNORE) & (target >= num_classes)])
        if bad.size:
            shown = (bad + 1 if sparse else bad).tolist()
            raise InputError(f"{name}: mask has class value(s) {shown} but the model has {num_classes} classes; "
                             "check the mask or the --classes list")
    return target


def _stem(path: Path, *, mask: bool) -> str:
    stem = path.name.split(".")[0]
    return _MASK_SUFFIXES.sub("", stem) if mask else stem


def pair_inputs(images: Sequence[str | Path], masks: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """Pair image and mask files: two stacks, two folders (matched by name), or two lists (in order)."""
    from emseg.io.read import expand_inputs
    image_files, errors = expand_inputs(images)
    mask_files, mask_errors = expand_inputs(masks)
    if errors or mask_errors:
        raise (errors + mask_errors)[0]
    if not image_files or not mask_files:
        raise InputError("no training images or masks found; give --images and --masks")
    by_folder = len(images) == 1 and len(masks) == 1 and Path(images[0]).is_dir() and Path(masks[0]).is_dir()
    if by_folder:
        mask_by_stem = {_stem(m, mask=True): m for m in mask_files}
        pairs, missing = [], []
        for image in image_files:
            match = mask_by_stem.get(_stem(image, mask=False))
            (pairs.append((image, match)) if match else missing.append(image.name))
        if missing:
            raise InputError(f"{masks[0]}: no mask for image(s) {', '.join(missing[:5])}; name masks like the images "
                             "(optionally with a _mask suffix)")
        return pairs
    if len(image_files) != len(mask_files):
        raise InputError(f"{len(image_files)} image file(s) but {len(mask_files)} mask file(s); give them in "
                         "matching order, or as two folders with matching names")
    return list(zip(image_files, mask_files))


def load_pairs(pairs: Sequence[tuple[Path, Path]], *, sparse: bool, norm: Normalization,
               pixel_size_nm: float | None = None, target_pixel_size_nm: float | None = None,
               num_classes: int | None = None) -> list[Annotated]:
    """Read every page of every pair, check shapes and values, normalise, and rescale to one pixel size."""
    from emseg.io.read import open_image
    items: list[Annotated] = []
    for image_path, mask_path in pairs:
        with open_image(image_path, pixel_size_nm=pixel_size_nm) as img, open_image(mask_path) as msk:
            if img.shape != msk.shape:
                raise InputError(f"{mask_path}: mask shape {msk.shape} differs from image {image_path} "
                                 f"shape {img.shape} (pages, height, width); masks must match their images")
            for i in range(len(img)):
                name = f"{image_path.name}[{i}]" if img.is_stack else image_path.name
                target = mask_to_target(msk.page(i), sparse=sparse, name=f"{mask_path} page {i + 1}",
                                        num_classes=num_classes)
                items.append(Annotated(normalise01(img.page(i), norm), target, name, img.pixel_size_nm))
    return rescale_items(items, target_pixel_size_nm)


def arrays_to_items(image: np.ndarray, labels: np.ndarray, *, sparse: bool, norm: Normalization,
                    pixel_size_nm: float | None = None, name: str = "layer") -> list[Annotated]:
    """Annotated pages from in-memory arrays (2D or 3D); pages without annotation are dropped."""
    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape != labels.shape:
        raise InputError(f"{name}: labels shape {labels.shape} differs from the image shape {image.shape}; "
                         "paint the labels on a layer of the image's shape")
    if image.ndim == 2:
        image, labels = image[None], labels[None]
    items = []
    for i in range(image.shape[0]):
        target = mask_to_target(labels[i], sparse=sparse, name=f"{name} page {i + 1}")
        if np.any(target != IGNORE):
            items.append(Annotated(normalise01(image[i], norm), target, f"{name}[{i}]", pixel_size_nm))
    if not items:
        raise InputError(f"{name}: no pixel is annotated; paint a few strokes of each class first "
                         "(0 = not annotated, 1..N = classes)")
    return items


def rescale_items(items: list[Annotated], target_nm: float | None) -> list[Annotated]:
    """Rescale pages whose pixel size differs from ``target_nm`` (image bilinear, target nearest).

    The target takes, for each new pixel, the class of the old pixel under its centre (torch's
    ``nearest-exact``), the mapping of pixel centres the bilinear image resize uses; torch's legacy
    ``nearest`` takes the old pixel under its corner, which put every mask half a new pixel down
    and right of its image."""
    if not target_nm:
        return items
    out = []
    for item in items:
        factor = (item.pixel_size_nm / target_nm) if item.pixel_size_nm else 1.0
        if abs(factor - 1) <= 0.02:
            out.append(item)
            continue
        check_rescale(item.name, item.image.shape, item.pixel_size_nm, target_nm, channels=2)
        shape = scaled_shape(item.image.shape, factor)
        image = resize(item.image, shape).numpy()
        target = F.interpolate(torch.from_numpy(item.target)[None, None].float(), size=shape,
                               mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        log.info("%s: rescaled by %.3f to %.3g nm/px", item.name, factor, target_nm)
        out.append(Annotated(image, target, item.name, target_nm, item.sampling_weight))
    return out


def check_classes(items: Sequence[Annotated], class_names: Sequence[str]) -> None:
    """Warn about classes with no annotated pixel at all (the model cannot learn them)."""
    counts = np.zeros(len(class_names), np.int64)
    for item in items:
        counts += np.bincount(item.target[item.target != IGNORE], minlength=len(class_names))[:len(class_names)]
    for name, count in zip(class_names, counts):
        if count == 0:
            log.warning("class %r has no annotated pixel in the training data; the model cannot learn it. "
                        "Annotate some, or remove the class", name)


def split_regions(items: Sequence[Annotated], fraction: float) -> tuple[list[Annotated], list[Annotated]]:
    """Hold out the right-hand ``fraction`` of every page for validation (disjoint pixels)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be between 0 and 1, got {fraction}")
    train, val = [], []
    for item in items:
        width = item.image.shape[1]
        cut = int(round(width * (1 - fraction)))
        if cut < 1 or cut >= width:
            train.append(item)
            continue
        train.append(Annotated(item.image[:, :cut], item.target[:, :cut], item.name, item.pixel_size_nm,
                               item.sampling_weight))
        val.append(Annotated(item.image[:, cut:], item.target[:, cut:], f"{item.name} (val)", item.pixel_size_nm))
    return train, [v for v in val if v.annotated]


def border_weights(target: np.ndarray, boundary_class: int, w0: float, sigma: float) -> np.ndarray:
    """The U-Net paper's separation weight map, ``1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``, where
    ``d1`` and ``d2`` are the distances (px) to the nearest and second-nearest region enclosed by the
    boundary class: high on thin boundaries between two regions, where one missed pixel merges them.

    Each region's distance map is only computed within ``3 sigma`` of it (further on, the term is
    below 1 % of ``w0``). Unannotated pixels of ``target`` count as neither region nor boundary.
    """
    from scipy import ndimage
    from skimage.measure import label, regionprops
    inside = (target != boundary_class) & (target != IGNORE)
    regions = label(inside, connectivity=1)
    d1 = np.full(target.shape, np.inf, np.float32)
    d2 = np.full(target.shape, np.inf, np.float32)
    margin = int(np.ceil(3 * sigma))
    h, w = target.shape
    for region in regionprops(regions):
        r0, c0, r1, c1 = region.bbox
        r0, c0, r1, c1 = max(0, r0 - margin), max(0, c0 - margin), min(h, r1 + margin), min(w, c1 + margin)
        box = (slice(r0, r1), slice(c0, c1))
        dist = ndimage.distance_transform_edt(regions[box] != region.label).astype(np.float32)
        b1, b2 = d1[box], d2[box]
        b2[...] = np.where(dist < b1, b1, np.minimum(b2, dist))
        np.minimum(b1, dist, out=b1)
    return (1 + w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma ** 2))).astype(np.float32)


class CropSampler:
    """Random training crops, biased towards annotated pixels so that scribbles are seen.

    With ``border=(boundary_class, w0, sigma)`` every crop also carries the separation weight map of
    :func:`border_weights`, cut and deformed with the target; otherwise its weight is None.
    """

    def __init__(self, items: Sequence[Annotated], tile: int, *, rng: np.random.Generator,
                 transform=None, bias: float = 0.8, border: tuple[int, float, float] | None = None):
        self.items = [it for it in items if it.annotated]
        if not self.items:
            raise InputError("the training data has no annotated pixel; nothing to learn from")
        self.tile, self.rng, self.transform, self.bias = tile, rng, transform, bias
        counts = np.array([it.annotated * it.sampling_weight for it in self.items], np.float64)
        self.weights = counts / counts.sum()
        self._annotated = [None] * len(self.items)  # flat indices, computed when first needed
        self._border = ([border_weights(it.target, *border) for it in self.items] if border else None)

    def spawn(self, seed) -> CropSampler:
        """A sampler of the same crops with its own random generators (``seed``: anything
        ``numpy.random.default_rng`` takes), for another loader
        thread: pages, border maps and the annotated-pixel cache are shared, not copied."""
        twin = copy.copy(self)
        twin.rng = np.random.default_rng(seed)
        if self.transform is not None:
            twin.transform = copy.deepcopy(self.transform)
            twin.transform.set_random_seed(int(twin.rng.integers(2**31)))
        return twin

    def with_items(self, items: Sequence[Annotated]) -> CropSampler:
        """The same sampler over other images of the same pages (same targets, e.g. the images moved
        by a sub-pixel offset): border maps and the annotated-pixel cache are shared."""
        if [it.target.shape for it in items] != [it.target.shape for it in self.items]:
            raise ValueError("with_items needs the same pages as the sampler's")
        twin = copy.copy(self)
        twin.items = list(items)
        return twin

    def _annotated_pixels(self, k: int) -> np.ndarray:
        if self._annotated[k] is None:
            self._annotated[k] = np.flatnonzero(self.items[k].target.ravel() != IGNORE)
        return self._annotated[k]

    def crop(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One (image, target, weight) crop of ``tile`` x ``tile``; pages smaller than that are
        mirror-padded."""
        k = self.rng.choice(len(self.items), p=self.weights)
        item, t = self.items[k], self.tile
        h, w = item.image.shape
        image, target = item.image, item.target
        weight = self._border[k] if self._border else None
        if h < t or w < t:
            ph, pw = max(0, t - h), max(0, t - w)
            image = np.pad(image, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")
            target = np.pad(target, ((0, ph), (0, pw)), constant_values=IGNORE)
            if weight is not None:
                weight = np.pad(weight, ((0, ph), (0, pw)), constant_values=1.0)
            h, w = image.shape
        if self.rng.random() < self.bias:
            y, x = divmod(int(self.rng.choice(self._annotated_pixels(k))), item.image.shape[1])
            top = int(np.clip(y - self.rng.integers(0, t), 0, h - t))
            left = int(np.clip(x - self.rng.integers(0, t), 0, w - t))
        else:
            top, left = int(self.rng.integers(0, h - t + 1)), int(self.rng.integers(0, w - t + 1))
        image = image[top:top + t, left:left + t]
        target = target[top:top + t, left:left + t]
        if weight is not None:
            weight = weight[top:top + t, left:left + t]
        if self.transform is not None:
            # the weight map travels as a second mask channel (nearest interpolation, like the target)
            mask = target if weight is None else np.dstack([target.astype(np.float32), weight])
            out = self.transform(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(mask))
            image, mask = out["image"], np.asarray(out["mask"])
            target, weight = (mask, None) if weight is None else (mask[..., 0], mask[..., 1])
        weight = None if weight is None else np.asarray(weight, np.float32).reshape(t, t)
        return np.asarray(image, np.float32).reshape(t, t), np.asarray(target, np.uint8).reshape(t, t), weight

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(size, 1, t, t)`` float32 images in [0, 1], ``(size, t, t)`` uint8 targets and
        ``(size, t, t)`` float32 loss weights (None without ``border``)."""
        crops = [self.crop() for _ in range(size)]
        images = torch.from_numpy(np.stack([c[0] for c in crops]))[:, None]
        targets = torch.from_numpy(np.stack([c[1] for c in crops]))
        weights = torch.from_numpy(np.stack([c[2] for c in crops])) if self._border else None
        return images, targets, weights


class Prefetcher:
    """Makes batches of :class:`CropSampler` s in background threads, so augmentation (OpenCV, which
    releases the GIL) overlaps with the training step.

    One thread per sampler; thread ``i`` makes batches ``i, i + n, i + 2n, ...`` and :meth:`next`
    takes them in that order, so the batches depend on the samplers' seeds and their number, not on
    how the threads are scheduled. One sampler (the CPU default) keeps the augmentation off the two
    or so cores the training step needs; a GPU step is faster than one thread makes batches
    (docs/training.md), so training on CUDA uses several (see ``TrainConfig.loader_workers``).
    """

    def __init__(self, samplers: CropSampler | Sequence[CropSampler], batch_size: int, depth: int = 2,
                 pin: bool = False):
        samplers = [samplers] if isinstance(samplers, CropSampler) else list(samplers)
        self._pin = pin  # page-locked batches: their upload to a GPU runs asynchronously
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=depth) for _ in samplers]
        self._turn = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s, batch_size, q), daemon=True,
                                          name=f"emseg-crops-{i}")
                         for i, (s, q) in enumerate(zip(samplers, self._queues))]
        for t in self._threads:
            t.start()

    def _run(self, sampler: CropSampler, batch_size: int, out: queue.Queue) -> None:
        while not self._stop.is_set():
            try:
                item = sampler.batch(batch_size)
                if self._pin:
                    item = tuple(None if t is None else t.pin_memory() for t in item)
            except BaseException as exc:  # hand the error to the consumer, in this thread's turn
                item = exc
            while not self._stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        item = self._queues[self._turn % len(self._queues)].get()
        self._turn += 1
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
