"""Training batches made on the training device: crops and augmentation as batched torch operations.

The albumentations pipeline of :mod:`emseg.train.augment` is the reference (and the CPU path); this module
draws from the same distributions with one kernel launch per step of the pipeline for the whole
batch, so that a GPU is never left waiting for batches (docs/training.md, "Making batches for a GPU"):

* the training pages (normalised images in [0, 1], targets, border-weight maps) are held on the
  device, mirror-padded by a margin once;
* crop places are drawn on the host as :class:`emseg.train.data.CropSampler` draws them (biased
  towards annotated pixels), and each crop is cut with its margin of real context around it;
* flips and 90-degree rotations (D4), the affine scale/rotation and the elastic deformation are
  composed into one sampling grid per crop and applied with one ``grid_sample``: the image
  bilinear, the target and the weights nearest (so they stay labels), both mirrored at the edge
  (albumentations' ``BORDER_REFLECT_101``); image and target move together, exactly;
* brightness/contrast, gamma, Gaussian blur and Gaussian noise touch the image only, each with the
  reference's probability and range per crop; the image is clipped to [0, 1].

The elastic field is white noise smoothed with a Gaussian of the reference's sigma (20 px),
made on a grid five times coarser and interpolated (the field is smooth at that scale), and scaled
to the reference's displacement: about 3 px standard deviation per axis at strength 1
(``ELASTIC_STD_PX``, measured on :class:`emseg.train.augment.EdgeSafeElastic`; tests compare the two).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from emseg.analysis.metrics import IGNORE
from emseg.errors import InputError
from emseg.infer.tiling import mirror_index
from emseg.train.augment import (
    AFFINE_ROTATE_DEG,
    AFFINE_SCALE,
    BLUR_SIGMA_PX,
    BRIGHTNESS,
    CONTRAST,
    ELASTIC_SIGMA,
    GAMMA_PERCENT,
    NOISE_STD,
    AugmentConfig,
)
from emseg.train.data import Annotated

#: standard deviation (px, per axis) of the reference's elastic displacement at strength 1
#: (EdgeSafeElastic with alpha 1000, sigma 20: 2.9-3.0 px within a 256 px crop)
ELASTIC_STD_PX = 3.0
#: the elastic field is made on a grid this many times coarser than the pixels
_FIELD_STEP = 5

# the reference's probabilities per transform (emseg.train.augment._geometric_steps, _intensity_steps)
P_AFFINE = P_ELASTIC = P_BRIGHTNESS_CONTRAST = P_GAMMA = P_NOISE = 0.5
P_BLUR = 0.3

# the eight elements of D4 as 2x2 matrices acting on (row, column) offsets from the centre
_D4 = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [-1, 0]], [[-1, 0], [0, -1]], [[0, -1], [1, 0]],
                    [[1, 0], [0, -1]], [[-1, 0], [0, 1]], [[0, 1], [1, 0]], [[0, -1], [-1, 0]]],
                   dtype=torch.float32)


def _pad_to(t: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """``t (C, H, W)`` mirror-padded (numpy's reflect, any amount) on the tensor's device."""
    h, w = t.shape[-2:]
    rows = mirror_index(h + top + bottom, top, h, t.device)
    cols = mirror_index(w + left + right, left, w, t.device)
    return t.index_select(1, rows).index_select(2, cols)


def _gaussian_1d(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised Gaussian kernels ``(N, 2 radius + 1)`` for sigmas ``(N,)`` (0: the identity)."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.clamp(min=1e-6)[:, None]
    k = torch.exp(-0.5 * (x / s) ** 2)
    k = torch.where(sigma[:, None] > 0, k, (x == 0).float().expand_as(k))
    return k / k.sum(dim=1, keepdim=True)


def _blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Each image of ``(N, 1, H, W)`` blurred with its own Gaussian ``sigma (N,)`` (mirrored edges),
    the kernels cut at ``radius`` (3.5 sigma, as the reference's)."""
    n = images.shape[0]
    k = _gaussian_1d(sigma, radius)
    x = images.transpose(0, 1)  # (1, N, H, W): the crops as channels of one grouped convolution
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(n, 1, -1, 1), groups=n)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(n, 1, 1, -1), groups=n)
    return x.transpose(0, 1)


class DeviceCropSampler:
    """Augmented training batches made on ``device`` from pages held there (see the module docstring).

    Draws crop places as :class:`emseg.train.data.CropSampler` does (``bias``: share of crops centred
    near an annotated pixel) and augments as :func:`emseg.train.augment.build_transform` with ``config``.
    ``border_maps``: one loss-weight map per page (``emseg.train.data.border_weights``) or None.
    """

    def __init__(self, items: Sequence[Annotated], tile: int, *, config: AugmentConfig,
                 device: torch.device | str, seed: int = 0, bias: float = 0.8,
                 border_maps: Sequence[np.ndarray] | None = None):
        self.items = [it for it in items if it.annotated]
        if not self.items:
            raise InputError("the training data has no annotated pixel; nothing to learn from")
        self.tile, self.config, self.bias = tile, config, bias
        self.device = torch.device(device)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(self.rng.integers(2**62)))
        counts = np.array([it.annotated * it.sampling_weight for it in self.items], np.float64)
        self.weights = counts / counts.sum()
        self._annotated = [np.flatnonzero(it.target.ravel() != IGNORE) for it in self.items]
        # room for the affine's corners (rotation and zoom) and the elastic displacement, then reflection
        s = config.affine
        reach = (math.sqrt(2) / max(1 - AFFINE_SCALE * s, 0.1) - 1) / 2 if s > 0 else 0.0
        self.margin = int(math.ceil(tile * reach + 4 * ELASTIC_STD_PX * config.elastic)) + 1
        self._border = border_maps is not None
        self._pages = [self._upload(it, None if border_maps is None else border_maps[k])
                       for k, it in enumerate(self.items)]
        # constants made once, so that making a batch never copies from the host (no synchronisation)
        dev = self.device
        self._d4 = _D4.to(dev)
        u = torch.arange(tile, device=dev, dtype=torch.float32) - (tile - 1) / 2
        self._offsets = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1)  # (t, t, 2): (row, column)
        field_sigma = ELASTIC_SIGMA / _FIELD_STEP
        self._field_kernel = _gaussian_1d(torch.tensor([field_sigma], device=dev), int(math.ceil(3 * field_sigma)))[0]
        self._blur_radius = max(1, int(math.ceil(3.5 * BLUR_SIGMA_PX[1] * config.blur)))

    @staticmethod
    def nbytes(items: Sequence[Annotated], tile: int) -> int:
        """About the device memory that the pages take (image, target and weights, with margins)."""
        return sum(9 * (max(it.image.shape[0], tile) + tile) * (max(it.image.shape[1], tile) + tile) for it in items)

    def _upload(self, item: Annotated, border: np.ndarray | None) -> torch.Tensor:
        """One page as ``(2 or 3, H', W')`` float32 on the device: image, target (as float), weights;
        grown to a tile (image mirrored, target IGNORE) and mirror-padded by the margin."""
        layers = [item.image.astype(np.float32), item.target.astype(np.float32)]
        if self._border:
            layers.append(border.astype(np.float32))
        page = torch.from_numpy(np.stack(layers)).to(self.device)
        h, w = page.shape[-2:]
        t = self.tile
        if h < t or w < t:
            grown = _pad_to(page, 0, max(0, t - h), 0, max(0, t - w))
            grown[1, h:] = IGNORE
            grown[1, :, w:] = IGNORE
            if self._border:
                grown[2, h:] = 1.0
                grown[2, :, w:] = 1.0
            page = grown
        m = self.margin
        return _pad_to(page, m, m, m, m)

    def with_items(self, items: Sequence[Annotated]) -> DeviceCropSampler:
        """The same sampler over other images of the same pages (e.g. moved by a sub-pixel offset)."""
        items = [it for it in items if it.annotated]
        if [it.target.shape for it in items] != [it.target.shape for it in self.items]:
            raise ValueError("with_items needs the same pages as the sampler's")
        twin = object.__new__(DeviceCropSampler)
        twin.__dict__.update(self.__dict__)
        twin.items = items
        twin._pages = []
        for page, item in zip(self._pages, items):
            page = page.clone()
            h, w = item.image.shape
            image = _pad_to(torch.from_numpy(item.image.astype(np.float32))[None].to(self.device),
                            0, max(0, self.tile - h), 0, max(0, self.tile - w))
            m = self.margin
            page[0:1] = _pad_to(image, m, m, m, m)
            twin._pages.append(page)
        return twin

    def _places(self, size: int) -> list[tuple[int, int, int]]:
        """``(page, top, left)`` of ``size`` crops in page coordinates, drawn as CropSampler draws them."""
        t = self.tile
        out = []
        for k in self.rng.choice(len(self.items), size=size, p=self.weights):
            h, w = self.items[k].image.shape
            H, W = max(h, t), max(w, t)
            if self.rng.random() < self.bias:
                y, x = divmod(int(self.rng.choice(self._annotated[k])), w)
                top = int(np.clip(y - self.rng.integers(0, t), 0, H - t))
                left = int(np.clip(x - self.rng.integers(0, t), 0, W - t))
            else:
                top, left = int(self.rng.integers(0, H - t + 1)), int(self.rng.integers(0, W - t + 1))
            out.append((int(k), top, left))
        return out

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, device=self.device, generator=self.generator) * (high - low) + low

    def _chance(self, n: int, p: float) -> torch.Tensor:
        return torch.rand(n, device=self.device, generator=self.generator) < p

    def _grid(self, n: int) -> torch.Tensor:
        """Sampling grids ``(n, t, t, 2)`` in grid_sample's normalised coordinates of the windows."""
        t, m, cfg = self.tile, self.margin, self.config
        dev = self.device
        matrix = self._d4[:1].expand(n, 2, 2)
        if cfg.flips:
            pick = torch.randint(0, 8, (n,), device=dev, generator=self.generator)
            matrix = self._d4[pick]
        if cfg.affine > 0:
            s = cfg.affine
            on = self._chance(n, P_AFFINE)
            zoom = self._uniform(n, max(1 - AFFINE_SCALE * s, 0.1), 1 + AFFINE_SCALE * s)
            angle = self._uniform(n, -AFFINE_ROTATE_DEG * s, AFFINE_ROTATE_DEG * s) * (math.pi / 180)
            zoom, angle = torch.where(on, zoom, 1.0), torch.where(on, angle, 0.0)
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input: the inverse map
            rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
            matrix = matrix @ rotation
        centre = (t - 1) / 2
        where = torch.einsum("nij,hwj->nhwi", matrix, self._offsets)
        if cfg.elastic > 0:
            where = where + self._elastic(n) * self._chance(n, P_ELASTIC).view(n, 1, 1, 1)
        where = where + (m + centre)  # window pixel coordinates (row, column)
        size = t + 2 * m
        normalised = (2 * where + 1) / size - 1  # align_corners=False
        return normalised.flip(-1)  # grid_sample wants (x, y)

    def _elastic(self, n: int) -> torch.Tensor:
        """Smooth random displacements ``(n, t, t, 2)`` in pixels (see the module docstring)."""
        t, k = self.tile, self._field_kernel
        radius = (len(k) - 1) // 2
        cells = t // _FIELD_STEP + 2
        noise = torch.randn((n * 2, 1, cells + 2 * radius, cells + 2 * radius), device=self.device,
                            generator=self.generator)
        field = F.conv2d(F.conv2d(noise, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))  # (2n, 1, cells, cells)
        field = field * (ELASTIC_STD_PX * self.config.elastic / (k ** 2).sum())  # unit-noise std = sum k^2
        field = F.interpolate(field, size=(t, t), mode="bilinear", align_corners=False)
        return field.view(n, 2, t, t).permute(0, 2, 3, 1)

    def _intensity(self, images: torch.Tensor) -> torch.Tensor:
        cfg, n = self.config, images.shape[0]
        view = (n, 1, 1, 1)
        if cfg.intensity > 0:
            s = cfg.intensity
            on = self._chance(n, P_BRIGHTNESS_CONTRAST)
            alpha = torch.where(on, 1 + self._uniform(n, -CONTRAST * s, CONTRAST * s), 1.0)
            beta = torch.where(on, self._uniform(n, -BRIGHTNESS * s, BRIGHTNESS * s), 0.0)
            images = (images * alpha.view(view) + beta.view(view)).clamp_(0, 1)
            on = self._chance(n, P_GAMMA)
            gamma = torch.where(on, self._uniform(n, max(100 - GAMMA_PERCENT * s, 10.0), 100 + GAMMA_PERCENT * s)
                                / 100, 1.0)
            images = images.pow(gamma.view(view))
        if cfg.blur > 0:
            on = self._chance(n, P_BLUR)
            sigma = torch.where(on, self._uniform(n, *(v * cfg.blur for v in BLUR_SIGMA_PX)), 0.0)
            images = _blur(images, sigma, self._blur_radius)
        if cfg.noise > 0:
            on = self._chance(n, P_NOISE)
            lo, hi = (min(v * cfg.noise, 1.0) for v in NOISE_STD)
            std = torch.where(on, self._uniform(n, lo, hi), 0.0)
            images = images + torch.randn(images.shape, device=self.device, generator=self.generator) * std.view(view)
        return images.clamp_(0, 1)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(size, 1, t, t)`` float32 images in [0, 1], ``(size, t, t)`` uint8 targets and
        ``(size, t, t)`` float32 loss weights (None without border maps), all on the device."""
        t, m = self.tile, self.margin
        window = t + 2 * m
        windows = torch.stack([self._pages[k][:, top:top + window, left:left + window]
                               for k, top, left in self._places(size)])
        grid = self._grid(size)
        image = F.grid_sample(windows[:, :1], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        labels = F.grid_sample(windows[:, 1:], grid, mode="nearest", padding_mode="reflection", align_corners=False)
        targets = labels[:, 0].round_().to(torch.uint8)
        weights = labels[:, 1].contiguous() if self._border else None
        return self._intensity(image), targets, weights



class DeviceBatches:
    """A :class:`DeviceCropSampler` as a batch source with ``next()`` and ``close()``, as
    :class:`emseg.train.data.Prefetcher` is for the CPU samplers (nothing runs in the background: the
    batch is made by the device's own queue of work, ahead of the step that uses it)."""

    def __init__(self, sampler: DeviceCropSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.sampler.batch(self.batch_size)

    def close(self) -> None:
        pass
