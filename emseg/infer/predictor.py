"""Seamless tiled inference of a model over pages and stacks, on the GPU when there is one.

Data flow for each page, all of it on the predictor's device after one upload: the raw page (its
own dtype, e.g. uint16) -> normalise (card) -> rescale to the model's pixel size -> mirror padding
-> overlapping tiles -> network (optionally over the 8 flips/rotations) -> softmax -> Gaussian
blending into a canvas reused from page to page -> rescale back to the page grid -> the annotation
offset's sub-pixel shift (models that have one) -> argmax; only the labels (uint8) come back to the
host, and the probabilities only when asked for. With two classes and nothing to rescale or shift,
the argmax compares the unnormalised weighted sums (the same order per pixel).

Pages are processed one at a time, so memory does not grow with the number of pages;
:meth:`Predictor.iter_pages` reads the next page in a background thread (into pinned memory on
CUDA, uploaded on a side stream) and, on CUDA, queues each page's work before it waits for the
previous page's labels, so the GPU never waits for the host between pages.

Performance (measured in docs/performance.md): the network runs with every batch norm that follows
a convolution folded into it (on a copy: the model's own network is left as it is) and in
channels-last memory format; mixed precision (bf16 autocast, fp16 where bf16 is missing) and
cudnn's benchmark mode are on for CUDA only (bf16 autocast on a CPU without bf16 units was ~40x
slower). On CUDA, ``batch_size="auto"`` picks the batch from measured throughput among the sizes
that fit the free memory (the page's canvas counted), and a batch that runs out of memory is split
in halves and retried (the smaller batch is kept for the rest of the run) instead of ending a long
run. ``compile=True`` runs the network through ``torch.compile`` and falls back to eager mode when
compiling fails.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from emseg.errors import InputError, ModelFileError, OptionError
from emseg.infer.alignment import is_offset, shift_probabilities
from emseg.infer.preprocess import normalize_tensor, rescale_factor, resize, scaled_shape
from emseg.infer.tiling import (
    TileCanvas,
    TileGrid,
    accumulate_,
    blend_weights,
    check_batch_size,
    check_tiling,
    mirror_fill_,
    summed_axis,
)

log = logging.getLogger(__name__)

TileProgress = Callable[[int, int], None]
PageTileProgress = Callable[[int, int, int], None]

#: batch size used for ``batch_size="auto"`` off CUDA (larger CPU batches do not run faster)
CPU_AUTO_BATCH = 4
#: upper bound of an automatic CUDA batch (beyond it throughput no longer grows)
MAX_AUTO_BATCH = 64
#: share of the free GPU memory an automatic batch may fill (the rest: canvas, fragmentation)
AUTO_MEMORY_FRACTION = 0.6
#: share of the free GPU memory a page's padded input and canvas may take; a larger page is blended in bands
CANVAS_MEMORY_FRACTION = 0.5


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch."""
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise OptionError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise OptionError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise OptionError(f"device {device!r} asked for, but Apple MPS is not available; use --device cpu or auto")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise OptionError(f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
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


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """Index of the largest of ``probs (K, H, W)`` per pixel (the first on ties, as ``argmax``), uint8
    for up to 256 classes (int32 beyond); on the tensor's device, without torch's argmax over the
    leading dimension, which is slow on the CPU."""
    k = probs.shape[0]
    if k == 2:
        return torch.gt(probs[1], probs[0]).view(torch.uint8)
    labels = torch.zeros(probs.shape[1:], dtype=torch.uint8 if k <= 256 else torch.int32, device=probs.device)
    best = probs[0].clone()
    for c in range(1, k):
        labels.masked_fill_(probs[c] > best, c)
        torch.maximum(best, probs[c], out=best)
    return labels


def host_page(page: np.ndarray, *, pin: bool = False) -> torch.Tensor:
    """A raw 2D page as a CPU tensor in its own dtype (booleans as uint8, native byte order), pinned
    for an asynchronous upload when ``pin``."""
    a = np.asarray(page)
    if a.ndim != 2:
        raise InputError(f"expected a 2D page, got shape {a.shape}")
    if a.dtype == bool:
        a = a.view(np.uint8)
    if a.dtype.kind not in "uif":
        raise InputError(f"pages must hold real numbers, got dtype {a.dtype}")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # torch warns about read-only memory; tensors are never written here
        a = a.copy()
    t = torch.from_numpy(a)
    return t.pin_memory() if pin else t


class _Workspace:
    """The device buffers of one page geometry, reused from page to page: the padded input and the
    blending canvas."""

    def __init__(self, grid: TileGrid, in_channels: int, classes: int, device: torch.device):
        self.grid = grid
        self.padded = torch.empty((in_channels, *grid.padded_shape), dtype=torch.float32, device=device)
        self.canvas = TileCanvas(grid, _blended_channels(classes), device)

    @staticmethod
    def nbytes(grid: TileGrid, in_channels: int, classes: int) -> int:
        ph, pw = grid.padded_shape
        return 4 * in_channels * ph * pw + TileCanvas.nbytes(grid, _blended_channels(classes))


def _blended_channels(classes: int) -> int:
    """Channels blended per page: one for two classes (class 1's probability, centred), else all."""
    return 1 if classes == 2 else classes


class Predictor:
    """Tiled inference configured once (device, tiling, TTA) and applied to many pages."""

    def __init__(self, model, *, tile: int | None = None, overlap: int | None = None,
                 batch_size: int | str = 4, tta: bool = False, device: str | torch.device = "auto",
                 amp: bool | None = None, channels_last: bool | None = None, fold_bn: bool = True,
                 prefetch: bool = True, compile: bool = False, follow_label_offset: bool | None = None,
                 max_canvas_bytes: int | None = None):
        """
        Args:
            model: an :class:`emseg.model.modelfile.Model`. Without batch norms to fold (or with
                ``fold_bn=False``) its ``net`` itself is moved to ``device``, set to eval mode and, with
                ``channels_last``, converted to that memory format; otherwise a folded copy is.
            tile, overlap: tiling in pixels (None: the card's).
            batch_size: tiles per forward pass, or ``"auto"``: on CUDA the size of best measured
                throughput among those that fit the free memory (measured once, on the first page),
                :data:`CPU_AUTO_BATCH` elsewhere.
            tta: average over the 8 flips/rotations.
            device: ``auto`` (CUDA, then MPS, then CPU) or a torch device string.
            amp: autocast (bf16 where supported, else fp16); default on for CUDA only.
            channels_last: run the network in channels-last memory format; default on except on MPS.
            fold_bn: run a copy of the network with batch norms folded into convolutions (:func:`fold_batchnorm`).
            prefetch: read the next page in a background thread in :meth:`iter_pages`.
            compile: run the network through ``torch.compile`` (eager mode if compiling fails).
            follow_label_offset: move the probabilities by the card's annotation offset (its training
                annotators' sub-pixel bias, emseg.infer.alignment); None: as the card says (models trained
                with the offset followed follow it; older models' offsets only when asked).
            max_canvas_bytes: a page whose padded input and canvas need more than this is blended one
                row of tiles at a time (:meth:`_infer_in_bands`); None: on CUDA a share
                (:data:`CANVAS_MEMORY_FRACTION`) of the free memory, elsewhere no limit.
        """
        self.card = model.card
        if self.card.is_pretrained:
            where = f"{model.path}" if getattr(model, "path", None) else f"model {self.card.name!r}"
            raise ModelFileError(f"{where}: is a pretrained model (emseg pretrain) with no classes yet, so it cannot "
                                 "segment; train from it on a few annotated images first: emseg train --init "
                                 f"{getattr(model, 'path', None) or 'MODEL'} --images ... --masks ...")
        follow = self.card.follow_label_offset if follow_label_offset is None else bool(follow_label_offset)
        self.label_offset = tuple(self.card.label_offset) if follow else (0.0, 0.0)
        if not follow and is_offset(self.card.label_offset):
            log.info("the model carries its training annotation's offset (%+.2f, %+.2f px); predictions do not "
                     "follow it (--follow-label-offset does)", *self.card.label_offset)
        self.tile, self.overlap = check_tiling(self.card.tile_size if tile is None else tile,
                                               self.card.overlap if overlap is None else overlap)
        self._auto_batch = isinstance(batch_size, str)
        if self._auto_batch and batch_size != "auto":
            raise OptionError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
        self.batch_size = CPU_AUTO_BATCH if self._auto_batch else check_batch_size(batch_size)
        self.device = resolve_device(device)
        self.channels_last = (self.device.type != "mps") if channels_last is None else bool(channels_last)
        net = (fold_batchnorm(model.net) if fold_bn else model.net).to(self.device).eval()
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        self.tta = tta
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.prefetch = prefetch
        self.max_canvas_bytes = max_canvas_bytes
        self._run = self.net
        if compile:
            try:
                self._run = torch.compile(self.net)
            except Exception as exc:  # noqa: BLE001 - compiling is an optimisation; eager mode always works
                log.warning("torch.compile is not available here (%s); running the network eagerly", exc)
        self._local = threading.local()  # each thread's _Workspace: dask runs pages of one predictor in threads
        self._copy_stream = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile shapes: cudnn picks its fastest kernels once
            self._copy_stream = torch.cuda.Stream(self.device)

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

    def _tiles_per_second(self, batch: int, repeats: int = 3) -> float:
        """Measured forward throughput at ``batch`` tiles per pass (CUDA)."""
        x = torch.zeros((batch, self.card.in_channels, self.tile, self.tile), device=self.device)
        self._forward_once(x)  # warm-up: cudnn's benchmark mode picks its kernels for this shape here
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(repeats):
            self._forward_once(x)
        torch.cuda.synchronize(self.device)
        return batch * repeats / (time.perf_counter() - start)

    def resolve_batch_size(self, grid: TileGrid | None = None) -> int:
        """For ``batch_size="auto"`` on CUDA: fix the batch size once, to the fastest measured among
        the powers of two (and the largest size) that fit the free memory less the page's buffers."""
        if not self._auto_batch:
            return self.batch_size
        self._auto_batch = False
        free = self._free_memory()
        if free is None:
            return self.batch_size
        per_tile = self._bytes_per_tile()
        free = self._free_memory() or free
        buffers = _Workspace.nbytes(grid, self.card.in_channels, self.card.num_classes) if grid else 0
        if buffers > CANVAS_MEMORY_FRACTION * free:  # the page will be blended in bands of one tile's height
            th, tw = grid.tile_shape
            buffers = 4 * th * grid.padded_shape[1] * (self.card.in_channels + _blended_channels(self.card.num_classes))
        cap = auto_batch_size(max(0, free - buffers), per_tile)
        candidates = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= cap} | {cap})
        rates = {}
        for b in candidates:
            try:
                rates[b] = self._tiles_per_second(b)
            except Exception as exc:  # noqa: BLE001 - a size that runs out of memory is not a candidate
                if not is_out_of_memory(exc):
                    raise
                break
            finally:
                self._release_memory()
        best = max(rates.values())
        self.batch_size = min(b for b, r in rates.items() if r >= 0.95 * best)  # smallest within 5 % of the best
        log.info("automatic batch size %d: %s tiles/s measured at batch %s (%.0f MiB free, %.0f MiB per %d px "
                 "tile, %.0f MiB for the page's buffers)", self.batch_size, "/".join(f"{r:.0f}" for r in rates.values()),
                 "/".join(map(str, rates)), free / 2**20, per_tile / 2**20, self.tile, buffers / 2**20)
        return self.batch_size

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits as float32, compiled where that works (eager from the first failure on)."""
        if self._run is not self.net:
            try:
                return self._run(x).float()
            except Exception as exc:  # noqa: BLE001 - fall back to the eager network
                if is_out_of_memory(exc):
                    raise
                log.warning("torch.compile failed (%s: %s); running the network eagerly", type(exc).__name__, exc)
                self._run = self.net
        return self.net(x).float()

    def _probabilities(self, logits: torch.Tensor, centred: bool) -> torch.Tensor:
        """Softmax over the classes; with ``centred`` (two classes) only class 1's probability less
        one half, ``sigmoid(l1 - l0) - 0.5`` ``(N, 1, h, w)``: half the blending work, and its sign is
        the label."""
        if not centred:
            return torch.softmax(logits, dim=1)
        return torch.sub(logits[:, 1:2], logits[:, 0:1]).sigmoid_().sub_(0.5)

    def _forward_once(self, batch: torch.Tensor, centred: bool = False) -> torch.Tensor:
        """Class probabilities of one batch (see :meth:`_probabilities`), no memory recovery."""
        if self.channels_last and batch.ndim == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            if not self.tta:
                return self._probabilities(self._network(batch), centred)
            total = None
            for k in range(4):
                for flip in (False, True):
                    x = torch.rot90(batch, k, dims=(2, 3))
                    x = torch.flip(x, dims=(3,)) if flip else x
                    y = self._probabilities(self._network(x), centred)
                    y = torch.flip(y, dims=(3,)) if flip else y
                    y = torch.rot90(y, -k, dims=(2, 3))
                    total = y if total is None else total + y
            return total / 8

    def forward(self, batch: torch.Tensor, *, centred: bool = False) -> torch.Tensor:
        """Class probabilities ``(N, K, h, w)`` float32 for a normalised batch ``(N, C, h, w)``
        (with ``centred``, for two classes: class 1's probability less one half, ``(N, 1, h, w)``).

        On an out-of-memory error the batch is split in halves and retried, and ``batch_size`` is
        lowered for the rest of the run; a single tile that does not fit raises the original error.
        """
        if len(batch) > self.batch_size:  # lowered after an out-of-memory error earlier in this page
            return torch.cat([self.forward(part, centred=centred) for part in torch.split(batch, self.batch_size)])
        try:
            out = self._forward_once(batch, centred)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc) or len(batch) <= 1:
                raise
            smaller = len(batch) // 2
            log.warning("out of %s memory with %d tiles per batch; continuing with %d", self.device.type,
                        len(batch), smaller)
        else:
            if out.ndim != 4 or len(out) != len(batch) or out.shape[2:] != batch.shape[2:]:
                raise RuntimeError(f"the network returned shape {tuple(out.shape)} for a batch of shape "
                                   f"{tuple(batch.shape)}; it must return (tiles, classes, height, width) with "
                                   "one output per tile, the size of the tile")
            return out
        self.batch_size = smaller  # outside the except block: its traceback holds the GPU memory
        self._release_memory()
        return self.forward(batch, centred=centred)

    # ------------------------------------------------------------ one page on the device

    def _upload(self, host: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Start copying a host page to the device (a side stream on CUDA); returns the device tensor
        and what :meth:`_ready` waits for."""
        if self._copy_stream is None:
            return host.to(self.device), None
        with torch.cuda.stream(self._copy_stream):
            page = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return page, event

    def _ready(self, page: torch.Tensor, event) -> torch.Tensor:
        """The uploaded page, usable on the current stream."""
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            page.record_stream(stream)  # the allocator must not reuse it before this stream is done
        return page

    def _grid_for(self, shape: tuple[int, int]) -> TileGrid:
        """The tile grid of pages of ``shape`` (the batch size fixed on the first one, if automatic)."""
        ws = getattr(self._local, "workspace", None)
        if ws is not None and (ws.grid.height, ws.grid.width) == shape:
            return ws.grid
        grid = TileGrid(*shape, self.tile, self.overlap)
        if getattr(self._local, "checked", None) != shape:
            grid.check_size()
            self._local.checked = shape
        self.resolve_batch_size(grid)
        return grid

    def _workspace_for(self, grid: TileGrid) -> _Workspace | None:
        """This thread's buffers for pages of ``grid`` (made anew when the grid changes), or None when
        they would not fit the device's memory (then the page is blended band by band)."""
        ws = getattr(self._local, "workspace", None)
        if ws is not None and ws.grid == grid:
            return ws
        if getattr(self._local, "too_large", None) == grid:
            return None
        self._local.workspace = None  # free the old buffers first
        need = _Workspace.nbytes(grid, self.card.in_channels, self.card.num_classes)
        limit = self.max_canvas_bytes
        if limit is None and self.device.type == "cuda":
            limit = int(CANVAS_MEMORY_FRACTION * torch.cuda.mem_get_info(self.device)[0])
        if limit is not None and need > limit:
            self._local.too_large = grid
            return None
        try:
            ws = _Workspace(grid, self.card.in_channels, self.card.num_classes, self.device)
        except Exception as exc:  # noqa: BLE001 - only running out of memory is handled
            if not is_out_of_memory(exc):
                raise
            ws = None
        if ws is None:
            self._local.too_large = grid
            self._release_memory()
        self._local.workspace = ws
        return ws

    def _infer(self, page: torch.Tensor, pixel_size_nm: float | None, keep_probabilities: bool,
               progress: TileProgress | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Labels ``(H, W)`` and, when kept, probabilities ``(K, H, W)`` of one raw page on the device."""
        norm = self.card.normalization
        factor = rescale_factor(pixel_size_nm, self.card.pixel_size_nm)
        shape = tuple(page.shape)
        size = shape if factor == 1.0 else scaled_shape(shape, factor)
        grid = self._grid_for(size)
        ws = self._workspace_for(grid)
        if ws is None:
            return self._infer_in_bands(page, grid, factor, keep_probabilities, progress)
        (top, _), (left, _) = grid.padding
        interior = ws.padded[0, top:top + size[0], left:left + size[1]]
        if factor == 1.0:
            normalize_tensor(page, norm, out=interior)
        else:
            interior.copy_(resize(normalize_tensor(page, norm), size))
            log.debug("page rescaled by %.3f to the model's %.3g nm/px: %s", factor, self.card.pixel_size_nm, size)
        mirror_fill_(ws.padded, top, left, *size)
        canvas = ws.canvas
        canvas.reset()
        binary = self.card.num_classes == 2
        for first, count in grid.batches(self.batch_size):
            canvas.add(first, self.forward(grid.gather(ws.padded, first, count), centred=binary))
            if progress is not None:
                progress(first + count, len(grid))
        if not (keep_probabilities or factor != 1.0 or is_offset(self.label_offset)):
            if binary:  # class 1 where its blended probability exceeds one half: the weighted sum's sign
                return torch.gt(canvas.unnormalised()[0], 0).view(torch.uint8), None
            return argmax_classes(canvas.unnormalised()), None
        return self._finish(canvas.blended(), shape, factor, keep_probabilities)

    def _finish(self, blended: torch.Tensor, shape: tuple[int, int], factor: float,
                keep_probabilities: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Labels and (kept) probabilities from a page's blended output: back to the page grid, moved by
        the followed annotation offset, argmax."""
        probs = blended
        if self.card.num_classes == 2:  # class 1's probability less one half was blended
            p1 = probs.add(0.5)
            probs = torch.cat([torch.sub(1.0, p1), p1])
        if factor != 1.0:
            probs = resize(probs, shape)
        # the card's offset is in the model's pixels: 1 / factor page pixels each
        probs = shift_probabilities(probs, self.label_offset, 1.0 / factor)
        return argmax_classes(probs), (probs if keep_probabilities else None)

    def _infer_in_bands(self, page: torch.Tensor, grid: TileGrid, factor: float, keep_probabilities: bool,
                        progress: TileProgress | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A page whose canvas does not fit the device: normalised and padded in host memory, then
        one row of tiles at a time uploaded, predicted and blended into a band of one tile's height on
        the device; the rows that no later tile touches go back to the host as they are finished.
        The result is the whole-canvas path's (the weights' sums are the same separable vectors)."""
        if getattr(self._local, "banded", None) != (grid.height, grid.width):
            self._local.banded = (grid.height, grid.width)
            log.info("a %d x %d page's canvas (%.1f GiB) does not fit the free memory of %s: blending it one "
                     "row of tiles at a time", grid.height, grid.width,
                     _Workspace.nbytes(grid, self.card.in_channels, self.card.num_classes) / 2**30, self.device)
        norm = self.card.normalization
        x = normalize_tensor(page.cpu(), norm)
        if factor != 1.0:
            x = resize(x, (grid.height, grid.width))
        padded = grid.pad(x[None])
        (th, tw), (sy, sx), (rows, cols) = grid.tile_shape, grid.strides, grid.shape
        (top, _), (left, _) = grid.padding
        h, w = grid.height, grid.width
        channels = _blended_channels(self.card.num_classes)
        binary = self.card.num_classes == 2
        weight = torch.from_numpy(blend_weights(th, tw).copy()).to(self.device)
        ph, pw = grid.padded_shape
        inverse_rows = torch.from_numpy(1 / summed_axis(ph, th, sy, rows)).float()
        inverse_cols = torch.from_numpy(1 / summed_axis(pw, tw, sx, cols)[left:left + w]).float().to(self.device)
        band = torch.zeros((channels, th, pw), dtype=torch.float32, device=self.device)
        blended = torch.empty((channels, h, w), dtype=torch.float32)
        for r in range(rows):
            strip = padded[:, r * sy:r * sy + th].to(self.device)
            windows = strip.unfold(1, th, sy).unfold(2, tw, sx)[:, 0]  # (C, cols, th, tw)
            for c0 in range(0, cols, self.batch_size):
                tiles = windows[:, c0:c0 + self.batch_size].transpose(0, 1).contiguous()
                accumulate_(band, self.forward(tiles, centred=binary), grid, c0, weight)
                if progress is not None:
                    progress(r * cols + min(cols, c0 + self.batch_size), len(grid))
            y0 = r * sy
            finished = sy if r < rows - 1 else th  # rows no later tile reaches
            a, b = max(y0, top), min(y0 + finished, top + h)
            if a < b:
                rows_done = band[:, a - y0:b - y0, left:left + w] * inverse_rows[a:b, None].to(self.device)
                blended[:, a - top:b - top] = (rows_done * inverse_cols).cpu()
            if r < rows - 1:
                band[:, :th - sy] = band[:, sy:].clone()
                band[:, th - sy:] = 0
        shape = tuple(page.shape)
        if not (keep_probabilities or factor != 1.0 or is_offset(self.label_offset)):
            if binary:
                return torch.gt(blended[0], 0).view(torch.uint8), None
            return argmax_classes(blended), None
        return self._finish(blended, shape, factor, keep_probabilities)

    def _to_host(self, labels: torch.Tensor, probs: torch.Tensor | None):
        """Start copying a page's outputs to the host; returns a function that waits and gives them."""
        dtype = labels_dtype(self.card.num_classes)
        if self.device.type != "cuda":
            def done():
                out = labels.cpu().numpy()
                return out.astype(dtype, copy=False), (None if probs is None else probs.to("cpu", copy=True).numpy())
            return done
        host_labels = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=True)
        host_labels.copy_(labels, non_blocking=True)
        host_probs = None
        if probs is not None:
            host_probs = torch.empty(probs.shape, dtype=torch.float32, pin_memory=True)
            host_probs.copy_(probs, non_blocking=True)
        event = torch.cuda.Event()
        event.record()

        def wait():
            event.synchronize()
            return (host_labels.numpy().astype(dtype, copy=False),
                    None if host_probs is None else host_probs.numpy())
        return wait

    # ------------------------------------------------------------ public

    def predict_page(self, page: np.ndarray, *, pixel_size_nm: float | None = None,
                     progress: TileProgress | None = None) -> np.ndarray:
        """Per-class probabilities ``(K, H, W)`` float32 for one raw 2D page."""
        return self.page_result(0, page, pixel_size_nm=pixel_size_nm, keep_probabilities=True,
                                progress=progress).probabilities

    def page_result(self, index: int, page: np.ndarray, *, pixel_size_nm: float | None = None,
                    keep_probabilities: bool = False, progress: TileProgress | None = None) -> PageResult:
        """One page's :class:`PageResult` (labels = argmax of the probabilities, as in :meth:`iter_pages`)."""
        device_page = self._ready(*self._upload(host_page(page, pin=self._copy_stream is not None)))
        labels, probs = self._to_host(*self._infer(device_page, pixel_size_nm, keep_probabilities, progress))()
        return PageResult(index, labels, probs)

    def iter_pages(self, source, *, keep_probabilities: bool = False,
                   progress: PageTileProgress | None = None) -> Iterator[PageResult]:
        """Yield a :class:`PageResult` per page of an :class:`emseg.io.source.ImageSource`, in order.

        ``progress`` is called with ``(page_index, tiles_done, tiles_total)`` within each page.
        With ``prefetch``, page ``i + 1`` is read in a background thread while page ``i`` is inferred
        (at most one page ahead, so memory stays that of two pages). On CUDA, page ``i + 1`` is
        uploaded while page ``i`` is inferred, and page ``i``'s labels are waited for only once page
        ``i + 1``'s work is queued.
        """
        pin = self._copy_stream is not None

        def read(i: int) -> torch.Tensor:
            return host_page(source.page(i), pin=pin)

        n = len(source)
        pool = ThreadPoolExecutor(1, thread_name_prefix="emseg-prefetch") if self.prefetch and n > 1 else None
        pending = None  # (index, wait) of the page whose outputs are on their way to the host
        try:
            reading = pool.submit(read, 0) if pool else None
            upload = None
            for i in range(n):
                if upload is None:
                    upload = self._upload(reading.result() if pool else read(i))
                current = upload
                upload = None
                if pool and i + 1 < n:
                    reading = pool.submit(read, i + 1)
                page = self._ready(*current)
                tile_progress = (lambda done, total, _i=i: progress(_i, done, total)) if progress else None
                outputs = self._to_host(*self._infer(page, source.pixel_size_nm, keep_probabilities, tile_progress))
                del page, current
                if pending is not None:
                    yield PageResult(pending[0], *pending[1]())
                    pending = None
                if self._copy_stream is None:
                    yield PageResult(i, *outputs())
                else:  # queue the next page's upload, then hand over this page once the next one is queued
                    pending = (i, outputs)
                    if pool and i + 1 < n:
                        upload = self._upload(reading.result())
            if pending is not None:
                yield PageResult(pending[0], *pending[1]())
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
