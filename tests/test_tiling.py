import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emseg.tiling import TileGrid, blend_weights, sliding_window, tile_starts


def identity(batch: torch.Tensor) -> torch.Tensor:
    return batch.clone()


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300),
       tile=st.sampled_from([32, 64, 96, 128]), overlap_frac=st.floats(0, 0.9),
       channels=st.integers(1, 3), batch=st.integers(1, 5))
def test_identity_stitching_returns_the_input(height, width, tile, overlap_frac, channels, batch):
    overlap = int(overlap_frac * tile)
    page = np.random.default_rng(height * 1000 + width).random((channels, height, width), dtype=np.float32)
    out = sliding_window(page, identity, tile=tile, overlap=overlap, batch_size=batch)
    assert out.shape == page.shape
    np.testing.assert_allclose(out, page, rtol=0, atol=2e-6)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(32, 2000), tile=st.sampled_from([32, 64, 256, 512]), overlap_frac=st.floats(0, 0.95))
def test_tile_starts_cover_everything_with_the_overlap(length, tile, overlap_frac):
    if length < tile:
        return
    overlap = int(overlap_frac * tile)
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    for a, b in zip(starts, starts[1:]):
        assert 0 < b - a <= tile - overlap


def test_grid_mirrors_half_the_overlap_and_fits_small_pages():
    grid = TileGrid(100, 40, tile=512, overlap=64)
    assert grid.margin == 32
    assert grid.tile_shape == (192, 128)  # page + margins rounded up to 32, not a whole 512 tile
    assert grid.padded_shape == (192, 128)
    assert len(grid) == 1
    big = TileGrid(1000, 1000, tile=256, overlap=64)
    assert big.padded_shape == (1064, 1064)
    assert all(y + 256 <= 1064 and x + 256 <= 1064 for y, x in big.origins)


def test_invalid_tiles_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        TileGrid(10, 10, tile=100, overlap=0)
    with pytest.raises(ValueError, match="overlap"):
        TileGrid(10, 10, tile=64, overlap=64)


def test_blend_weights_peak_in_the_centre_and_stay_positive():
    w = blend_weights(64, 96)
    assert w.shape == (64, 96)
    assert w.min() > 0
    assert w[32, 48] == pytest.approx(w.max(), rel=1e-3)
    assert w[0, 0] < w[32, 0] < w[32, 48]


def test_position_dependent_model_leaves_no_seam():
    """A 'model' that sees tile edges (values drop towards the tile border) must still blend smoothly."""
    def vignette(batch):
        h, w = batch.shape[-2:]
        yy = torch.linspace(-1, 1, h)[:, None]
        xx = torch.linspace(-1, 1, w)[None, :]
        return batch * (1 - 0.2 * (yy ** 2 + xx ** 2))
    page = np.ones((1, 300, 300), np.float32)
    out = sliding_window(page, vignette, tile=128, overlap=64)[0]
    # no step between neighbouring pixels anywhere (a seam would be a jump)
    assert np.abs(np.diff(out, axis=0)).max() < 0.02
    assert np.abs(np.diff(out, axis=1)).max() < 0.02
