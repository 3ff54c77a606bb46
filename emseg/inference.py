"""Seamless tiled inference of a model over pages and stacks.

Data flow for each page: normalise (card) -> rescale to the model's pixel size -> overlapping tiles
-> network (optionally over the 8 flips/rotations) -> softmax -> Gaussian blending -> rescale back
to the page grid -> argmax. Pages are processed one at a time, so memory does not grow with the
number of pages; :meth:`Predictor.iter_pages` yields each page's result as soon as it is done.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .preprocess import normalize_page, rescale_factor, resize, scaled_shape
from .tiling import DIVISOR, sliding_window

log = logging.getLogger(__name__)

TileProgress = Callable[[int, int], None]
PageTileProgress = Callable[[int, int, int], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch."""
    if str(device) != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def labels_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


@dataclass
class PageResult:
    """One page's output: labels ``(H, W)`` and, when kept, probabilities ``(classes, H, W)``."""

    index: int
    labels: np.ndarray
    probabilities: np.ndarray | None = None


class Predictor:
    """Tiled inference configured once (device, tiling, TTA) and applied to many pages."""

    def __init__(self, model, *, tile: int | None = None, overlap: int | None = None, batch_size: int = 4,
                 tta: bool = False, device: str | torch.device = "auto", amp: bool | None = None):
        self.card = model.card
        self.device = resolve_device(device)
        self.net = model.net.to(self.device).eval()
        self.tile = int(tile or self.card.tile_size)
        self.overlap = int(self.card.overlap if overlap is None else overlap)
        if self.tile % DIVISOR or self.tile <= 0:
            raise ValueError(f"tile size must be a positive multiple of {DIVISOR}, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be at least 0 and smaller than the tile ({self.tile}), got {self.overlap}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.tta = tta
        self.amp = (self.device.type == "cuda") if amp is None else amp

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, K, h, w)`` for a normalised batch ``(N, 1, h, w)``."""
        with torch.inference_mode(), self._autocast():
            if not self.tta:
                return torch.softmax(self.net(batch).float(), dim=1)
            total = None
            for k in range(4):
                for flip in (False, True):
                    x = torch.rot90(batch, k, dims=(2, 3))
                    x = torch.flip(x, dims=(3,)) if flip else x
                    y = torch.softmax(self.net(x).float(), dim=1)
                    y = torch.flip(y, dims=(3,)) if flip else y
                    y = torch.rot90(y, -k, dims=(2, 3))
                    total = y if total is None else total + y
            return total / 8

    def predict_page(self, page: np.ndarray, *, pixel_size_nm: float | None = None,
                     progress: TileProgress | None = None) -> np.ndarray:
        """Per-class probabilities ``(K, H, W)`` float32 for one raw 2D page."""
        if page.ndim != 2:
            raise ValueError(f"predict_page expects a 2D page, got shape {page.shape}")
        x = normalize_page(page, self.card.normalization)
        factor = rescale_factor(pixel_size_nm, self.card.pixel_size_nm)
        if factor != 1.0:
            x = resize(x, scaled_shape(x.shape, factor)).numpy()
            log.debug("page rescaled by %.3f to the model's %.3g nm/px: %s", factor, self.card.pixel_size_nm, x.shape)
        probs = sliding_window(x[None], self.forward, tile=self.tile, overlap=self.overlap,
                               batch_size=self.batch_size, device=self.device, progress=progress)
        if factor != 1.0:
            probs = resize(probs, page.shape).numpy()
        return probs

    def iter_pages(self, source, *, keep_probabilities: bool = False,
                   progress: PageTileProgress | None = None) -> Iterator[PageResult]:
        """Yield a :class:`PageResult` per page of an :class:`emseg.io.ImageSource`, in order.

        ``progress`` is called with ``(page_index, tiles_done, tiles_total)`` within each page.
        """
        dtype = labels_dtype(self.card.num_classes)
        for i in range(len(source)):
            tile_progress = (lambda done, total, _i=i: progress(_i, done, total)) if progress else None
            probs = self.predict_page(source.page(i), pixel_size_nm=source.pixel_size_nm, progress=tile_progress)
            labels = probs.argmax(axis=0).astype(dtype)
            yield PageResult(i, labels, probs if keep_probabilities else None)
