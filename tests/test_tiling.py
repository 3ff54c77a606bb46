import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emseg.errors import InputError
from emseg.infer.tiling import TileCanvas, TileGrid, axis_layout, blend_weights, sliding_window, tile_starts


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
    # float32 sums of up to (tile / stride)^2 weighted tiles, then one division
    np.testing.assert_allclose(out, page, rtol=0, atol=1e-5)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 3000), tile=st.sampled_from([32, 64, 256, 512]), overlap_frac=st.floats(0, 0.99))
def test_axis_layout_covers_everything_at_one_stride_with_the_overlap(length, tile, overlap_frac):
    overlap = int(overlap_frac * tile)
    count, stride, extent = axis_layout(length, tile, overlap)
    starts = tile_starts(length, tile, overlap)
    assert len(starts) == count and starts[0] == 0 and starts[-1] + tile == extent >= length
    if count > 1:
        assert {b - a for a, b in zip(starts, starts[1:])} == {stride}  # one constant stride
        assert 0 < stride <= tile - overlap  # neighbours share at least the overlap
        assert extent - length < count - 1  # little more than the page
        assert (count - 2) * (tile - overlap) + tile < length  # one tile fewer would not do
    else:
        assert length <= tile


def test_grid_mirrors_at_least_half_the_overlap_and_fits_small_pages():
    grid = TileGrid(100, 40, tile=512, overlap=64)
    assert grid.margin == 32
    assert grid.tile_shape == (192, 128)  # page + margins rounded up to 32, not a whole 512 tile
    assert grid.padded_shape == (192, 128)
    assert len(grid) == 1
    big = TileGrid(1000, 1000, tile=256, overlap=64)
    assert big.padded_shape[0] >= 1064 and big.strides[0] <= 192
    assert all(y + 256 <= big.padded_shape[0] and x + 256 <= big.padded_shape[1] for y, x in big.origins)
    (top, bottom), (left, right) = big.padding
    assert min(top, bottom, left, right) >= 32


@pytest.mark.parametrize("shape,tile,overlap", [((100, 40), 512, 0), ((33, 70), 64, 0), ((1000, 700), 256, 64),
                                                ((5, 5), 32, 8)])
def test_pages_sit_in_the_centre_of_their_padding(shape, tile, overlap):
    """Every page edge gets the same mirrored context (MONAI centres small pages too)."""
    (top, bottom), (left, right) = TileGrid(*shape, tile, overlap).padding
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1
    if shape == (100, 40):
        assert (top, bottom, left, right) == (14, 14, 12, 12)  # not all the padding at the bottom/right


@pytest.mark.parametrize("call", [
    lambda: sliding_window(np.zeros((1, 8, 8), np.float32), identity, tile=32, batch_size=-1),
    lambda: sliding_window(np.zeros((1, 8, 8), np.float32), identity, tile=32, batch_size=0),
    lambda: sliding_window(np.zeros((1, 8, 8), np.float32), identity, tile=32, batch_size=2.0),
    lambda: TileGrid(10, 10, tile=100, overlap=0),
    lambda: TileGrid(10, 10, tile=0, overlap=0),
    lambda: TileGrid(10, 10, tile=64.0, overlap=0),
    lambda: TileGrid(10, 10, tile=64, overlap=64),
    lambda: TileGrid(10, 10, tile=64, overlap=-1),
    lambda: TileGrid(10, 10, tile=64, overlap=8.5),
    lambda: TileGrid(0, 10, tile=64, overlap=8),
])
def test_invalid_tiling_gets_one_clear_input_error(call):
    with pytest.raises(InputError, match="tile|overlap|batch size|empty page"):
        call()


def test_blend_weights_peak_in_the_centre_and_fall_to_the_edges_unfloored():
    w = blend_weights(64, 96)
    assert w.shape == (64, 96)
    assert w.min() > 0
    assert w[32, 48] == pytest.approx(w.max(), rel=1e-3)
    assert w[0, 0] < w[32, 0] < w[32, 48]
    assert w[32, 0] < 1e-3 and w[0, 0] < 1e-6  # no floor: an edge pixel weighs little against a centre one


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


# ------------------------------------------------------------------ oracle networks (peer-style checks)

def _conv_net(layers: int, seed: int = 0) -> torch.nn.Module:
    """A seeded stack of 3x3 convolutions (zero padding, as a U-Net's): receptive radius ``layers``."""
    torch.manual_seed(seed)
    mods, channels = [], 1
    for i in range(layers):
        out = 2 if i == layers - 1 else 6
        mods += [torch.nn.Conv2d(channels, out, 3, padding=1)] + ([torch.nn.Tanh()] if i < layers - 1 else [])
        channels = out
    return torch.nn.Sequential(*mods).eval()


def _whole_page(net, page: np.ndarray, overlap: int) -> np.ndarray:
    """The network on the whole page, mirror-padded by half the overlap as the tiler pads it."""
    m = overlap // 2
    x = torch.from_numpy(np.pad(page, ((0, 0), (m, m), (m, m)), mode="reflect"))[None]
    with torch.no_grad():
        y = net(x)[0].numpy()
    return y[:, m:m + page.shape[1], m:m + page.shape[2]]


SEAM_CASES = [((512, 245), 512, 64), ((161, 130), 64, 8), ((400, 380), 128, 16), ((300, 300), 64, 6),
              ((1000, 900), 512, 128), ((257, 513), 128, 32), ((100, 100), 64, 6), ((64, 64), 32, 6),
              ((97, 300), 96, 30), ((700, 333), 256, 12)]


@pytest.mark.parametrize("shape,tile,overlap", SEAM_CASES)
def test_stitched_conv_net_matches_the_whole_page_within_2_5_percent(shape, tile, overlap):
    """Overlap >= 2x the receptive radius (3): every pixel is dominated by the tile that sees it with
    context, page borders included (a floored Gaussian gave errors of up to 31 % there)."""
    net = _conv_net(3)
    page = np.random.default_rng(shape[0]).random((1, *shape), dtype=np.float32)
    with torch.no_grad():
        tiled = sliding_window(page, net, tile=tile, overlap=overlap, batch_size=3)
    whole = _whole_page(net, page, overlap)
    error = np.abs(tiled - whole).max() / (whole.max() - whole.min())
    assert error < 0.025, f"{100 * error:.2f} % of the output range"


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 200), width=st.integers(1, 200), tile=st.sampled_from([32, 64, 128]),
       overlap_frac=st.floats(0, 0.9), batch=st.integers(1, 7))
def test_pointwise_network_is_exact_at_every_overlap(height, width, tile, overlap_frac, batch):
    """A network without spatial context (1x1 convolutions) gives the whole page's output exactly,
    at every overlap from 0 up, whatever the padding and the batch boundaries."""
    overlap = int(overlap_frac * tile)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.Tanh(), torch.nn.Conv2d(4, 3, 1)).eval()
    page = np.random.default_rng(height + 7 * width).random((1, height, width), dtype=np.float32)
    with torch.no_grad():
        tiled = sliding_window(page, net, tile=tile, overlap=overlap, batch_size=batch)
        whole = net(torch.from_numpy(page)[None])[0].numpy()
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=2e-5)


def test_a_network_that_drops_tiles_raises_instead_of_leaving_nan():
    def drops_one(batch):
        return batch[:-1].clone() if len(batch) > 1 else batch.clone()
    with pytest.raises(RuntimeError, match="tiles for a batch of"):
        sliding_window(np.zeros((1, 200, 200), np.float32), drops_one, tile=64, overlap=16, batch_size=4)


def test_a_network_that_changes_the_tile_size_raises():
    def shrinks(batch):
        return batch[:, :, 1:, 1:].clone()
    with pytest.raises(RuntimeError, match="shape"):
        sliding_window(np.zeros((1, 100, 100), np.float32), shrinks, tile=64, overlap=16)


def test_absurd_tile_counts_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="emseg.infer.tiling"):
        TileGrid(2000, 2000, tile=64, overlap=63).check_size()
    assert "tiles of 64 x 64" in caplog.text and "overlap of a quarter" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emseg.infer.tiling"):
        TileGrid(2000, 2000, tile=512, overlap=128).check_size()
    assert caplog.text == ""


def test_canvas_is_reused_across_pages():
    grid = TileGrid(150, 170, 64, 16)
    canvas = TileCanvas(grid, 1, "cpu")
    padded = grid.pad(torch.ones((1, 150, 170)))
    for value in (1.0, 3.0):
        canvas.reset()
        for first, count in grid.batches(5):
            canvas.add(first, grid.gather(padded, first, count) * value)
        np.testing.assert_allclose(canvas.blended().numpy(), value, atol=1e-5)
