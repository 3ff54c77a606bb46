"""Overlap-tile geometry and seamless blending on any torch device, independent of any network.

Geometry (:class:`TileGrid`, pure): the page is mirror-padded (``reflect``) by at least half the
overlap on every side, as in the U-Net overlap-tile strategy, and covered by tiles at one constant
stride per axis, neighbours sharing at least ``overlap`` pixels. The padded extent is the smallest
that the tiles cover exactly; the page sits in its centre, so every page edge has the same mirrored
context (a page smaller than one tile gets a smaller tile, rounded up to a multiple of 32).

Blending (:class:`TileCanvas`): each tile's output is multiplied by a separable Gaussian importance
map and added into a canvas of the padded page on the tiles' device; dividing by the summed weights
gives every output pixel the weighted mean of the tiles covering it, so no seam shows. Tiles of one
row of the grid that do not overlap are added in one strided operation, so the work per batch is a
few tensor operations whatever the batch size. The Gaussian is not floored: where two tiles cover a
pixel, the one that sees it nearer its centre (with more context) dominates by the Gaussian's ratio.

:func:`sliding_window` is the pure function over any callable: a page ``(C, H, W)`` and a function
mapping a batch ``(N, C, th, tw)`` to ``(N, K, th, tw)`` give ``(K, H, W)`` float32. Stitching the
identity returns the input (up to float rounding) for any shape, tile and overlap.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from emseg.errors import InputError, OptionError

log = logging.getLogger(__name__)

DIVISOR = 32  # a U-Net with 5 poolings needs sides divisible by 2**5
#: least blend weight along one axis (relative to the centre's 1): the Gaussian with sigma = side / 8
#: falls to 3.4e-4 at a tile's edge, so the floor only keeps far wider sigmas' products positive
WEIGHT_FLOOR = 1e-6
#: an overlap that multiplies the tiles of a page by more than this is warned about (:meth:`TileGrid.check_size`)
OVERLAP_COST = 16

ProgressFn = Callable[[int, int], None]


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_tiling(tile, overlap, *, what: str = "tile") -> tuple[int, int]:
    """``(tile, overlap)`` as ints, or an :class:`InputError` saying what is wrong with them."""
    if not _is_int(tile) or tile <= 0 or tile % DIVISOR:
        raise OptionError(f"{what} size must be a positive whole multiple of {DIVISOR} pixels (e.g. 256 or 512), "
                         f"got {tile!r}")
    if not _is_int(overlap) or not 0 <= overlap < tile:
        raise OptionError(f"overlap must be a whole number of pixels, at least 0 and smaller than the {what} "
                         f"({tile}), got {overlap!r}")
    return int(tile), int(overlap)


def check_batch_size(batch_size) -> int:
    """A positive int, or an :class:`InputError`."""
    if not _is_int(batch_size) or batch_size < 1:
        raise OptionError(f"batch size must be a whole number of tiles, at least 1, got {batch_size!r}")
    return int(batch_size)


def axis_layout(length: int, tile: int, overlap: int) -> tuple[int, int, int]:
    """``(count, stride, extent)`` of tiles covering ``length`` pixels along one axis.

    The fewest tiles of side ``tile`` at one constant ``stride <= tile - overlap`` (so neighbours
    share at least ``overlap`` pixels) whose ``extent = (count - 1) * stride + tile`` is at least
    ``length``; the extent exceeds ``length`` by less than ``count - 1`` pixels. One tile (stride
    ``tile``) when ``length <= tile``.
    """
    if length <= tile:
        return 1, tile, tile
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    stride = math.ceil((length - tile) / (count - 1))
    return count, stride, (count - 1) * stride + tile


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles of :func:`axis_layout` (the last one ends at its extent)."""
    count, stride, _ = axis_layout(length, tile, overlap)
    return [i * stride for i in range(count)]


@lru_cache(maxsize=32)
def blend_axis(n: int, sigma_scale: float = 0.125) -> np.ndarray:
    """One axis of the importance map: a Gaussian over ``n`` pixels peaking at 1 in the middle,
    ``sigma = sigma_scale * n`` as in nnU-Net, floored at :data:`WEIGHT_FLOOR` (float64, read-only)."""
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    w = np.maximum(np.exp(-0.5 * (x / (sigma_scale * n)) ** 2), WEIGHT_FLOOR)
    w.flags.writeable = False
    return w


@lru_cache(maxsize=16)
def blend_weights(height: int, width: int, sigma_scale: float = 0.125) -> np.ndarray:
    """The separable Gaussian importance map ``(height, width)``, the outer product of two
    :func:`blend_axis`, peaking at 1 in the tile centre. Not floored as a whole (a floor lets a tile that
    sees a pixel at its very edge weigh as much as one that sees it with context): 1e-7 in a corner.
    Separable, so the weights summed over a grid of tiles are the outer product of two sums along the
    axes. The returned array is read-only (it is cached)."""
    w = np.outer(blend_axis(height, sigma_scale), blend_axis(width, sigma_scale)).astype(np.float32)
    w.flags.writeable = False
    return w


def summed_axis(length: int, tile: int, stride: int, count: int, sigma_scale: float = 0.125) -> np.ndarray:
    """The weights of :func:`blend_axis` summed over ``count`` tiles ``stride`` apart along an axis of
    ``length`` pixels (float64)."""
    total = np.zeros(length)
    w = blend_axis(tile, sigma_scale)
    for i in range(count):
        total[i * stride:i * stride + tile] += w
    return total


def mirror_index(count: int, before: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices into ``length`` samples that mirror-pad them (numpy's ``reflect``) to ``count`` samples
    starting ``before`` samples before the first one; any amount of padding (reflected repeatedly).
    Made on ``device`` (no host-to-device copy, so no synchronisation)."""
    i = torch.arange(-before, count - before, device=device)
    if length == 1:
        return torch.zeros_like(i)
    period = 2 * (length - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= length, period - i, i)


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one page go: padding, tile shape, stride and every tile's top-left corner.

    Tiles are numbered row by row: tile ``k`` is in row ``k // cols`` and column ``k % cols``.
    """

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self):
        check_tiling(self.tile, self.overlap)
        if not (_is_int(self.height) and _is_int(self.width)) or self.height < 1 or self.width < 1:
            raise InputError(f"cannot tile an empty page of shape ({self.height}, {self.width})")

    @property
    def margin(self) -> int:
        """Least mirror padding on every side, so border pixels get the context interior ones have."""
        return self.overlap // 2

    def _axis(self, length: int) -> tuple[int, int, int, int]:
        """``(tile side, count, stride, extent)`` along an axis of ``length`` page pixels."""
        needed = length + 2 * self.margin
        if needed <= self.tile:  # one tile, no larger than the page needs
            side = round_up(needed, DIVISOR)
            return side, 1, side, side
        count, stride, extent = axis_layout(needed, self.tile, self.overlap)
        return self.tile, count, stride, extent

    @property
    def tile_shape(self) -> tuple[int, int]:
        """Tile (height, width): the tile size, or less for a page smaller than one tile."""
        return self._axis(self.height)[0], self._axis(self.width)[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Tiles per column and per row: ``(rows, cols)``."""
        return self._axis(self.height)[1], self._axis(self.width)[1]

    @property
    def strides(self) -> tuple[int, int]:
        """Pixels from one tile to the next down and across (the tile side where there is one tile)."""
        return self._axis(self.height)[2], self._axis(self.width)[2]

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Shape of the mirror-padded page, which the tiles cover exactly."""
        return self._axis(self.height)[3], self._axis(self.width)[3]

    @property
    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``np.pad`` widths ((top, bottom), (left, right)): the page centred in the padded page."""
        (ph, pw), h, w = self.padded_shape, self.height, self.width
        top, left = (ph - h) // 2, (pw - w) // 2
        return (top, ph - h - top), (left, pw - w - left)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Top-left corner of every tile in padded-page coordinates, row by row."""
        (rows, cols), (sy, sx) = self.shape, self.strides
        return [(r * sy, c * sx) for r in range(rows) for c in range(cols)]

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def batches(self, batch_size: int) -> Iterator[tuple[int, int]]:
        """``(first tile, number of tiles)`` of each batch of at most ``batch_size`` tiles."""
        n = len(self)
        for first in range(0, n, batch_size):
            yield first, min(batch_size, n - first)

    def segments(self, first: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """Split tiles ``first .. first + count - 1`` into runs within one row of the grid:
        ``(offset in the batch, row, first column, tiles)`` each."""
        cols = self.shape[1]
        done = 0
        while done < count:
            row, col = divmod(first + done, cols)
            run = min(count - done, cols - col)
            yield done, row, col, run
            done += run

    def pad(self, page: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(C, H, W)`` page mirror-padded to ``(C, *padded_shape)``, into ``out`` if given."""
        if out is None:
            out = page.new_empty((page.shape[0], *self.padded_shape))
        (top, _), (left, _) = self.padding
        out[:, top:top + self.height, left:left + self.width] = page
        mirror_fill_(out, top, left, self.height, self.width)
        return out

    def gather(self, padded: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Tiles ``first .. first + count - 1`` of a padded page ``(C, ph, pw)`` as one contiguous
        batch ``(count, C, th, tw)`` (one copy per row of the grid the batch touches)."""
        (th, tw), (sy, sx) = self.tile_shape, self.strides
        windows = padded.unfold(1, th, sy).unfold(2, tw, sx)  # (C, rows, cols, th, tw), a view
        parts = [windows[:, row, col:col + run].transpose(0, 1) for _, row, col, run in self.segments(first, count)]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)

    def check_size(self) -> None:
        """Warn when the overlap multiplies the work: more than :data:`OVERLAP_COST` times the tiles
        that the page would take without overlap (an overlap of tile - 1 takes one tile per pixel)."""
        plain = len(TileGrid(self.height, self.width, self.tile, 0))
        if len(self) > OVERLAP_COST * plain:
            th, tw = self.tile_shape
            log.warning("a %d x %d page takes %s tiles of %d x %d with an overlap of %d px, %.0fx the %d tiles it "
                        "needs without overlap; an overlap of a quarter of the tile (%d px) is usually enough",
                        self.height, self.width, f"{len(self):,}", th, tw, self.overlap, len(self) / plain, plain,
                        self.tile // 4)


def mirror_fill_(padded: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Fill the border of ``padded (C, ph, pw)`` around the page at ``[top:top+height, left:left+width]``
    with its mirror image (numpy's ``reflect``), in place; returns ``padded``."""
    ph, pw = padded.shape[-2:]
    rows = mirror_index(ph, top, height, padded.device) + top
    cols = mirror_index(pw, left, width, padded.device) + left
    band = slice(left, left + width)
    if top:  # whole rows of the (contiguous) padded page are gathered, then the page's columns kept
        padded[:, :top, band] = padded.index_select(1, rows[:top])[:, :, band]
    if ph - top - height:
        padded[:, top + height:, band] = padded.index_select(1, rows[top + height:])[:, :, band]
    if left:
        padded[:, :, :left] = padded.index_select(2, cols[:left])
    if pw - left - width:
        padded[:, :, left + width:] = padded.index_select(2, cols[left + width:])
    return padded


def accumulate_(canvas: torch.Tensor, tiles: torch.Tensor, grid: TileGrid, first: int,
                weight: torch.Tensor | None = None) -> None:
    """Add tiles ``first ..`` (``(n, K, th, tw)``, times ``weight (th, tw)`` if given) into ``canvas
    (K, ph, pw)`` at their places, in place. Tiles of a row that do not overlap each other go in one
    strided operation (``ceil(tw / stride)`` of them per row)."""
    (th, tw), (sy, sx) = grid.tile_shape, grid.strides
    cols = grid.shape[1]
    step = 1 if cols == 1 else math.ceil(tw / sx)  # tiles this far apart in a row do not overlap
    sk, sh, sw = canvas.stride()
    for offset, row, col, run in grid.segments(first, len(tiles)):
        for p in range(min(step, run)):
            part = tiles[offset + p:offset + run:step]
            view = canvas.as_strided((len(part), canvas.shape[0], th, tw), (step * sx * sw, sk, sh, sw),
                                     canvas.storage_offset() + row * sy * sh + (col + p) * sx * sw)
            if weight is None:
                view.add_(part)
            else:
                view.addcmul_(part, weight)


class TileCanvas:
    """Blends the tile outputs of pages of one :class:`TileGrid` on one device; reuse it across pages.

    Holds the weighted sum ``(K, ph, pw)`` and, computed once, the reciprocals of the summed weights along
    each axis (their outer product is the reciprocal of the summed weights).
    ``reset()`` before each page, ``add()`` each batch, then ``blended()`` (the page's weighted means,
    normalised in place) or ``unnormalised()`` (same order of classes per pixel, for an argmax).
    """

    def __init__(self, grid: TileGrid, channels: int, device: torch.device | str):
        self.grid, self.channels, self.device = grid, channels, torch.device(device)
        (th, tw), (sy, sx), (rows, cols) = grid.tile_shape, grid.strides, grid.shape
        self.weight = torch.from_numpy(blend_weights(th, tw).copy()).to(self.device)
        self.sum = torch.zeros((channels, *grid.padded_shape), dtype=torch.float32, device=self.device)
        # the summed weights are the outer product of their sums along the axes (blend_weights is separable)
        (top, _), (left, _) = grid.padding
        ph, pw = grid.padded_shape
        down = summed_axis(ph, th, sy, rows)[top:top + grid.height]
        across = summed_axis(pw, tw, sx, cols)[left:left + grid.width]
        self._inverse_rows = torch.from_numpy((1 / down).astype(np.float32)).to(self.device)[:, None]
        self._inverse_cols = torch.from_numpy((1 / across).astype(np.float32)).to(self.device)[None, :]
        self._normalised = False

    @staticmethod
    def nbytes(grid: TileGrid, channels: int) -> int:
        """Device memory of a canvas for ``grid``."""
        ph, pw = grid.padded_shape
        return 4 * (channels * ph * pw + grid.height + grid.width)

    def _interior(self, t: torch.Tensor) -> torch.Tensor:
        (top, _), (left, _) = self.grid.padding
        return t[:, top:top + self.grid.height, left:left + self.grid.width]

    def reset(self) -> None:
        self.sum.zero_()
        self._normalised = False

    def add(self, first: int, tiles: torch.Tensor) -> None:
        """Add a batch of tile outputs ``(n, K, th, tw)``, tiles ``first .. first + n - 1`` of the grid."""
        expected = (self.channels, *self.grid.tile_shape)
        if tiles.ndim != 4 or tuple(tiles.shape[1:]) != expected:
            raise RuntimeError(f"the network returned tiles of shape {tuple(tiles.shape)} for a batch of "
                               f"{tiles.shape[0] if tiles.ndim else 0} tiles; expected (n, {', '.join(map(str, expected))})")
        if self._normalised:
            raise RuntimeError("TileCanvas.add() after blended(); call reset() first")
        accumulate_(self.sum, tiles, self.grid, first, self.weight)

    def unnormalised(self) -> torch.Tensor:
        """The page's weighted sums ``(K, H, W)`` (a view): the classes in the same order per pixel
        as :meth:`blended`, since each pixel's weights sum to one positive number."""
        return self._interior(self.sum)

    def blended(self) -> torch.Tensor:
        """The page's blended output ``(K, H, W)``: a view, normalised in place, valid until ``reset()``."""
        out = self._interior(self.sum)
        if not self._normalised:
            out.mul_(self._inverse_rows).mul_(self._inverse_cols)
            self._normalised = True
        return out


def sliding_window(
    page: np.ndarray | torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Run ``fn`` over overlapping tiles of ``page`` and blend the outputs into one array.

    Args:
        page: ``(C, H, W)`` float array (already normalised), numpy or torch.
        fn: maps a ``(N, C, th, tw)`` tensor on ``device`` to ``(N, K, th, tw)``.
        tile: tile side, a multiple of 32.
        overlap: pixels shared by neighbouring tiles (at least half of it is also mirrored at the border).
        batch_size: tiles per call of ``fn``.
        device: where ``fn`` runs; the padded page and the blending canvas live there too.
        progress: called with ``(tiles_done, tiles_total)`` after every batch.

    Returns:
        ``(K, H, W)`` float32 array on the CPU.
    """
    if page.ndim != 3:
        raise InputError(f"sliding_window expects a (C, H, W) page, got shape {tuple(page.shape)}")
    batch_size = check_batch_size(batch_size)
    device = torch.device(device)
    grid = TileGrid(int(page.shape[1]), int(page.shape[2]), tile, overlap)
    grid.check_size()
    padded = grid.pad(torch.as_tensor(page).to(device=device, dtype=torch.float32))
    canvas = None
    for first, count in grid.batches(batch_size):
        out = fn(grid.gather(padded, first, count))
        if canvas is None:
            if out.ndim != 4:
                raise RuntimeError(f"the network returned shape {tuple(out.shape)}; expected (n, classes, h, w)")
            canvas = TileCanvas(grid, out.shape[1], device)
        if len(out) != count:
            raise RuntimeError(f"the network returned {len(out)} tiles for a batch of {count}")
        canvas.add(first, out.float())
        if progress is not None:
            progress(first + count, len(grid))
    return canvas.blended().cpu().numpy().copy()
