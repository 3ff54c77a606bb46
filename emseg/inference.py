"""Seamless tiled inference of a model over pages and stacks.

Data flow for each page: normalise (card) -> rescale to the model's pixel size -> overlapping tiles
-> network (optionally over the 8 flips/rotations) -> softmax -> Gaussian blending -> rescale back
to the page grid -> argmax. Pages are processed one at a time, so memory does not grow with the
number of pages; :meth:`Predictor.iter_pages` yields each page's result as soon as it is done.

Performance (measured in docs/performance.md): the network runs with every batch norm that follows
a convolution folded into it (on a copy: the model's own network is left as it is) and in
channels-last memory format (faster convolutions on CPU and GPU; both give the same results up to
float rounding); mixed precision (autocast)
is on for CUDA only (bf16 autocast on a CPU without bf16 units was ~40x slower); the next page is
read and normalised in a background thread while the current one is inferred. On CUDA,
``batch_size="auto"`` picks the batch from free GPU memory, and a batch that runs out of memory is
split in halves and retried (the smaller batch is kept for the rest of the run) instead of
ending a long run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import numbers
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .alignment import shift_probabilities
from .preprocess import normalize_page, rescale_factor, resize, scaled_shape
from .tiling import DIVISOR, sliding_window

log = logging.getLogger(__name__)

TileProgress = Callable[[int, int], None]
PageTileProgress = Callable[[int, int, int], None]

#: batch size used for ``batch_size="auto"`` off CUDA (larger CPU batches do not run faster)
CPU_AUTO_BATCH = 4
#: upper bound of an automatic CUDA batch (beyond it throughput no longer grows)
MAX_AUTO_BATCH = 64
#: share of the free GPU memory an automatic batch may fill (the rest: canvas, fragmentation)
AUTO_MEMORY_FRACTION = 0.6


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch."""
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is not a device torch knows; use auto, cpu, cuda, cuda:N "
                             "or mps") from None
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


def _conv_bn_pairs(net: torch.nn.Module) -> list[tuple[torch.nn.Sequential, str, str]]:
    """``(sequential, conv_name, bn_name)`` for each Conv2d directly followed by a BatchNorm2d with running stats."""
    pairs = []
    for module in net.modules():
        if isinstance(module, torch.nn.Sequential):
            items = list(module._modules.items())
            for (name_a, a), (name_b, b) in zip(items, items[1:]):
                if (type(a) is torch.nn.Conv2d and isinstance(b, torch.nn.BatchNorm2d)
                        and b.running_mean is not None and b.num_features == a.out_channels):
                    pairs.append((module, name_a, name_b))
    return pairs


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``net`` with each BatchNorm2d that follows a Conv2d folded into the conv.

    Same outputs as ``net.eval()`` up to float rounding, one memory pass less per folded layer (1.1x
    to 2x faster on CPU, most for narrow networks). Returns ``net`` itself when nothing can be folded.
    """
    if not _conv_bn_pairs(net):
        return net
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    folded = copy.deepcopy(net).eval()
    with torch.no_grad():
        for seq, conv_name, bn_name in _conv_bn_pairs(folded):
            conv, bn = seq._modules[conv_name], seq._modules[bn_name]
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
            seq._modules[bn_name] = torch.nn.Identity()
    return folded


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA/accelerator out-of-memory error (``torch.OutOfMemoryError`` or MPS's message)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def auto_batch_size(free_bytes: int, bytes_per_tile: int, *, fraction: float = AUTO_MEMORY_FRACTION,
                    cap: int = MAX_AUTO_BATCH) -> int:
    """Tiles per forward pass that fit ``fraction`` of ``free_bytes`` at ``bytes_per_tile`` each (1..cap)."""
    if bytes_per_tile <= 0:
        return cap
    return int(max(1, min(cap, fraction * free_bytes // bytes_per_tile)))


@dataclass
class PageResult:
    """One page's output: labels ``(H, W)`` and, when kept, probabilities ``(classes, H, W)``."""

    index: int
    labels: np.ndarray
    probabilities: np.ndarray | None = None


class Predictor:
    """Tiled inference configured once (device, tiling, TTA) and applied to many pages."""

    def __init__(self, model, *, tile: int | None = None, overlap: int | None = None,
                 batch_size: int | str = 4, tta: bool = False, device: str | torch.device = "auto",
                 amp: bool | None = None, channels_last: bool | None = None, fold_bn: bool = True,
                 prefetch: bool = True):
        """
        Args:
            model: an :class:`emseg.modelfile.Model`. Without batch norms to fold (or with
                ``fold_bn=False``) its ``net`` itself is moved to ``device``, set to eval mode and, with
                ``channels_last``, converted to that memory format; otherwise a folded copy is.
            tile, overlap: tiling in pixels (defaults from the card).
            batch_size: tiles per forward pass, or ``"auto"``: from free GPU memory on CUDA
                (measured with one probe tile on first use), :data:`CPU_AUTO_BATCH` elsewhere.
            tta: average over the 8 flips/rotations.
            device: ``auto`` (CUDA, then MPS, then CPU) or a torch device string.
            amp: autocast (bf16 where supported, else fp16); default on for CUDA only.
            channels_last: run the network in channels-last memory format; default on except on MPS.
            fold_bn: run a copy of the network with batch norms folded into convolutions (:func:`fold_batchnorm`).
            prefetch: read and normalise the next page in a background thread in :meth:`iter_pages`.
        """
        self.card = model.card
        self.device = resolve_device(device)
        self.channels_last = (self.device.type != "mps") if channels_last is None else bool(channels_last)
        net = (fold_batchnorm(model.net) if fold_bn else model.net).to(self.device).eval()
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        self.tile = int(tile or self.card.tile_size)
        self.overlap = int(self.card.overlap if overlap is None else overlap)
        if self.tile % DIVISOR or self.tile <= 0:
            raise ValueError(f"tile size must be a positive multiple of {DIVISOR}, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be at least 0 and smaller than the tile ({self.tile}), got {self.overlap}")
        self._auto_batch = isinstance(batch_size, str)
        if self._auto_batch:
            if batch_size != "auto":
                raise ValueError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
            batch_size = CPU_AUTO_BATCH
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.tta = tta
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.prefetch = prefetch

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------ batch size and OOM recovery

    def _free_memory(self) -> int | None:
        """Free accelerator memory in bytes, or None where it is not known (CPU, MPS)."""
        if self.device.type != "cuda":
            return None
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)

    def _bytes_per_tile(self) -> int:
        """Peak CUDA memory of a forward pass of one full tile, measured once."""
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        probe = torch.zeros((1, self.card.in_channels, self.tile, self.tile), device=self.device)
        self._forward_once(probe)
        torch.cuda.synchronize(self.device)
        return max(1, int(torch.cuda.max_memory_allocated(self.device) - before))

    def resolve_batch_size(self) -> int:
        """For ``batch_size="auto"``: fix the batch size from free accelerator memory (once)."""
        if self._auto_batch:
            self._auto_batch = False
            free = self._free_memory()
            if free is not None:
                per_tile = self._bytes_per_tile()
                free = self._free_memory() or free
                self.batch_size = auto_batch_size(free, per_tile)
                log.info("automatic batch size %d (%.0f MiB free, %.0f MiB per %d px tile)", self.batch_size,
                         free / 2**20, per_tile / 2**20, self.tile)
        return self.batch_size

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward_once(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities of one batch, no memory recovery."""
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
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

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, K, h, w)`` float32 for a normalised batch ``(N, C, h, w)``.

        On an out-of-memory error the batch is split in halves and retried, and ``batch_size`` is
        lowered for the rest of the run; a single tile that does not fit raises the original error.
        """
        if len(batch) > self.batch_size:  # lowered after an out-of-memory error earlier in this page
            return torch.cat([self.forward(part) for part in torch.split(batch, self.batch_size)])
        try:
            return self._forward_once(batch)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc) or len(batch) <= 1:
                raise
            smaller = len(batch) // 2
            log.warning("out of %s memory with %d tiles per batch; continuing with %d", self.device.type,
                        len(batch), smaller)
        self.batch_size = smaller  # outside the except block: its traceback holds the GPU memory
        self._release_memory()
        return self.forward(batch)

    def prepare_page(self, page: np.ndarray, pixel_size_nm: float | None = None) -> tuple[np.ndarray, float]:
        """Normalised page rescaled to the model's pixel size (float32 ``(h, w)``) and the zoom factor."""
        if page.ndim != 2:
            raise ValueError(f"predict_page expects a 2D page, got shape {page.shape}")
        x = normalize_page(page, self.card.normalization)
        factor = rescale_factor(pixel_size_nm, self.card.pixel_size_nm)
        if factor != 1.0:
            x = resize(x, scaled_shape(x.shape, factor)).numpy()
            log.debug("page rescaled by %.3f to the model's %.3g nm/px: %s", factor, self.card.pixel_size_nm, x.shape)
        return x, factor

    def _infer_prepared(self, x: np.ndarray, factor: float, shape: tuple[int, int],
                        progress: TileProgress | None = None) -> np.ndarray:
        probs = sliding_window(x[None], self.forward, tile=self.tile, overlap=self.overlap,
                               batch_size=self.resolve_batch_size(), device=self.device, progress=progress)
        if factor != 1.0:
            probs = resize(probs, shape).numpy()
        # the card's offset is in the model's pixels: 1 / factor page pixels each
        return shift_probabilities(probs, self.card.label_offset, 1.0 / factor)

    def predict_page(self, page: np.ndarray, *, pixel_size_nm: float | None = None,
                     progress: TileProgress | None = None) -> np.ndarray:
        """Per-class probabilities ``(K, H, W)`` float32 for one raw 2D page."""
        x, factor = self.prepare_page(page, pixel_size_nm)
        return self._infer_prepared(x, factor, page.shape, progress)

    def page_result(self, index: int, page: np.ndarray, *, pixel_size_nm: float | None = None,
                    keep_probabilities: bool = False, progress: TileProgress | None = None) -> PageResult:
        """One page's :class:`PageResult` (labels = argmax of the probabilities, as in :meth:`iter_pages`)."""
        probs = self.predict_page(page, pixel_size_nm=pixel_size_nm, progress=progress)
        return self._result(index, probs, keep_probabilities)

    def _result(self, index: int, probs: np.ndarray, keep_probabilities: bool) -> PageResult:
        labels = probs.argmax(axis=0).astype(labels_dtype(self.card.num_classes))
        return PageResult(index, labels, probs if keep_probabilities else None)

    def iter_pages(self, source, *, keep_probabilities: bool = False,
                   progress: PageTileProgress | None = None) -> Iterator[PageResult]:
        """Yield a :class:`PageResult` per page of an :class:`emseg.io.ImageSource`, in order.

        ``progress`` is called with ``(page_index, tiles_done, tiles_total)`` within each page.
        With ``prefetch``, page ``i + 1`` is read and normalised in a background thread while page
        ``i`` is inferred (at most one page ahead, so memory stays that of two pages).
        """
        def load(i: int):
            page = source.page(i)
            x, factor = self.prepare_page(page, source.pixel_size_nm)
            return page.shape, x, factor

        n = len(source)
        pool = ThreadPoolExecutor(1, thread_name_prefix="emseg-prefetch") if self.prefetch and n > 1 else None
        try:
            pending = pool.submit(load, 0) if pool else None
            for i in range(n):
                if pool:
                    shape, x, factor = pending.result()
                    pending = pool.submit(load, i + 1) if i + 1 < n else None
                else:
                    shape, x, factor = load(i)
                tile_progress = (lambda done, total, _i=i: progress(_i, done, total)) if progress else None
                probs = self._infer_prepared(x, factor, shape, tile_progress)
                del x
                yield self._result(i, probs, keep_probabilities)
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
