"""Self-supervised pretraining on a lab's own unlabelled images: restoration of corrupted crops, or masked patches.

Models Genesis (Zhou et al. 2019) taught a whole U-Net, decoder included, to restore crops of its own
modality that had been corrupted; fine-tuned from there it beat training from scratch. emseg does the
same in 2D on EM: crops are cut and augmented as for training (:class:`emseg.train.augment_device.
DeviceCropSampler`: flips, rotations, affine, elastic, brightness/contrast, on the training device), then
corrupted on the device, batch-wise:

* a non-linear, monotone intensity curve (a random cubic Bezier): the network must
  learn what EM intensities look like to undo it;
* local pixel shuffling inside small blocks: texture and fine structure;
* in-painting (random boxes filled with noise) or out-painting (all but one box filled with noise):
  context and shape;
* Gaussian noise.

The network (one output channel) is trained to give back the clean crop (mean squared error). The other
objective (``PretrainConfig.objective = "masked"``, SimMIM, Xie et al. 2022, with a U-Net) hides 60 % of the
crop's 16-pixel patches under its mean grey and scores the filled-in patches alone (:class:`Masker`). The
third (``"contrastive"``, :class:`Contrast`) teaches the encoder alone: two differently corrupted views of
overlapping windows of a crop must give the same features at the same places, while the features keep varying
across places (dense VICReg: Bardes et al. 2022, VICRegL). The result is a normal emseg model file whose card
has no classes and says what it was pretrained on (``card.pretrained``); ``emseg train --init FILE`` and
``emseg finetune FILE`` start from its encoder and decoder (or its encoder alone: ``TrainConfig.fresh_decoder``,
the default after the contrastive objective) with a fresh head for the classes. Predicting with it is refused.

Progress, the time limit, the checkpoint (``--resume``), curves.png and a preview of inputs and
restorations (restorations.png; features.png, the encoder's features as colours, for the contrastive
objective) work as in :mod:`emseg.train.loop`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emseg.analysis.metrics import IGNORE
from emseg.errors import InputError
from emseg.model.card import ModelCard, Normalization
from emseg.model.modelfile import Model
from emseg.model.networks import DEFAULT_ENCODER, build_unet
from emseg.train.augment import PRESETS, AugmentConfig
from emseg.train.augment_device import DeviceCropSampler
from emseg.train.checkpoint import load_checkpoint
from emseg.train.data import Annotated, normalise01, rescale_items
from emseg.train.loop import (
    DEFAULT_STEPS,
    RunLength,
    TrainEvent,
    _CheckpointWriter,
    _Clock,
    _LossMeter,
    _Schedule,
    _weights_bytes,
    start_run,
)

log = logging.getLogger(__name__)

#: the self-supervised objectives: restore crops of several corruptions (Models Genesis), fill in masked
#: patches, scored on the masked pixels alone (SimMIM, Xie et al. 2022, with a U-Net), or match the encoder's
#: features of two views of the same place (dense VICReg; the encoder alone learns)
OBJECTIVES = ("restoration", "masked", "contrastive")
#: the most pixels of unlabelled pages held for pretraining (pages are taken evenly from the inputs)
MAX_PIXELS = 64 * 2**20
#: a page with at most this many distinct values is taken for a mask, not an image
MASK_VALUES = 16
#: crops of the fixed validation batch (the same corruptions at every validation)
VAL_CROPS = 16


@dataclass(frozen=True)
class Corruptions:
    """Chances and strengths of the corruptions (Models Genesis' defaults, in 2D)."""

    intensity: float = 0.9      # chance of a non-linear intensity curve
    shuffle: float = 0.5        # chance of local pixel shuffling
    shuffle_block: int = 4      # side of the shuffled blocks (pixels; divides the tile)
    paint: float = 0.9          # chance of in- or out-painting
    inpaint: float = 0.5        # share of in-painting among the paintings (else out-painting)
    noise: float = 0.3          # chance of Gaussian noise (std 0.02-0.1 of the [0, 1] range)

    def __post_init__(self):
        for key in ("intensity", "shuffle", "paint", "inpaint", "noise"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"corruption chance {key} must be from 0 to 1, got {value!r}")
        if self.shuffle_block not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"shuffle_block must be a power of two up to 32, got {self.shuffle_block!r}")


@dataclass(frozen=True)
class Masking:
    """The masked-image objective: a share of the crop's square patches is replaced by the crop's mean grey."""

    ratio: float = 0.6          # share of the patches masked
    patch: int = 16             # side of the patches (pixels; divides the tile)

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1):
            raise ValueError(f"masking ratio must be between 0 and 1, got {self.ratio!r}")
        if self.patch not in (4, 8, 16, 32, 64):
            raise ValueError(f"masking patch must be a power of two from 4 to 64, got {self.patch!r}")


@dataclass(frozen=True)
class Contrast:
    """The contrastive objective: two views of each crop (windows at other offsets, each corrupted and turned its
    own way), whose encoder features at the same place of the crop must agree (invariance), while every feature
    channel keeps varying across places (variance) and the channels stay uncorrelated (covariance): VICReg's three
    terms (Bardes et al. 2022), on the encoder's feature maps at strides 4, 8 and 16 (VICRegL's dense form)."""

    shift: int = 32             # the views' windows lie up to this far apart (pixels; a multiple of 16)
    stages: tuple[int, ...] = (2, 3, 4)  # encoder stages whose features are compared (strides 4, 8, 16)
    dim: int = 128              # channels of the projection the terms are computed on
    invariance: float = 25.0    # VICReg's weights of the three terms
    variance: float = 25.0
    covariance: float = 1.0
    # each view's corruption (the restoration objective's, milder and without out-painting)
    corruptions: Corruptions = field(default_factory=lambda: Corruptions(intensity=0.8, shuffle=0.2, paint=0.3,
                                                                         inpaint=1.0, noise=0.5))

    def __post_init__(self):
        if not (isinstance(self.shift, int) and self.shift >= 0 and self.shift % 16 == 0):
            raise ValueError(f"contrast shift must be a multiple of 16 pixels, got {self.shift!r}")
        if not self.stages or any(s not in (1, 2, 3, 4, 5) for s in self.stages):
            raise ValueError(f"contrast stages must be encoder stages 1-5, got {self.stages!r}")
        if self.dim < 2:
            raise ValueError(f"contrast dim must be at least 2, got {self.dim!r}")


@dataclass(frozen=True)
class PretrainConfig(RunLength):
    """Everything that defines a pretraining run (summarised in the model card)."""

    encoder: str = DEFAULT_ENCODER
    full_resolution_skip: bool = True
    decoder_upsampling: str = "nearest"
    tile_size: int = 128
    batch_size: int = 8
    steps: int | None = None
    time_limit_minutes: float | None = 20.0
    val_every: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    seed: int = 0
    device: str = "auto"
    pixel_size_nm: float | None = None
    max_pixels: int = MAX_PIXELS
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objective: str = "restoration"
    corruptions: Corruptions = field(default_factory=Corruptions)
    masking: Masking = field(default_factory=Masking)
    contrast: Contrast = field(default_factory=Contrast)
    name: str = "emseg pretrained encoder"

    @property
    def crop_size(self) -> int:
        """The side of the crops cut from the pages: the tile, and for the contrastive objective the room for its
        two views' windows to lie apart (pages must be at least this large)."""
        return self.tile_size + (self.contrast.shift if self.objective == "contrastive" else 0)

    def __post_init__(self):
        self._default_steps()
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.tile_size % 32 or self.tile_size < 32:
            raise ValueError(f"tile_size must be a multiple of 32, at least 32, got {self.tile_size!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.tile_size % self.masking.patch:
            raise ValueError(f"tile_size {self.tile_size} must be a multiple of the masking patch {self.masking.patch}")
        if self.tile_size % self.corruptions.shuffle_block:
            raise ValueError(f"tile_size {self.tile_size} must be a multiple of shuffle_block "
                             f"{self.corruptions.shuffle_block}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size!r}")
        if self.objective == "contrastive":
            stride = 2 ** max(self.contrast.stages)
            if self.contrast.shift % stride:
                raise ValueError(f"contrast shift {self.contrast.shift} must be a multiple of the deepest compared "
                                 f"stage's stride ({stride})")
            if self.tile_size - self.contrast.shift < stride:
                smallest = -(-(self.contrast.shift + stride) // 32) * 32
                raise ValueError(f"crops of {self.tile_size} px are too small for the contrastive objective, whose "
                                 f"two views lie up to {self.contrast.shift} px apart and must overlap: use a crop "
                                 f"size of at least {smallest} px")


@dataclass
class PretrainResult:
    model: Model
    model_path: Path | None
    history: list[dict]
    stopped: bool


# ---------------------------------------------------------------- the images

def unlabelled_files(paths: Sequence[str | Path], *, purpose: str, flag: str) -> list[Path]:
    """The image files of files, folders and glob patterns (the unreadable ones logged); InputError if none."""
    from emseg.io.read import expand_inputs
    files, errors = expand_inputs([str(p) for p in paths])
    for error in errors:
        log.error("%s", error)
    if not files:
        raise InputError(f"no unlabelled images to {purpose}; give image files, folders or glob patterns ({flag})")
    return files


def load_unlabelled(paths: Sequence[str | Path], *, tile: int, pixel_size_nm: float | None = None,
                    target_pixel_size_nm: float | None = None, max_pixels: int = MAX_PIXELS,
                    norm: Normalization | None = None) -> list[Annotated]:
    """The pages of unlabelled images (files emseg reads, stacks included) as training pages without a
    target, normalised and rescaled to one pixel size (``target_pixel_size_nm``, else the first input's
    that has one); at most ``max_pixels`` pixels, pages taken evenly from every input. One file is open at
    a time. InputError (naming the file) for no images, a page smaller than the crop, and a file that looks
    like a mask."""
    from emseg.io.read import open_image
    files = unlabelled_files(paths, purpose="pretrain on", flag="--images")
    norm = norm or Normalization()
    sizes = []
    for path in files:  # shapes and pixel sizes first, for the pixel budget and the common pixel size
        with open_image(path, pixel_size_nm=pixel_size_nm) as src:
            sizes.append((src.shape, src.pixel_size_nm))
    target = target_pixel_size_nm or next((nm for _, nm in sizes if nm), None)
    keep = min(1.0, max_pixels / max(sum(p * h * w for (p, h, w), _ in sizes), 1))
    items = []
    for path, ((pages, h, w), nm) in zip(files, sizes):
        scale = nm / target if (nm and target) else 1
        if min(h, w) * scale < tile:
            raise InputError(f"{path}: its pages are {h} x {w} pixels ({min(h, w) * scale:.0f} at the model's "
                             f"pixel size), smaller than the {tile}-pixel crops; give larger images or a "
                             "smaller --tile-size")
        with open_image(path, pixel_size_nm=pixel_size_nm) as src:
            for i in _even_pages(pages, keep):
                items.append(_unlabelled_page(src.page(i), path, i, pages, f"{path.name}[{i}]" if src.is_stack
                                              else path.name, nm, norm))
    if keep < 1:
        log.info("pretraining on %d of the inputs' pages (at most %.0f megapixels)", len(items), max_pixels / 1e6)
    return rescale_items(items, target)


def unlabelled_from_arrays(image, *, tile: int, pixel_size_nm: float | None = None, name: str = "image",
                           max_pixels: int = MAX_PIXELS, norm: Normalization | None = None) -> list[Annotated]:
    """The pages of an in-memory image (2D, or a stack ``(pages, H, W)``; numpy or dask) as pretraining pages,
    as :func:`load_unlabelled` makes them of files (napari's layers). InputError (naming ``name``) for an image
    of another shape, pages smaller than the crop and a mask given by mistake."""
    shape = tuple(image.shape)
    if len(shape) not in (2, 3) or min(shape[-2:]) < 1:
        raise InputError(f"{name}: has shape {shape}; pretraining takes a 2D image or a stack of 2D pages "
                         "(grey levels, not RGB)")
    pages = shape[0] if len(shape) == 3 else 1
    h, w = shape[-2:]
    if min(h, w) < tile:
        raise InputError(f"{name}: its pages are {h} x {w} pixels, smaller than the {tile}-pixel crops; use a "
                         "larger image or a smaller crop size")
    norm = norm or Normalization()
    keep = min(1.0, max_pixels / max(pages * h * w, 1))
    items = []
    for i in _even_pages(pages, keep):
        page = np.asarray(image[i] if len(shape) == 3 else image)
        items.append(_unlabelled_page(page, name, i, pages, f"{name}[{i}]" if pages > 1 else name, pixel_size_nm,
                                      norm))
    if keep < 1:
        log.info("pretraining on %d of %s's %d pages (at most %.0f megapixels)", len(items), name, pages,
                 max_pixels / 1e6)
    return items


def _unlabelled_page(page: np.ndarray, source: Path | str, index: int, pages: int, name: str,
                     pixel_size_nm: float | None, norm: Normalization) -> Annotated:
    """One page, refused if it looks like a mask, as a normalised training page without a target."""
    _refuse_mask(page, source, index, pages)
    return Annotated(normalise01(page, norm), _crop_grid(page.shape), name, pixel_size_nm)


def _even_pages(pages: int, keep: float) -> list[int]:
    """Indices of ``keep`` (a fraction) of ``pages`` pages, spread evenly from first to last."""
    return [int(i) for i in np.unique(np.linspace(0, pages - 1, max(1, round(pages * keep))).round().astype(int))]


def _crop_grid(shape: tuple[int, int]) -> np.ndarray:
    """The target of an unlabelled page: IGNORE but for every 16th pixel each way, so that the crop
    sampler draws pages in proportion to their area without an index of every pixel."""
    target = np.full(shape, IGNORE, np.uint8)
    target[::16, ::16] = 0
    return target


def _refuse_mask(page: np.ndarray, path: Path | str, index: int, pages: int, *,
                 what: str = "pretraining learns") -> None:
    """A page with only a few distinct integer values is a label image given by mistake (``what``: who says so)."""
    if page.dtype.kind == "f" and not np.all(page == np.round(page)):
        return
    sample = page[:: max(1, page.shape[0] // 256), :: max(1, page.shape[1] // 256)]
    values = np.unique(sample)
    if len(values) <= MASK_VALUES and len(np.unique(page)) <= MASK_VALUES:
        where = f" page {index + 1} of {pages}" if pages > 1 else ""
        raise InputError(f"{path}{where}: holds only {len(np.unique(page))} distinct values, so it looks like a "
                         f"mask or label image; {what} from raw, unlabelled EM images (masks go to "
                         "`emseg train --masks`)")


# ---------------------------------------------------------------- corruptions

class Corruptor:
    """Corrupts batches of clean crops ``(n, 1, t, t)`` in [0, 1] on their device (see the module docstring)."""

    def __init__(self, config: Corruptions, tile: int, device: torch.device, seed: int = 0):
        self.config, self.tile, self.device = config, tile, device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        idx = torch.arange(tile, device=device)
        self._rows, self._cols = idx.view(1, 1, tile, 1), idx.view(1, 1, 1, tile)
        self._t = torch.linspace(0, 1, 64, device=device)

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(shape, device=self.device, generator=self.generator)

    def __call__(self, clean: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = clean.clone()
        n = x.shape[0]
        x = self._intensity(x, self._rand(n) < c.intensity)
        x = self._shuffle(x, self._rand(n) < c.shuffle)
        paint = self._rand(n) < c.paint
        inpaint = self._rand(n) < c.inpaint
        x = self._inpaint(x, paint & inpaint)
        x = self._outpaint(x, paint & ~inpaint)
        on = (self._rand(n) < c.noise).float().view(n, 1, 1, 1)
        std = (0.02 + 0.08 * self._rand(n)).view(n, 1, 1, 1)
        x = x + torch.randn(x.shape, device=self.device, generator=self.generator) * std * on
        return x.clamp_(0, 1)

    def _intensity(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """A random monotone cubic Bezier curve from (0, 0) to (1, 1) per crop. Never an inversion: whether a crop
        was inverted cannot be seen in a small window, and the squared error of that guess drives the output to
        the mean grey (measured: a 20-minute run collapsed to it)."""
        n = x.shape[0]
        p = self._rand(n, 2, 2)  # two control points (x, y) in [0, 1], their y in order: a monotone curve
        p[:, :, 1] = torch.sort(p[:, :, 1], dim=1).values
        t = self._t.view(1, -1)
        b1, b2 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2
        cx = b1 * p[:, 0, :1] + b2 * p[:, 1, :1] + t ** 3
        cy = b1 * p[:, 0, 1:] + b2 * p[:, 1, 1:] + t ** 3
        cx, order = torch.sort(cx, dim=1)
        cy = torch.gather(cy, 1, order)
        flat = x.reshape(n, -1).contiguous()
        i = torch.searchsorted(cx.contiguous(), flat).clamp_(1, cx.shape[1] - 1)
        x0, x1 = torch.gather(cx, 1, i - 1), torch.gather(cx, 1, i)
        y0, y1 = torch.gather(cy, 1, i - 1), torch.gather(cy, 1, i)
        mapped = (y0 + (flat - x0) * (y1 - y0) / (x1 - x0).clamp_min(1e-6)).view_as(x)
        return torch.where(on.view(n, 1, 1, 1), mapped, x)

    def _shuffle(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """Pixels shuffled inside a random 10-50 % of the blocks of ``shuffle_block`` pixels a side."""
        b, t, n = self.config.shuffle_block, self.tile, x.shape[0]
        if b == 1:
            return x
        g = t // b
        blocks = x.view(n, g, b, g, b).permute(0, 1, 3, 2, 4).reshape(n, g * g, b * b)
        order = torch.argsort(self._rand(n, g * g, b * b), dim=2)
        shuffled = torch.gather(blocks, 2, order)
        share = 0.1 + 0.4 * self._rand(n, 1)
        chosen = (self._rand(n, g * g) < share) & on.view(n, 1)
        blocks = torch.where(chosen.unsqueeze(2), shuffled, blocks)
        return blocks.view(n, g, g, b, b).permute(0, 1, 3, 2, 4).reshape(n, 1, t, t)

    def _boxes(self, n: int, count: int, low: float, high: float, active: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, 1, t, t)`` masks of the union of ``count`` random boxes with sides of ``low``-``high`` of the
        tile (``active``: ``(n, count)``, which of them count)."""
        t = self.tile
        size = (low + (high - low) * self._rand(n, count, 2)) * t
        corner = self._rand(n, count, 2) * (t - size)
        top, left = corner[..., 0].view(n, count, 1, 1), corner[..., 1].view(n, count, 1, 1)
        h, w = size[..., 0].view(n, count, 1, 1), size[..., 1].view(n, count, 1, 1)
        rows, cols = self._rows.float(), self._cols.float()
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        if active is not None:
            inside &= active.view(n, count, 1, 1)
        return inside.any(dim=1, keepdim=True)

    def _inpaint(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """1 to 5 boxes (each after the first with a chance of 1/2) of 1/6-1/3 of the tile filled with noise."""
        n = x.shape[0]
        active = self._rand(n, 5) < 0.5
        active[:, 0] = True
        holes = self._boxes(n, 5, 1 / 6, 1 / 3, active) & on.view(n, 1, 1, 1)
        return torch.where(holes, self._rand(*x.shape), x)

    def _outpaint(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """All but one central-ish box of 3/7-4/7 of the tile filled with uniform noise."""
        n = x.shape[0]
        kept = self._boxes(n, 1, 3 / 7, 4 / 7)
        outside = ~kept & on.view(n, 1, 1, 1)
        return torch.where(outside, self._rand(*x.shape), x)


class Masker:
    """Masks a random share of the square patches of crops ``(n, 1, t, t)`` with each crop's mean grey; returns
    the masked crops and the weights of the loss (1 on the masked pixels, 0 elsewhere: SimMIM scores only what
    the network could not see)."""

    def __init__(self, config: Masking, tile: int, device: torch.device, seed: int = 0):
        self.config, self.tile, self.device = config, tile, device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, g = clean.shape[0], self.tile // self.config.patch
        count = round(self.config.ratio * g * g)
        order = torch.argsort(torch.rand((n, g * g), device=self.device, generator=self.generator), dim=1)
        masked = torch.zeros((n, g * g), device=self.device)
        masked.scatter_(1, order[:, :count], 1.0)
        weights = F.interpolate(masked.view(n, 1, g, g), scale_factor=self.config.patch, mode="nearest")
        grey = clean.mean(dim=(1, 2, 3), keepdim=True)
        return torch.where(weights > 0, grey, clean), weights


def corruptor(config: PretrainConfig, device: torch.device, seed: int) -> Callable:
    """The corruption of a restoring objective: a callable from clean crops to (input, loss weights or None)."""
    if config.objective == "masked":
        return Masker(config.masking, config.tile_size, device, seed)
    corrupt = Corruptor(config.corruptions, config.tile_size, device, seed)
    return lambda clean: (corrupt(clean), None)  # every pixel is scored


def restoration_loss(restored: torch.Tensor, clean: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of a restoration, over the weighted pixels when weights are given."""
    if weights is None:
        return F.mse_loss(restored, clean)
    return ((restored - clean) ** 2 * weights).sum() / weights.sum().clamp_min(1.0)


def vicreg_loss(a: torch.Tensor, b: torch.Tensor, config: Contrast) -> torch.Tensor:
    """VICReg's loss of two embeddings ``(N, d)`` of the same N things: their mean squared difference, a hinge on
    every channel's standard deviation below 1, and the squared off-diagonal covariances (Bardes et al. 2022)."""
    def variance(z):
        return F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean()

    def covariance(z):
        z = z - z.mean(dim=0)
        c = (z.T @ z) / max(len(z) - 1, 1)
        return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / z.shape[1]
    return (config.invariance * F.mse_loss(a, b) + config.variance * (variance(a) + variance(b)) / 2
            + config.covariance * (covariance(a) + covariance(b)))


class Contraster(nn.Module):
    """The contrastive objective (:class:`Contrast`): makes the two views of a batch of crops and scores the
    encoder's features of them; its projection heads (one per compared stage) are trained with the network and
    left out of the model file."""

    def __init__(self, config: Contrast, channels: Sequence[int], tile: int, device: torch.device, seed: int = 0):
        super().__init__()
        self.config, self.tile, self.device = config, tile, device
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[s], 2 * config.dim, 1), nn.BatchNorm2d(2 * config.dim),
                          nn.ReLU(inplace=True), nn.Conv2d(2 * config.dim, config.dim, 1))
            for s in config.stages)
        self.corrupt = Corruptor(config.corruptions, tile, device, seed)
        self.generator = torch.Generator()  # the views' offsets, turns and flips: drawn on the host, no device sync
        self.generator.manual_seed(seed + 1)
        self.step = 2 ** max(config.stages)

    def _draw(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def views(self, clean: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Both views of crops ``(n, 1, tile + shift, tile + shift)`` as one batch ``(2n, 1, tile, tile)``, and how
        they were made (window offsets, quarter turns, flips) for :meth:`loss`."""
        t, places = self.tile, self.config.shift // self.step + 1
        plan, views = [], []
        for _ in range(2):
            top, left = self.step * self._draw(places), self.step * self._draw(places)
            turns, flip = self._draw(4), bool(self._draw(2))
            x = self.corrupt(clean[..., top:top + t, left:left + t].contiguous())
            x = torch.rot90(x, turns, (2, 3))
            views.append(x.flip(3) if flip else x)
            plan.append((top, left, turns, flip))
        return torch.cat(views), tuple(plan)

    def loss(self, features: Sequence[torch.Tensor], plan: tuple) -> torch.Tensor:
        """The mean over the compared stages of VICReg's loss between the views' features at the same places of
        their crops (features: the encoder's, of the batch :meth:`views` made)."""
        (top1, left1, *_), (top2, left2, *_) = plan
        top, left = max(top1, top2), max(left1, left2)
        bottom, right = min(top1, top2) + self.tile, min(left1, left2) + self.tile
        total = 0.0
        for stage, head in zip(self.config.stages, self.heads):
            stride = 2 ** stage
            z = head(features[stage]).float()
            halves = []
            for view, (t0, l0, turns, flip) in zip(z.chunk(2), plan):
                view = view.flip(3) if flip else view
                view = torch.rot90(view, -turns, (2, 3))  # back to the crop's orientation
                view = view[..., (top - t0) // stride:(bottom - t0) // stride, (left - l0) // stride:(right - l0) // stride]
                halves.append(view.permute(0, 2, 3, 1).reshape(-1, view.shape[1]))
            with torch.autocast(z.device.type, enabled=False):  # the covariances in float32, not a GPU's bf16
                total = total + vicreg_loss(*halves, self.config)
        return total / len(self.heads)


class _Objective:
    """What the pretraining loop asks of an objective: a training loss of a batch of clean crops, a validation loss
    on fixed crops, a reference for that (what copying the input, or the untrained network, scores) and pictures."""

    module: nn.Module | None = None  # trained beside the network (not part of the model file)

    def train_loss(self, net: nn.Module, clean: torch.Tensor, amp) -> torch.Tensor:
        raise NotImplementedError

    def val_loss(self, net: nn.Module, amp) -> float:
        raise NotImplementedError

    def reference(self, net: nn.Module, amp) -> float:
        raise NotImplementedError

    def pictures(self, model: Model, out: Path) -> None:
        raise NotImplementedError


class _Restoring(_Objective):
    """Restoration and masked patches: the U-Net gives back the clean crop of a corrupted or masked one."""

    def __init__(self, images: Sequence[Annotated], config: PretrainConfig, device: torch.device, seed: int,
                 norm: Normalization):
        self.corrupt, self.norm = corruptor(config, device, seed), norm
        self.val_clean = _validation_crops(images, config, device)
        self.val_input, self.val_weights = corruptor(config, device, seed=config.seed + 2)(self.val_clean)

    def train_loss(self, net, clean, amp):
        corrupted, weights = self.corrupt(clean)
        with amp():
            restored = net(((corrupted - self.norm.mean) / self.norm.std).contiguous(memory_format=torch.channels_last))
        return restoration_loss(restored.float(), clean, weights)

    @torch.no_grad()
    def val_loss(self, net, amp):
        net.eval()
        with amp():
            restored = net((self.val_input - self.norm.mean) / self.norm.std)
        return float(restoration_loss(restored.float(), self.val_clean, self.val_weights))

    def reference(self, net, amp):
        return float(restoration_loss(self.val_input, self.val_clean, self.val_weights))

    def pictures(self, model, out):
        plot_restorations(model, self.val_input.cpu(), self.val_clean.cpu(), out / "restorations.png",
                          weights=None if self.val_weights is None else self.val_weights.cpu())


class _Contrasting(_Objective):
    """The contrastive objective: the encoder alone learns (:class:`Contraster`)."""

    def __init__(self, images: Sequence[Annotated], config: PretrainConfig, net: nn.Module, device: torch.device,
                 seed: int, norm: Normalization):
        self.module = Contraster(config.contrast, net.encoder.out_channels, config.tile_size, device, seed).to(device)
        self.norm, self.tile = norm, config.tile_size
        self.val_clean = _validation_crops(images, config, device)
        fixed = Contraster(config.contrast, net.encoder.out_channels, config.tile_size, device, config.seed + 2)
        self.val_views, self.val_plan = fixed.views(self.val_clean)

    def _loss(self, net, views, plan, amp):
        with amp():
            features = net.encoder(((views - self.norm.mean) / self.norm.std).contiguous(
                memory_format=torch.channels_last))
            return self.module.loss(features, plan)

    def train_loss(self, net, clean, amp):
        self.module.train()
        views, plan = self.module.views(clean)
        return self._loss(net, views, plan, amp)

    @torch.no_grad()
    def val_loss(self, net, amp):
        net.eval()
        self.module.eval()
        return float(self._loss(net, self.val_views, self.val_plan, amp))

    def reference(self, net, amp):
        return self.val_loss(net, amp)  # the untrained network's

    def pictures(self, model, out):
        t = self.tile
        plot_features(model, self.val_clean[..., :t, :t].cpu(), out / "features.png")


# ---------------------------------------------------------------- the run

def pretrain(images: Sequence[Annotated], config: PretrainConfig, out_dir: str | Path | None = None, *,
             progress: Callable | None = None, stop: threading.Event | None = None,
             resume: bool = False, sources: Sequence[str] | None = None) -> PretrainResult:
    """Pretrain a U-Net on unlabelled pages (see the module docstring); returns the model (and writes
    OUT/model.safetensors, curves.png, restorations.png, log.json and a checkpoint when ``out_dir`` is given).

    ``progress`` is called after every step with an :class:`emseg.train.loop.TrainEvent` (``metrics``:
    the validation losses at validations); ``stop`` ends the run after the current step.
    """
    if not images:
        raise InputError("no unlabelled pages to pretrain on")
    out, device, rng, resuming = start_run(config, out_dir, resume)

    net = build_unet(config.encoder, 1, full_resolution_skip=config.full_resolution_skip,
                     upsampling=config.decoder_upsampling, regression=True).to(device, memory_format=torch.channels_last)
    norm = Normalization()
    card = ModelCard(encoder=config.encoder, classes=(), full_resolution_skip=config.full_resolution_skip,
                     decoder_upsampling=config.decoder_upsampling, normalization=norm,
                     tile_size=max(512, config.tile_size), pixel_size_nm=config.pixel_size_nm, name=config.name,
                     pretrained={"objective": config.objective})
    planned = DEFAULT_STEPS if config.fills_time else config.steps
    schedule = _Schedule(planned, config.warmup)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    state = {"step": 0, "history": [], "best_metric": None, "bad_validations": 0}
    if resuming:  # the sampler's and the corruptions' draws go on from where the run stopped
        rng = np.random.default_rng([config.seed, _checkpoint_step(out / "checkpoint")])

    sampler = DeviceCropSampler(images, config.crop_size, config=config.augment, device=device,
                                seed=int(rng.integers(2**31)), bias=0.0)
    objective = _objective(images, config, net, device, int(rng.integers(2**62)), norm)
    # what is trained and checkpointed: the network, and the contrastive objective's projection heads beside it
    trained = net if objective.module is None else nn.ModuleDict({"unet": net, "heads": objective.module})
    optimizer = torch.optim.AdamW(trained.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if resuming:
        state = load_checkpoint(out / "checkpoint", trained, optimizer, scheduler, config)
        state.pop("best_weights", None)
        schedule.total = planned
        log.info("resumed from %s at step %d", out / "checkpoint", state["step"])
    writer = _CheckpointWriter(out / "checkpoint", _weights_bytes(trained)) if out is not None else None
    meter = _LossMeter(device)
    clock = _Clock(config)
    stopped = False

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else torch.autocast("cpu", enabled=False)

    # what giving back the input (a restoring objective) or the untrained network (contrastive) scores
    reference = (state["history"][0]["copy_loss"] if state["history"] and "copy_loss" in state["history"][0]
                 else objective.reference(net, amp))
    try:
        while state["step"] < schedule.total:
            if stop is not None and stop.is_set():
                stopped = True
                break
            trained.train()
            loss = objective.train_loss(net, sampler.batch(config.batch_size)[0], amp)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state["step"] += 1
            validating = state["step"] % config.val_every == 0 or state["step"] == schedule.total
            meter.add(loss.detach(), read=validating)
            clock.tick(schedule, state["step"])
            event = TrainEvent(state["step"], schedule.total, meter.value, scheduler.get_last_lr()[0])
            if validating:
                running = meter.take_running()
                val_loss = objective.val_loss(net, amp)
                record = {"step": state["step"], "loss": float(np.mean(running)) if running else None,
                          "val_loss": val_loss, "copy_loss": reference, "lr": event.lr,
                          "seconds": round(time.perf_counter() - clock.start, 1)}
                state["history"].append(record)
                event.metrics = {"val_loss": val_loss, "copy_loss": reference}
                log.info("step %d: loss %.4f, validation %s loss %.4f (%s: %.4f)", state["step"],
                         record["loss"] or float("nan"), config.objective, val_loss,
                         REFERENCE[config.objective], reference)
                if writer is not None:
                    writer.save(trained, None, optimizer, scheduler, config, state, {}, card,
                                last=state["step"] >= schedule.total)
            if progress:
                progress(event)
    finally:
        if writer is not None:
            writer.close()
    net.eval().to(memory_format=torch.contiguous_format)
    last = state["history"][-1] if state["history"] else {}
    summary = {
        "objective": config.objective,
        **({"masking": asdict(config.masking)} if config.objective == "masked"
           else {"contrast": asdict(config.contrast)} if config.objective == "contrastive"
           else {"corruptions": asdict(config.corruptions)}),
        "config": config.to_dict(),
        "pages": len(images), "megapixels": round(sum(it.image.size for it in images) / 1e6, 2),
        "sources": list(sources or sorted({it.name.split("[")[0] for it in images}))[:20],
        "steps": state["step"], "seconds": round(time.perf_counter() - clock.start, 1),
        "validation_loss": last.get("val_loss"), "copy_loss": reference}
    model = Model(net.cpu(), card.updated(pretrained=summary))
    model_path = None
    if out is not None:
        model_path = model.save(out / "model.safetensors")
        if state["history"]:
            plot_pretrain_curves(state["history"], out / "curves.png", config.objective)
        objective.pictures(model, out)
    return PretrainResult(model, model_path, state["history"], stopped)


#: what the reference line of the validation loss is, by objective
REFERENCE = {"restoration": "the corrupted input", "masked": "the masked input (mean grey)",
             "contrastive": "the untrained network"}


def _objective(images: Sequence[Annotated], config: PretrainConfig, net: nn.Module, device: torch.device, seed: int,
               norm: Normalization) -> _Objective:
    if config.objective == "contrastive":
        return _Contrasting(images, config, net, device, seed, norm)
    return _Restoring(images, config, device, seed, norm)


def _checkpoint_step(folder: Path) -> int:
    from emseg.train.checkpoint import _read_state
    try:
        return int(_read_state(folder)["state"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _validation_crops(images: Sequence[Annotated], config: PretrainConfig, device: torch.device) -> torch.Tensor:
    """A fixed batch of clean crops (flips only), the same at every validation."""
    sampler = DeviceCropSampler(images, config.crop_size, config=PRESETS["none"], device=device,
                                seed=config.seed + 1, bias=0.0)
    return sampler.batch(VAL_CROPS)[0]


@torch.no_grad()
def restore(model: Model, corrupted: torch.Tensor) -> torch.Tensor:
    """A pretrained model's restoration of crops ``(n, 1, t, t)`` in [0, 1] (on the CPU)."""
    norm = model.card.normalization
    net = model.net.eval()
    device = next(net.parameters()).device
    return net(((corrupted.to(device) - norm.mean) / norm.std)).float().cpu().clamp(0, 1)


# ---------------------------------------------------------------- pictures

def plot_pretrain_curves(history: Sequence[dict], path: Path, objective: str = "restoration") -> Path:
    """Training and validation loss against the step, with the reference (:data:`REFERENCE`) as a line."""
    from emseg.analysis.reports import _figure, save_png
    plt, (fig, ax) = _figure(1, 1, figsize=(6, 3.8))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], "o-", color="#444444", ms=3, label="training")
    ax.plot(steps, [h["val_loss"] for h in history], "o-", color="#1f77b4", ms=3, label="validation (fixed crops)")
    ax.axhline(history[-1]["copy_loss"], color="#d62728", ls="--", lw=1.2, label=REFERENCE[objective])
    if objective == "contrastive":
        ax.set(xlabel="step", ylabel="VICReg loss (invariance, variance, covariance)",
               title="Contrastive loss of the encoder's features")
    else:
        ax.set(xlabel="step", ylabel="mean squared error" + (" (masked pixels)" if objective == "masked" else ""),
               title="Masked-patch loss" if objective == "masked" else "Restoration loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(plt, fig, path)


def plot_restorations(model: Model, corrupted: torch.Tensor, clean: torch.Tensor, path: Path,
                      rows: int = 4, weights: torch.Tensor | None = None) -> Path:
    """A grid: the clean crop, its corruption and the model's restoration, one crop a row. With ``weights`` (the
    masked objective) the output is shown where it is scored, in the masked patches, and the input elsewhere."""
    from emseg.analysis.reports import _figure, save_png
    rows = min(rows, len(clean))
    restored = restore(model, corrupted[:rows])
    titles = ("clean crop", "corrupted (input)", "restored (output)")
    if weights is not None:
        restored = torch.where(weights[:rows] > 0, restored, corrupted[:rows])
        titles = ("clean crop", "masked (input)", "filled in (output)")
    plt, (fig, axes) = _figure(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for r in range(rows):
        for c, (title, image) in enumerate(zip(titles, (clean[r, 0], corrupted[r, 0], restored[r, 0]))):
            ax = axes[r][c]
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(plt, fig, path, dpi=100)



@torch.no_grad()
def feature_colours(model: Model, crops: torch.Tensor, stage: int) -> np.ndarray:
    """The encoder's features of crops ``(n, 1, t, t)`` in [0, 1] at ``stage`` as colours ``(n, h, w, 3)`` in [0, 1]:
    their first three principal components over all the crops' places, each stretched between its 2nd and 98th
    percentile. Places that look alike to the encoder get alike colours."""
    norm = model.card.normalization
    net = model.net.eval()
    device = next(net.parameters()).device
    features = net.encoder(((crops.to(device) - norm.mean) / norm.std))[stage].float().cpu()
    n, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, c)
    flat = flat - flat.mean(dim=0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    comps = (flat @ v[:3].T).numpy()
    low, high = np.percentile(comps, 2, axis=0), np.percentile(comps, 98, axis=0)
    colours = np.clip((comps - low) / np.maximum(high - low, 1e-6), 0, 1)
    if colours.shape[1] < 3:
        colours = np.pad(colours, ((0, 0), (0, 3 - colours.shape[1])))
    return colours.reshape(n, h, w, 3)


def plot_features(model: Model, crops: torch.Tensor, path: Path, rows: int = 4, stages: Sequence[int] = (2, 3)) -> Path:
    """A grid: crops and their encoder's features at ``stages`` as colours (:func:`feature_colours`), one crop a
    row: what a user looks at to see that contrastive pretraining learnt to tell structures apart."""
    from emseg.analysis.reports import _figure, save_png
    rows = min(rows, len(crops))
    colours = [feature_colours(model, crops, stage) for stage in stages]
    plt, (fig, axes) = _figure(rows, 1 + len(stages), figsize=(2.5 * (1 + len(stages)), 2.5 * rows), squeeze=False)
    t = crops.shape[-1]
    for r in range(rows):
        axes[r][0].imshow(crops[r, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        for c, (stage, colour) in enumerate(zip(stages, colours), start=1):
            axes[r][c].imshow(colour[r], interpolation="nearest", extent=(0, t, t, 0))
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("crop" if c == 0 else f"features, stride {2 ** stages[c - 1]}", fontsize=10)
    fig.suptitle("Encoder features (first 3 principal components as colours)", fontsize=10)
    fig.tight_layout()
    return save_png(plt, fig, path, dpi=100)
