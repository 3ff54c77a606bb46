import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

from emseg.errors import InputError
from emseg.infer.predictor import resolve_device
from emseg.infer.tiling import TileGrid
from emseg.model.card import ModelCard
from emseg.model.modelfile import Model

# Measured with the bundled default model on sample pages 0, 3, 7 (see docs/inference.md):
# mean |diff| 0.0004-0.0006, 99.9th percentile 0.04-0.09, labels agree on 99.91-99.96 % of pixels.
TILED_MEAN, TILED_P999, TILED_AGREE = 0.002, 0.15, 0.998


class SignNet(nn.Module):
    """Class 1 where the normalised input is above its mean; records the tile shapes it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return torch.cat([-x, x], dim=1) * 10


def sign_model(pixel_size_nm=None, tile=64, overlap=16):
    card = ModelCard(encoder="vgg11_bn_micro", classes=("background", "bright"), tile_size=tile,
                     overlap=overlap, pixel_size_nm=pixel_size_nm)
    return Model(SignNet(), card)


def test_2d_and_3d_inputs_give_labels_of_the_same_shape(tiny_model, rng):
    page = rng.random((70, 90), dtype=np.float32)
    labels = tiny_model.predict(page)
    assert labels.shape == (70, 90) and labels.dtype == np.uint8
    stack = rng.integers(0, 65535, (3, 50, 40), dtype=np.uint16)
    labels, probs = tiny_model.predict(stack, return_probabilities=True)
    assert labels.shape == (3, 50, 40)
    assert probs.shape == (3, 3, 50, 40) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))


def test_dask_input(tiny_model, rng):
    da = pytest.importorskip("dask.array")
    stack = rng.random((2, 64, 64), dtype=np.float32)
    np.testing.assert_array_equal(tiny_model.predict(da.from_array(stack, chunks=(1, 64, 64))),
                                  tiny_model.predict(stack))


def _tile_edges(shape, tile, overlap, width=8):
    """Pixels within ``width`` of the edge of any tile (in page coordinates)."""
    grid = TileGrid(*shape, tile, overlap)
    (top, _), (left, _) = grid.padding
    th, tw = grid.tile_shape
    edges = np.zeros(shape, bool)
    for y, x in grid.origins:
        for yy in (y - top, y - top + th):
            edges[max(0, yy - width):max(0, yy + width), max(0, x - left):max(0, x - left + tw)] = True
        for xx in (x - left, x - left + tw):
            edges[max(0, y - top):max(0, y - top + th), max(0, xx - width):max(0, xx + width)] = True
    return edges


@pytest.mark.parametrize("page_index", [0, 3])
def test_tiled_output_matches_a_whole_image_pass(page_index):
    """The seamless-tiling claim on the trained default model and the sample stack, tile borders included."""
    import tifffile

    from emseg.model.modelfile import default_model_path, load_model
    if not default_model_path().exists():
        pytest.skip("the bundled default model is not built yet (data_samples/train_default.py)")
    model = load_model(default_model_path())
    page = tifffile.imread(REPO / "data_samples" / "sample_stack.tif", key=page_index)
    _, tiled = model.predict(page, tile=384, overlap=128, return_probabilities=True)
    _, whole = model.predict(page, tile=768, overlap=128, return_probabilities=True)  # one tile
    diff = np.abs(tiled - whole)
    edges = _tile_edges(page.shape, 384, 128)
    assert edges.mean() > 0.05  # the border pixels are a real sample
    for region in (np.ones(page.shape, bool), edges):
        d = diff[:, region]
        assert d.mean() < TILED_MEAN
        assert np.percentile(d, 99.9) < TILED_P999
        assert (tiled.argmax(0)[region] == whole.argmax(0)[region]).mean() > TILED_AGREE


def test_tta_is_equivariant_to_rotations_and_flips(tiny_model, rng):
    page = rng.random((64, 64), dtype=np.float32)
    predictor = tiny_model.predictor(tile=64, overlap=0, tta=True)
    base = predictor.predict_page(page)
    for k in (1, 2, 3):
        rotated = predictor.predict_page(np.rot90(page, k).copy())
        np.testing.assert_allclose(rotated, np.rot90(base, k, axes=(1, 2)), atol=1e-5)
    flipped = predictor.predict_page(page[:, ::-1].copy())
    np.testing.assert_allclose(flipped, base[:, :, ::-1], atol=1e-5)
    plain = tiny_model.predictor(tile=64, overlap=0).predict_page(page)
    assert not np.allclose(plain, base, atol=1e-4), "TTA should change a random network's output"


def test_image_is_rescaled_to_the_models_pixel_size_and_back(rng):
    model = sign_model(pixel_size_nm=4.0, tile=256, overlap=0)
    page = np.zeros((60, 80), np.float32)
    page[:, 40:] = 1.0
    labels = model.predict(page, pixel_size_nm=8.0)  # twice the model's pixel size: zoom 2x
    assert labels.shape == (60, 80)
    assert model.net.seen[-1][2:] == (128, 160)  # 120x160 rounded up to 32
    assert (labels[:, :38] == 0).all() and (labels[:, 42:] == 1).all()
    model.net.seen.clear()
    model.predict(page, pixel_size_nm=4.02)  # within 2 %: no resampling
    assert model.net.seen[-1][2:] == (64, 96)


def test_unknown_pixel_size_means_no_rescaling(rng):
    model = sign_model(pixel_size_nm=4.0, tile=256, overlap=0)
    model.predict(np.zeros((60, 80), np.float32))
    assert model.net.seen[-1][2:] == (64, 96)


def test_batches_hold_several_tiles(rng):
    model = sign_model(tile=64, overlap=32)
    model.predict(rng.random((200, 200), dtype=np.float32), batch_size=5)
    assert max(shape[0] for shape in model.net.seen) == 5


def test_invalid_options_are_explained(tiny_model):
    with pytest.raises(InputError, match="multiple of 32"):
        tiny_model.predictor(tile=100)
    for tile in (0, -512, 64.0):  # 0 is not "the card's tile": that is None
        with pytest.raises(InputError, match="multiple of 32"):
            tiny_model.predictor(tile=tile)
    with pytest.raises(InputError, match="overlap"):
        tiny_model.predictor(tile=64, overlap=64)
    with pytest.raises(InputError, match="batch size"):
        tiny_model.predictor(batch_size=0)
    for device in ("bogus", "cuda:x", "tpu"):
        with pytest.raises(InputError, match="device"):
            tiny_model.predictor(device=device)


def test_auto_device_without_gpu_is_the_cpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(InputError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_prediction_matches_cpu(tiny_model, rng):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible to torch")
    page = rng.random((128, 128), dtype=np.float32)
    _, cpu = tiny_model.predict(page, device="cpu", return_probabilities=True)
    _, gpu = tiny_model.predict(page, device="cuda", return_probabilities=True)
    assert np.abs(cpu - gpu).max() < 0.02  # mixed precision on CUDA
