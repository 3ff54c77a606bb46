"""Overlap-tile geometry and seamless blending, independent of any network.

Contract: :func:`sliding_window` takes a page ``(C, H, W)`` float32 array and a function mapping a
batch ``(N, C, th, tw)`` float32 tensor to ``(N, K, th, tw)``; it returns ``(K, H, W)`` float32.
The page is mirror-padded (``reflect``) by half the overlap on every side, as in the U-Net
overlap-tile strategy, then padded further to at least one tile. Tiles are laid evenly so that they
cover the padded page exactly, and their outputs are blended with a separable Gaussian importance
map, so that each output pixel is a weighted mean of every tile covering it and no seam shows.
Stitching the identity returns the input (up to float rounding) for any shape, tile and overlap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

DIVISOR = 32  # a U-Net with 5 poolings needs sides divisible by 2**5

ProgressFn = Callable[[int, int], None]


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap`` overlap.

    Tiles are spread evenly (the last one ends exactly at ``length``); ``length >= tile`` is required.
    """
    if length < tile:
        raise ValueError(f"length {length} is shorter than the tile {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    if length == tile:
        return [0]
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@lru_cache(maxsize=16)
def blend_weights(height: int, width: int, sigma_scale: float = 0.125, floor: float = 1e-4) -> np.ndarray:
    """A separable Gaussian importance map ``(height, width)`` peaking at 1 in the tile centre.

    ``sigma = sigma_scale * side`` as in nnU-Net; values are floored at ``floor`` so that every
    pixel keeps a positive weight. The returned array is read-only (it is cached).
    """
    def axis(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        return np.exp(-0.5 * (x / (sigma_scale * n)) ** 2)

    w = np.maximum(np.outer(axis(height), axis(width)), floor).astype(np.float32)
    w.flags.writeable = False
    return w


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one page go: padding, tile shape and every tile's top-left corner."""

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self):
        if self.tile % DIVISOR or self.tile <= 0:
            raise ValueError(f"tile size must be a positive multiple of {DIVISOR}, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile), got {self.overlap} for tile {self.tile}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"cannot tile an empty page of shape ({self.height}, {self.width})")

    @property
    def margin(self) -> int:
        """Mirror padding on every side, so border pixels get the context interior ones have."""
        return self.overlap // 2

    @property
    def tile_shape(self) -> tuple[int, int]:
        """Tile (height, width): the tile size, or less for a page smaller than one tile."""
        m2 = 2 * self.margin
        return (min(self.tile, round_up(self.height + m2, DIVISOR)),
                min(self.tile, round_up(self.width + m2, DIVISOR)))

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Shape after mirror padding: the page plus margins, and at least one tile."""
        th, tw = self.tile_shape
        m2 = 2 * self.margin
        return max(self.height + m2, th), max(self.width + m2, tw)

    @property
    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``np.pad`` widths ((top, bottom), (left, right)) turning the page into the padded page."""
        ph, pw = self.padded_shape
        m = self.margin
        return (m, ph - self.height - m), (m, pw - self.width - m)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Top-left corner of every tile in padded-page coordinates, row by row."""
        (ph, pw), (th, tw) = self.padded_shape, self.tile_shape
        ov_h, ov_w = min(self.overlap, th - 1), min(self.overlap, tw - 1)
        return [(y, x) for y in tile_starts(ph, th, ov_h) for x in tile_starts(pw, tw, ov_w)]

    def __len__(self) -> int:
        return len(self.origins)

    def batches(self, batch_size: int) -> Iterator[list[tuple[int, int]]]:
        """Tile origins in groups of at most ``batch_size``."""
        origins = self.origins
        for i in range(0, len(origins), batch_size):
            yield origins[i:i + batch_size]


def pad_page(page: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Mirror-pad a ``(C, H, W)`` page to the grid's padded shape."""
    return np.pad(page, ((0, 0), *grid.padding), mode="reflect")


def sliding_window(
    page: np.ndarray,
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
        page: ``(C, H, W)`` float32 array (already normalised).
        fn: maps a ``(N, C, th, tw)`` tensor on ``device`` to ``(N, K, th, tw)``.
        tile: tile side, a multiple of 32.
        overlap: pixels shared by neighbouring tiles (half of it is also mirrored at the border).
        batch_size: tiles per call of ``fn``.
        device: where ``fn`` runs; the blending canvas lives there too.
        progress: called with ``(tiles_done, tiles_total)`` after every batch.

    Returns:
        ``(K, H, W)`` float32 array on the CPU.
    """
    if page.ndim != 3:
        raise ValueError(f"sliding_window expects a (C, H, W) page, got shape {page.shape}")
    device = torch.device(device)
    grid = TileGrid(page.shape[1], page.shape[2], tile, overlap)
    padded = torch.from_numpy(np.ascontiguousarray(pad_page(page.astype(np.float32, copy=False), grid)))
    if device.type == "cuda":
        padded = padded.pin_memory()
    th, tw = grid.tile_shape
    weight = torch.from_numpy(blend_weights(th, tw).copy()).to(device)
    canvas = weight_sum = None
    done, total = 0, len(grid)
    for origins in grid.batches(batch_size):
        batch = torch.stack([padded[:, y:y + th, x:x + tw] for y, x in origins])
        out = fn(batch.to(device, non_blocking=True)).float()
        if canvas is None:
            canvas = torch.zeros((out.shape[1], *grid.padded_shape), dtype=torch.float32, device=device)
            weight_sum = torch.zeros(grid.padded_shape, dtype=torch.float32, device=device)
        for (y, x), tile_out in zip(origins, out):
            canvas[:, y:y + th, x:x + tw] += tile_out * weight
            weight_sum[y:y + th, x:x + tw] += weight
        done += len(origins)
        if progress is not None:
            progress(done, total)
    (top, _), (left, _) = grid.padding
    canvas /= weight_sum
    return canvas[:, top:top + grid.height, left:left + grid.width].cpu().numpy()
