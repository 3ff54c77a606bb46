"""Ortho-plane inference: a 2D model run over the xy, xz and yz planes of a volume, and combined.

Contract
--------
* A volume is ``(Z, Y, X)`` (pages, height, width) of any real dtype, with a voxel size
  ``(z, y, x)`` in nm. Outputs are class labels ``(Z, Y, X)`` (uint8 up to 256 classes) and, when
  asked, the combined probabilities ``(Z, K, Y, X)`` float32 (the page layout of ``emseg predict``).
* Every plane goes to the model as a raw 2D page through :meth:`emseg.infer.predictor.Predictor.predict_page`
  (normalised with the model card, rescaled to the model's pixel size and back), one direction at a
  time. A plane whose two axes have different spacings (the xz and yz planes of an anisotropic
  stack) is first resampled along its first axis to the spacing of its second (bilinear, torch), so
  that the model sees square pixels; its probabilities are resampled back (anti-aliased).
* ``combine="mean"``: labels are the argmax of the mean of the directions' probabilities.
  ``combine="vote"``: each direction votes with its argmax, a class picked by at least two of the
  three wins (empanada's ortho-plane consensus), and voxels without a majority take the mean's
  argmax. The probabilities written are the mean in both cases.
* Memory: the volume is processed in slabs of whole pages along z, each read with ``halo`` pages of
  context above and below for the xz and yz planes (the halo is cut off again). A slab holds its
  pages in their own dtype and one float32 sum (plus uint8 votes) per class and voxel, never one
  probability volume per direction; the slab thickness is chosen so that this fits ``memory_mb``.
  When the whole volume fits, it is one slab without halo and every xz/yz plane spans all pages.
* Progress: ``progress(done, total, text)`` in megapixels of planes; a callback that raises (the
  napari plugin's Cancel) stops the work between tiles.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from emseg.errors import InputError
from emseg.io.read import parse_voxel_size, voxel_size_arg  # noqa: F401 - re-exported for the CLI

log = logging.getLogger(__name__)

DIRECTIONS = ("xy", "xz", "yz")
COMBINE = ("mean", "vote")
#: z spacing / pixel size above which (or below whose inverse) ortho planes are interpolated too much
MAX_ANISOTROPY = 5.0
#: above this ratio a warning says the xz/yz planes are strongly interpolated
WARN_ANISOTROPY = 2.0
#: default memory for one slab's pages and class sums (MiB)
DEFAULT_MEMORY_MB = 1024
#: planes whose spacings differ by less than this are used as they are
SQUARE_TOLERANCE = 0.02
#: xz/yz planes shorter than this (pixels at the model's scale) give the network little context
MIN_PLANE_PX = 64

VolumeProgress = Callable[[float, float, str], None]


@dataclass(frozen=True)
class Slab:
    """Pages ``[start, stop)`` of the result, computed from pages ``[lo, hi)`` (with the halo)."""

    start: int
    stop: int
    lo: int
    hi: int


@dataclass
class SlabResult:
    """Labels ``(n, Y, X)`` of pages ``[start, stop)`` and, when kept, probabilities ``(K, n, Y, X)``."""

    start: int
    stop: int
    labels: np.ndarray
    probabilities: np.ndarray | None = None


# ---------------------------------------------------------------- checks

def check_volume(shape: Sequence[int], voxel_size_nm: Sequence[float] | None, name: str, *,
                 is_stack: bool = True, max_anisotropy: float = MAX_ANISOTROPY) -> tuple[float, float, float]:
    """The voxel size to run ortho-plane inference with, or an InputError saying in one line why not.

    Refuses 2D images, one-slice stacks, an unknown voxel size and an anisotropy (z spacing over
    pixel size, or its inverse) above ``max_anisotropy``; warns above :data:`WARN_ANISOTROPY`, and
    when the stack is so thin that its xz/yz planes are under :data:`MIN_PLANE_PX` pixels tall.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or (not is_stack and shape[0] == 1):
        raise InputError(f"{name}: is a 2D image (one slice); --planes ortho needs a 3D stack of 2 or more slices: "
                         "use --planes xy")
    if shape[0] < 2:
        raise InputError(f"{name}: is a stack of one slice, which has no xz or yz planes; use --planes xy")
    if voxel_size_nm is None:
        raise InputError(f"{name}: the voxel size is unknown (the file states no slice spacing); give it "
                         "with --voxel-size Z,Y,X in nm (e.g. --voxel-size 8,5,5)")
    z, y, x = (float(v) for v in voxel_size_nm)
    ratio = z / min(y, x)
    if max(ratio, 1 / ratio) > max_anisotropy:
        raise InputError(f"{name}: voxels of {z:g} x {y:g} x {x:g} nm (z x y x x) are {max(ratio, 1 / ratio):.1f}x "
                         f"anisotropic; ortho-plane inference interpolates the xz/yz planes and is meant for "
                         f"near-isotropic FIB-SEM/SBF-SEM stacks (at most {max_anisotropy:g}x): use --planes xy")
    if shape[0] * z / x < MIN_PLANE_PX:
        log.warning("%s: %d slices make xz/yz planes only %d px tall: the network sees little context in them, and "
                    "ortho-plane inference can do worse than --planes xy (on 3-4 EPFL slices it did: docs/volumes.md)",
                    name, shape[0], round(shape[0] * z / x))
    if max(ratio, 1 / ratio) > WARN_ANISOTROPY:
        log.warning("%s: voxels of %g x %g x %g nm are %.1fx anisotropic: the xz/yz planes are interpolated "
                    "%.1fx along z, and ortho-plane inference may gain less", name, z, y, x,
                    max(ratio, 1 / ratio), max(ratio, 1 / ratio))
    return z, y, x


# ---------------------------------------------------------------- geometry (pure)

def plan_slabs(depth: int, thickness: int, halo: int) -> list[Slab]:
    """Slabs of ``thickness`` pages covering ``[0, depth)``, each read with ``halo`` pages more on
    either side (clipped to the volume); one slab without halo when ``thickness >= depth``."""
    if depth < 1 or thickness < 1 or halo < 0:
        raise ValueError(f"cannot plan slabs for depth {depth}, thickness {thickness}, halo {halo}")
    if thickness >= depth:
        return [Slab(0, depth, 0, depth)]
    n = math.ceil(depth / thickness)
    bounds = [round(i * depth / n) for i in range(n + 1)]  # even slabs
    return [Slab(a, b, max(0, a - halo), min(depth, b + halo)) for a, b in zip(bounds, bounds[1:])]


def slab_thickness(shape: Sequence[int], itemsize: int, num_classes: int, *, halo: int, vote: bool,
                   memory_mb: float) -> int:
    """Pages per slab so that the slab's pages (with halo), class sums and votes fit ``memory_mb``."""
    depth, h, w = (int(n) for n in shape)
    page = h * w
    per_core = page * (itemsize + num_classes * (4 + (1 if vote else 0)))
    whole = depth * per_core
    budget = memory_mb * 2**20
    if whole <= budget:
        return depth
    return max(1, int((budget - 2 * halo * page * itemsize) // per_core))


def resample_axis0(plane: torch.Tensor, length: int) -> torch.Tensor:
    """``(C, a, b)`` resampled along ``a`` to ``length`` (linear; anti-aliased when shrinking)."""
    if plane.shape[-2] == length:
        return plane
    shrink = length < plane.shape[-2]
    out = F.interpolate(plane[None].float(), size=(length, plane.shape[-1]), mode="bilinear",
                        align_corners=False, antialias=shrink)
    return out[0]


def planes_of(volume: np.ndarray, direction: str, rows: range) -> Iterator[tuple[tuple, np.ndarray]]:
    """``(index, plane)`` of one direction: xy pages ``rows`` of ``volume`` (Z, Y, X); every xz plane
    (Z, X) per y; every yz plane (Z, Y) per x. ``index`` addresses the plane in a ``(K, Z, Y, X)`` array
    after the class axis."""
    if direction == "xy":
        for i in rows:
            yield (i,), volume[i]
    elif direction == "xz":
        for y in range(volume.shape[1]):
            yield (slice(None), y), volume[:, y, :]
    elif direction == "yz":
        for x in range(volume.shape[2]):
            yield (slice(None), slice(None), x), volume[:, :, x]
    else:
        raise ValueError(f"unknown plane direction {direction!r}; use one of {', '.join(DIRECTIONS)}")


# ---------------------------------------------------------------- the engine

class OrthoPlanes:
    """Ortho-plane inference with one :class:`emseg.infer.predictor.Predictor`, configured once.

    Args:
        predictor: from ``model.predictor(tile=..., overlap=..., batch_size=..., tta=..., device=...)``.
        voxel_size_nm: ``(z, y, x)`` in nm.
        directions: the plane directions to run and combine (default all three).
        combine: ``"mean"`` or ``"vote"`` (see the module docstring).
        memory_mb: memory for one slab's pages and class sums; sets the slab thickness.
        halo: pages of context above and below each slab (default: enough for half a tile overlap
            of the model, at least 32 model pixels).
    """

    def __init__(self, predictor, voxel_size_nm: Sequence[float], *, directions: Sequence[str] = DIRECTIONS,
                 combine: str = "mean", memory_mb: float = DEFAULT_MEMORY_MB, halo: int | None = None):
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad or not directions:
            raise ValueError(f"plane directions must be some of {', '.join(DIRECTIONS)}, got {list(directions)}")
        if not memory_mb > 0:
            raise ValueError(f"slab memory must be positive (MiB), got {memory_mb}")
        self.predictor = predictor
        self.voxel = tuple(float(v) for v in voxel_size_nm)
        self.directions = tuple(dict.fromkeys(directions))
        self.combine = combine
        self.memory_mb = float(memory_mb)
        self.num_classes = predictor.card.num_classes
        self.halo = self.default_halo() if halo is None else int(halo)

    def default_halo(self) -> int:
        """Pages of context that give the xz/yz planes at least half a tile overlap (>= 32 model pixels)."""
        if self.directions == ("xy",):
            return 0
        model_nm = self.predictor.card.pixel_size_nm or self.voxel[2]
        context_px = max(32, self.predictor.overlap // 2)
        return math.ceil(context_px * model_nm / self.voxel[0])

    # -- planes

    def _spacings(self, direction: str) -> tuple[float, float]:
        z, y, x = self.voxel
        return {"xy": (y, x), "xz": (z, x), "yz": (z, y)}[direction]

    def predict_plane(self, plane: np.ndarray, direction: str, progress=None) -> np.ndarray:
        """Probabilities ``(K, a, b)`` float32 of one raw plane ``(a, b)`` of ``direction``."""
        first, second = self._spacings(direction)
        if abs(first / second - 1) <= SQUARE_TOLERANCE:
            return self.predictor.predict_page(np.ascontiguousarray(plane), pixel_size_nm=second, progress=progress)
        length = max(1, round(plane.shape[0] * first / second))
        square = resample_axis0(torch.from_numpy(np.ascontiguousarray(plane, np.float32))[None], length)[0]
        probs = self.predictor.predict_page(square.numpy(), pixel_size_nm=second, progress=progress)
        return resample_axis0(torch.from_numpy(probs), plane.shape[0]).numpy()

    # -- slabs

    def plan(self, shape: Sequence[int], itemsize: int) -> list[Slab]:
        """The slabs of a volume of ``shape`` (Z, Y, X) whose pages take ``itemsize`` bytes per voxel."""
        thickness = slab_thickness(shape, itemsize, self.num_classes, halo=self.halo, vote=self.combine == "vote",
                                   memory_mb=self.memory_mb)
        return plan_slabs(int(shape[0]), thickness, self.halo)

    def work(self, shape: Sequence[int], slabs: Sequence[Slab]) -> float:
        """Megapixels of planes that the slabs send to the model (the progress total)."""
        _, h, w = (int(n) for n in shape)
        total = 0.0
        for s in slabs:
            m = s.hi - s.lo
            sizes = {"xy": (s.stop - s.start) * h * w, "xz": m * h * w, "yz": m * h * w}
            total += sum(sizes[d] for d in self.directions)
        return total / 1e6

    def predict_slab(self, volume: np.ndarray, slab: Slab, *, keep_probabilities: bool = False,
                     progress: Callable[[float, str], None] | None = None) -> SlabResult:
        """Combine the directions over the pages ``volume`` = pages ``[slab.lo, slab.hi)`` of the stack.

        ``progress(megapixels_done_in_this_slab, text)`` after every tile batch.
        """
        core = range(slab.start - slab.lo, slab.stop - slab.lo)
        n, (_, h, w) = len(core), volume.shape
        k = self.num_classes
        total = np.zeros((k, n, h, w), np.float32)
        votes = np.zeros((k, n, h, w), np.uint8) if self.combine == "vote" else None
        done = 0.0
        for direction in self.directions:
            planes = list(planes_of(volume, direction, core))
            for count, (index, plane) in enumerate(planes, 1):
                plane_mp = plane.size / 1e6
                text = f"{direction} plane {count}/{len(planes)}"
                tiles = None
                if progress is not None:
                    def tiles(t_done, t_total, _base=done, _mp=plane_mp, _text=text):
                        progress(_base + _mp * t_done / max(t_total, 1), _text)
                probs = self.predict_plane(plane, direction, tiles)
                if direction != "xy":
                    probs = probs[:, core.start:core.stop]
                else:
                    index = (index[0] - core.start,)
                target = (slice(None), *index)
                total[target] += probs
                if votes is not None:
                    winner = probs.argmax(axis=0)
                    for c in range(k):
                        votes[(c, *index)] += winner == c
                done += plane_mp
        return self._finish(slab, total, votes, keep_probabilities)

    def _finish(self, slab: Slab, total: np.ndarray, votes: np.ndarray | None, keep: bool) -> SlabResult:
        from emseg.infer.predictor import labels_dtype
        dtype = labels_dtype(self.num_classes)
        labels = np.empty(total.shape[1:], dtype)
        majority = len(self.directions) // 2 + 1
        for i in range(len(labels)):  # page by page: an argmax of the whole slab would take 8 bytes a voxel
            labels[i] = total[:, i].argmax(axis=0)
            if votes is not None:
                page = votes[:, i]
                labels[i] = np.where(page.max(axis=0) >= majority, page.argmax(axis=0), labels[i])
        probs = None
        if keep:
            total /= len(self.directions)
            probs = total
        return SlabResult(slab.start, slab.stop, labels, probs)

    def iter_slabs(self, read: Callable[[int, int], np.ndarray], shape: Sequence[int], dtype, *,
                   keep_probabilities: bool = False, progress: VolumeProgress | None = None) -> Iterator[SlabResult]:
        """Yield the result of every slab, in order, reading pages ``[lo, hi)`` with ``read(lo, hi)``."""
        shape = tuple(int(n) for n in shape)
        slabs = self.plan(shape, np.dtype(dtype).itemsize)
        total = self.work(shape, slabs)
        if len(slabs) > 1:
            log.info("volume %s in %d slabs of about %d pages (halo %d pages)", "x".join(map(str, shape)),
                     len(slabs), slabs[0].stop - slabs[0].start, self.halo)
        done = 0.0
        for number, slab in enumerate(slabs, 1):
            volume = np.asarray(read(slab.lo, slab.hi))
            if volume.shape != (slab.hi - slab.lo, *shape[1:]):
                raise ValueError(f"read({slab.lo}, {slab.hi}) gave shape {volume.shape}")
            where = f"slab {number}/{len(slabs)}: " if len(slabs) > 1 else ""
            slab_progress = None
            if progress is not None:
                def slab_progress(mp, text, _base=done, _where=where):
                    progress(_base + mp, total, _where + text)
            result = self.predict_slab(volume, slab, keep_probabilities=keep_probabilities, progress=slab_progress)
            done += self.work(shape, [slab])
            yield result


def source_reader(source) -> Callable[[int, int], np.ndarray]:
    """``read(lo, hi)`` of an :class:`emseg.io.source.ImageSource`: its pages ``[lo, hi)`` stacked."""
    def read(lo: int, hi: int) -> np.ndarray:
        first = source.page(lo)
        out = np.empty((hi - lo, *first.shape), first.dtype)
        out[0] = first
        for i in range(lo + 1, hi):
            out[i - lo] = source.page(i)
        return out
    return read


def predict_volume(predictor, volume, *, voxel_size_nm: Sequence[float], combine: str = "mean",
                   directions: Sequence[str] = DIRECTIONS, memory_mb: float = DEFAULT_MEMORY_MB,
                   return_probabilities: bool = False, progress: VolumeProgress | None = None,
                   name: str = "volume"):
    """Ortho-plane labels ``(Z, Y, X)`` of an in-memory or lazy (dask, zarr) volume.

    Args:
        predictor: an :class:`emseg.infer.predictor.Predictor` (``model.predictor(...)``).
        volume: ``(Z, Y, X)`` array-like; read slab by slab.
        voxel_size_nm: ``(z, y, x)`` in nm (checked with :func:`check_volume`).
        combine, directions, memory_mb: see :class:`OrthoPlanes`.
        return_probabilities: also return the mean probabilities ``(Z, K, Y, X)`` float32.
        progress: ``progress(megapixels_done, megapixels_total, text)``.

    Returns:
        Labels, and with ``return_probabilities`` also the probabilities.
    """
    voxel = check_volume(getattr(volume, "shape", ()), voxel_size_nm, name)
    engine = OrthoPlanes(predictor, voxel, directions=directions, combine=combine, memory_mb=memory_mb)
    labels = None
    probs = None
    for result in engine.iter_slabs(lambda lo, hi: np.asarray(volume[lo:hi]), volume.shape, volume.dtype,
                                    keep_probabilities=return_probabilities, progress=progress):
        if labels is None:
            labels = np.zeros(volume.shape, result.labels.dtype)
            if return_probabilities:
                probs = np.zeros((volume.shape[0], engine.num_classes, *volume.shape[1:]), np.float32)
        labels[result.start:result.stop] = result.labels
        if probs is not None:
            probs[result.start:result.stop] = result.probabilities.transpose(1, 0, 2, 3)
    return (labels, probs) if return_probabilities else labels
