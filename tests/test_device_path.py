"""The device pipeline (emseg.infer.predictor: upload, normalise, rescale, pad, tile, blend, shift, argmax as
torch operations on the predictor's device) against a plain reference of the documented steps in numpy
and scipy, run here on the CPU: same probabilities (float tolerance) and the same labels, with and
without probabilities kept (two classes take a shortcut then: the sign of class 1's centred sum)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO
from scipy import ndimage as ndi

from emseg.infer.preprocess import rescale_factor, resize, scaled_shape
from emseg.infer.tiling import TileGrid, blend_weights
from emseg.io.read import array_source
from emseg.model.card import ModelCard
from emseg.model.modelfile import Model


def reference_probabilities(model: Model, page: np.ndarray, *, tile: int, overlap: int,
                            pixel_size_nm: float | None = None) -> np.ndarray:
    """The pipeline written out step by step in numpy (one tile at a time), float64 where it can."""
    card = model.card
    norm = card.normalization
    x = page.astype(np.float64)
    step = max(1, int(np.sqrt(page.size / 1_000_000)))
    lo, hi = np.percentile(x[::step, ::step], [norm.low, norm.high])
    x = (np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0, 1) - norm.mean) / norm.std
    factor = rescale_factor(pixel_size_nm, card.pixel_size_nm)
    if factor != 1.0:
        x = resize(torch.from_numpy(x.astype(np.float32)), scaled_shape(x.shape, factor)).numpy().astype(np.float64)
    grid = TileGrid(*x.shape, tile, overlap)
    padded = np.pad(x, grid.padding, mode="reflect")
    th, tw = grid.tile_shape
    weight = blend_weights(th, tw).astype(np.float64)
    total = np.zeros((card.num_classes, *grid.padded_shape))
    weights = np.zeros(grid.padded_shape)
    net = model.net.eval()
    for y0, x0 in grid.origins:
        tile_in = torch.from_numpy(padded[y0:y0 + th, x0:x0 + tw].astype(np.float32))[None, None]
        with torch.no_grad():
            probs = torch.softmax(net(tile_in), dim=1)[0].double().numpy()
        total[:, y0:y0 + th, x0:x0 + tw] += probs * weight
        weights[y0:y0 + th, x0:x0 + tw] += weight
    (top, _), (left, _) = grid.padding
    out = (total / weights)[:, top:top + grid.height, left:left + grid.width]
    if factor != 1.0:
        out = resize(torch.from_numpy(out.astype(np.float32)), page.shape).numpy().astype(np.float64)
    dy, dx = (o / factor for o in card.label_offset)
    if abs(dy) >= 0.05 or abs(dx) >= 0.05:
        out = np.stack([ndi.shift(p, (dy, dx), order=1, mode="nearest") for p in out])
    return out.astype(np.float32)


def model_with(classes: int, *, pixel_size_nm=None, label_offset=(0.0, 0.0), seed=0) -> Model:
    torch.manual_seed(seed)
    names = ("background", "membrane", "mitochondrion")[:classes]
    card = ModelCard(encoder="vgg11_bn_micro", classes=names, tile_size=64, overlap=16,
                     pixel_size_nm=pixel_size_nm, label_offset=label_offset,
                     follow_label_offset=any(label_offset))
    model = Model.new(card)
    # trained-like batch-norm statistics, so that folding them into the convolutions is exercised
    for m in model.net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def sample_page(index: int = 0) -> np.ndarray:
    return tifffile.imread(REPO / "data_samples" / "sample_stack.tif", key=index)


CASES = {
    "sample page": (lambda rng: sample_page(2)[:200, :230], {}),
    "odd size": (lambda rng: rng.integers(0, 65535, (157, 93), dtype=np.uint16), {}),
    "smaller than a tile": (lambda rng: rng.integers(0, 255, (21, 40), dtype=np.uint8), {}),
    "one pixel wide": (lambda rng: rng.random((70, 1), dtype=np.float32), {}),
    "rescaled up": (lambda rng: rng.integers(0, 4000, (90, 110), dtype=np.uint16), {"page_nm": 7.0}),
    "rescaled down": (lambda rng: rng.integers(0, 4000, (130, 120), dtype=np.int16), {"page_nm": 3.1}),
    "annotation offset": (lambda rng: rng.random((120, 100), dtype=np.float32), {"offset": (-0.63, 0.19)}),
    "offset and rescaled": (lambda rng: rng.random((100, 90), dtype=np.float32), {"offset": (0.4, -1.1),
                                                                                   "page_nm": 8.0}),
}


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_device_path_equals_the_reference(case, classes, rng):
    make, opts = CASES[case]
    page = make(rng)
    model = model_with(classes, pixel_size_nm=5.0 if "page_nm" in opts else None,
                       label_offset=opts.get("offset", (0.0, 0.0)))
    ref = reference_probabilities(model, page, tile=64, overlap=16, pixel_size_nm=opts.get("page_nm"))
    predictor = model.predictor(tile=64, overlap=16, batch_size=3, device="cpu")
    source = array_source(np.stack([page, page]), pixel_size_nm=opts.get("page_nm"))
    kept = list(predictor.iter_pages(source, keep_probabilities=True))
    plain = list(model.predictor(tile=64, overlap=16, batch_size=5, device="cpu").iter_pages(source))
    for result in kept:
        assert result.probabilities.shape == (classes, *page.shape)
        np.testing.assert_allclose(result.probabilities, ref, atol=2e-5)
        np.testing.assert_array_equal(result.labels, result.probabilities.argmax(0))
    decided = np.sort(ref, axis=0)
    clear = decided[-1] - decided[-2] > 1e-4  # pixels whose top two classes are not a float-rounding tie
    for result in plain:
        assert result.probabilities is None and result.labels.dtype == np.uint8
        np.testing.assert_array_equal(result.labels[clear], ref.argmax(0)[clear])
        np.testing.assert_array_equal(result.labels, kept[0].labels)


def test_labels_without_probabilities_skip_the_normalisation_for_two_classes(rng):
    """Two classes, no rescaling, no offset: labels come from the sign of class 1's centred sum."""
    model = model_with(2)
    page = rng.random((150, 170), dtype=np.float32)
    predictor = model.predictor(tile=64, overlap=16, device="cpu")
    labels = predictor.page_result(0, page).labels
    probs = predictor.predict_page(page)
    np.testing.assert_array_equal(labels, probs.argmax(0))
    assert predictor._local.workspace.canvas.channels == 1  # only class 1 is blended


def test_one_predictor_serves_several_threads(rng):
    """dask runs pages of one worker's predictor in threads: each thread has its own buffers."""
    model = model_with(3)
    predictor = model.predictor(tile=64, overlap=16, device="cpu")
    pages = [rng.random((130 + 7 * i, 150), dtype=np.float32) for i in range(6)]
    expected = [predictor.predict_page(p) for p in pages]
    results = [None] * len(pages)

    def work(i):
        for _ in range(3):
            results[i] = predictor.predict_page(pages[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_raw_dtypes_are_normalised_on_the_device_alike(rng):
    """uint8, uint16, int16, float32, float64, big-endian and boolean pages give the probabilities of
    their float64 values (the page is uploaded in its own dtype)."""
    model = model_with(3)
    predictor = model.predictor(tile=64, overlap=16, device="cpu")
    base = rng.integers(0, 200, (80, 90))
    want = predictor.predict_page(base.astype(np.float64))
    for dtype in (np.uint8, np.uint16, np.int16, np.float32, ">u2", "<f8"):
        np.testing.assert_allclose(predictor.predict_page(base.astype(dtype)), want, atol=1e-5)
    mask = base > 100
    np.testing.assert_allclose(predictor.predict_page(mask), predictor.predict_page(mask.astype(np.uint8)),
                               atol=1e-6)


def test_compiling_falls_back_to_eager_mode_when_it_fails(monkeypatch, rng, caplog):
    """torch.compile needs a compiler toolchain and supported operators; when it fails at the first
    call, the predictor says so once and runs the network as it is."""
    import logging

    def broken_compile(net, **_):
        def run(x):
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = model_with(2)
    page = rng.random((100, 90), dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="emseg.infer.predictor"):
        compiled = model.predictor(tile=64, overlap=16, device="cpu", compile=True).predict_page(page)
    assert caplog.text.count("torch.compile failed") == 1
    np.testing.assert_allclose(compiled, model.predictor(tile=64, overlap=16, device="cpu").predict_page(page),
                               atol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("classes", [2, 3])
def test_cuda_pipeline_equals_the_cpu_pipeline(classes, rng):
    """The raw uint16 page through pinned memory and the side stream, in fp32: the CPU's probabilities
    to float rounding; with the default bf16 autocast, the same labels but for rare near-ties."""
    model = model_with(classes, pixel_size_nm=5.0, label_offset=(0.3, -0.2))
    model.card = model.card.updated(follow_label_offset=True)
    stack = rng.integers(0, 65535, (3, 300, 260), dtype=np.uint16)
    source = array_source(stack, pixel_size_nm=6.5)
    cpu = list(model.predictor(tile=64, overlap=16, device="cpu").iter_pages(source, keep_probabilities=True))
    fp32 = list(model.predictor(tile=64, overlap=16, device="cuda", amp=False).iter_pages(source,
                                                                                         keep_probabilities=True))
    mixed = list(model.predictor(tile=64, overlap=16, device="cuda").iter_pages(source))
    for a, b, c in zip(cpu, fp32, mixed):
        assert a.index == b.index == c.index
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-4)
        assert (c.labels == a.labels).mean() > 0.99


@pytest.mark.gpu
@needs_cuda
def test_cuda_batch_size_auto_is_measured_once(rng):
    model = model_with(2)
    predictor = model.predictor(tile=64, overlap=16, device="cuda", batch_size="auto")
    predictor.predict_page(rng.random((500, 400), dtype=np.float32))
    chosen = predictor.batch_size
    assert 1 <= chosen <= 64 and not predictor._auto_batch
    predictor.predict_page(rng.random((500, 400), dtype=np.float32))
    assert predictor.batch_size == chosen


@pytest.mark.parametrize("classes,keep,page_nm,offset", [(2, False, None, (0.0, 0.0)), (2, True, None, (0.0, 0.0)),
                                                        (3, False, 7.0, (0.4, -0.3)), (3, True, None, (0.0, 0.0))])
def test_a_page_whose_canvas_does_not_fit_is_blended_in_bands(classes, keep, page_nm, offset, rng, caplog):
    """A page too large for the device's memory (forced here with a tiny limit) is blended one row of
    tiles at a time: the same probabilities and labels as the whole canvas."""
    import logging
    model = model_with(classes, pixel_size_nm=5.0 if page_nm else None, label_offset=offset)
    stack = rng.integers(0, 4000, (2, 230, 190), dtype=np.uint16)
    source = array_source(stack, pixel_size_nm=page_nm)
    whole = list(model.predictor(tile=64, overlap=16, batch_size=3, device="cpu").iter_pages(
        source, keep_probabilities=keep))
    with caplog.at_level(logging.INFO, logger="emseg.infer.predictor"):
        banded = list(model.predictor(tile=64, overlap=16, batch_size=3, device="cpu", max_canvas_bytes=1)
                      .iter_pages(source, keep_probabilities=keep))
    assert caplog.text.count("one row of tiles at a time") == 1
    for a, b in zip(whole, banded):
        if keep:
            np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-5)
        assert (a.labels == b.labels).mean() > 0.9999
