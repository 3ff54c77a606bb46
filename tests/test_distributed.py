"""Scaling out: dask.distributed runs (emseg.infer.distributed) and the Predictor's scaling paths
(out-of-memory recovery, automatic batch size, channels-last, page prefetch), tested on the CPU.

The CUDA code paths are exercised with fakes: a network that raises ``torch.cuda.OutOfMemoryError``
above a batch size, and mocked free-memory / per-tile measurements.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from emseg.errors import EmsegError, InputError
from emseg.infer.predictor import CPU_AUTO_BATCH, auto_batch_size, is_out_of_memory
from emseg.infer.runner import predict_file
from emseg.model.card import ModelCard
from emseg.model.modelfile import Model

# ------------------------------------------------------------------ Predictor: OOM and batch size

class OomNet(nn.Module):
    """Class 1 where the input is positive; raises CUDA's OOM error for batches above ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def forward(self, x):
        self.seen.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.cat([-x, x], dim=1) * 10


def oom_model(limit: int) -> Model:
    card = ModelCard(encoder="vgg11_bn_micro", classes=("background", "bright"), tile_size=64, overlap=16)
    return Model(OomNet(limit), card)


def test_out_of_memory_halves_the_batch_and_the_run_goes_on(rng, caplog):
    page = rng.random((300, 300), dtype=np.float32)  # 36 tiles of 64 px
    reference = oom_model(limit=100).predictor(batch_size=2).predict_page(page)
    model = oom_model(limit=2)
    predictor = model.predictor(batch_size=8)
    released = []
    predictor._release_memory = lambda: released.append(True)  # torch.cuda.empty_cache on CUDA
    with caplog.at_level(logging.WARNING, logger="emseg.infer.predictor"):
        probs = predictor.predict_page(page)
        probs_again = predictor.predict_page(page)
    np.testing.assert_allclose(probs, reference, atol=1e-6)
    np.testing.assert_allclose(probs, probs_again, atol=1e-6)  # tiles summed in another order: float rounding
    assert predictor.batch_size == 2 and len(released) == 2  # 8 -> 4 -> 2, kept for later pages
    assert "out of cpu memory with 8 tiles per batch; continuing with 4" in caplog.text
    assert max(model.net.seen[-10:]) == 2  # the second page ran at the lowered size from the start


def test_a_single_tile_that_does_not_fit_and_other_errors_are_raised():
    predictor = oom_model(limit=0).predictor(batch_size=4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        predictor.predict_page(np.ones((64, 64), np.float32))

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    card = ModelCard(encoder="vgg11_bn_micro", classes=("a", "b"), tile_size=64, overlap=0)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Model(Broken(), card).predictor(batch_size=4).predict_page(np.ones((64, 128), np.float32))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_automatic_batch_size_from_free_memory(rng, monkeypatch):
    assert auto_batch_size(10 * 2**30, 2**30) == 6  # 60 % of 10 GiB at 1 GiB per tile
    assert auto_batch_size(2**20, 2**30) == 1 and auto_batch_size(2**40, 2**20) == 64
    cpu = oom_model(limit=100).predictor(batch_size="auto")
    assert cpu.resolve_batch_size() == CPU_AUTO_BATCH  # no free-memory figure off CUDA
    model = oom_model(limit=100)
    predictor = model.predictor(batch_size="auto")
    probes, timed = [], []
    monkeypatch.setattr(predictor, "_free_memory", lambda: 1000 * 2**20)
    monkeypatch.setattr(predictor, "_bytes_per_tile", lambda: probes.append(1) or 50 * 2**20)
    # measured throughput grows up to 8 tiles per pass, then stays flat
    monkeypatch.setattr(predictor, "_tiles_per_second", lambda b: timed.append(b) or 100.0 * min(b, 8))
    predictor.predict_page(rng.random((400, 400), dtype=np.float32))
    predictor.predict_page(rng.random((400, 400), dtype=np.float32))
    from emseg.infer.predictor import _Workspace
    from emseg.infer.tiling import TileGrid
    cap = int(0.6 * (1000 * 2**20 - _Workspace.nbytes(TileGrid(400, 400, 64, 16), 1, 2)) / (50 * 2**20))
    assert cap == 11 and timed == [1, 2, 4, 8, cap]  # the powers of two that fit the free memory, and the most
    assert predictor.batch_size == 8 and len(probes) == 1  # the smallest at the best rate, measured once
    assert max(model.net.seen) == 8
    with pytest.raises(InputError, match="'auto'"):
        model.predictor(batch_size="big")


def test_automatic_batch_size_counts_the_page_buffers(monkeypatch):
    """A 16k x 16k page's canvas and padded input (~2 GiB for two classes) come off the free memory."""
    from emseg.infer.predictor import _Workspace
    from emseg.infer.tiling import TileGrid
    grid = TileGrid(16384, 16384, 512, 128)
    buffers = _Workspace.nbytes(grid, 1, 2)
    # 4 bytes x (input + class 1's blended probability) per pixel: two classes blend one channel, and the
    # summed weights are two vectors (they are separable)
    assert 2.0 * 2**30 < buffers < 2.2 * 2**30
    predictor = oom_model(limit=100).predictor(batch_size="auto")
    monkeypatch.setattr(predictor, "_free_memory", lambda: 6 * 2**30)
    monkeypatch.setattr(predictor, "_bytes_per_tile", lambda: 2**28)  # 256 MiB per tile
    monkeypatch.setattr(predictor, "_tiles_per_second", lambda b: 100.0 * b)
    assert predictor.resolve_batch_size(grid) == 9  # 0.6 * (6 GiB - buffers) fits 9 tiles, not 14


def test_folding_channels_last_and_prefetch_change_nothing_but_speed(tiny_model, rng):
    from emseg.io.read import array_source
    stack = rng.integers(0, 65535, (3, 70, 90), dtype=np.uint16)
    fast = [r.probabilities for r in tiny_model.predictor().iter_pages(array_source(stack), keep_probabilities=True)]
    plain = tiny_model.predictor(channels_last=False, fold_bn=False, prefetch=False)
    slow = [r.probabilities for r in plain.iter_pages(array_source(stack), keep_probabilities=True)]
    assert plain.net is tiny_model.net
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny_model.net.modules())  # folding worked on a copy
    np.testing.assert_allclose(np.stack(fast), np.stack(slow), atol=1e-5)
    np.testing.assert_array_equal(np.stack(fast).argmax(1), np.stack(slow).argmax(1))


def test_prefetch_reports_a_bad_page_in_order(tiny_model, rng):
    from emseg.errors import InputError
    from emseg.io.read import array_source
    stack = rng.random((3, 64, 64)).astype(np.float32)
    stack[2, 0, 0] = np.nan
    pages = tiny_model.predictor().iter_pages(array_source(stack, name="nanstack"))
    assert [next(pages).index, next(pages).index] == [0, 1]
    with pytest.raises(InputError, match="nanstack: page 3 of 3"):
        next(pages)


# ------------------------------------------------------------------ dask.distributed

distributed = pytest.importorskip("distributed")
pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    card = ModelCard(encoder="vgg11_bn_micro", classes=("background", "membrane", "mitochondrion"),
                     tile_size=64, overlap=16, pixel_size_nm=5.0)
    return Model.new(card)


@pytest.fixture(scope="module")
def thread_client():
    """Two in-process workers with one thread each: fast, exercises the whole protocol."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        yield client


def make_stack(path, pages=5, shape=(90, 70), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 65535, (pages, *shape), dtype=np.uint16)
    tifffile.imwrite(path, data, photometric="minisblack", resolution=(1e7 / 5.0, 1e7 / 5.0),
                     resolutionunit="CENTIMETER")
    return data


def single_process(model, path, outdir, probabilities=True):
    result = predict_file(model.predictor(), path, outdir, probabilities=probabilities, overwrite=True)
    return tifffile.imread(result.outputs.mask), tifffile.imread(result.outputs.probabilities)


def run(client, model, paths, outdir, **options):
    from emseg.infer.distributed import predict_files
    return list(predict_files(client, model, paths, outdir, **options))


def test_cluster_run_equals_the_single_process_run(thread_client, model, tmp_path):
    from emseg.infer.distributed import ModelPlugin
    make_stack(tmp_path / "a.tif")
    make_stack(tmp_path / "b.tif", pages=2, seed=1)
    builds = []
    original = ModelPlugin.predictor

    def counting(self):
        if self._predictor is None:
            builds.append(1)
        return original(self)

    ModelPlugin.predictor = counting
    try:
        outcomes = run(thread_client, model, [tmp_path / "a.tif", tmp_path / "b.tif"], tmp_path / "dist",
                       probabilities=True)
    finally:
        ModelPlugin.predictor = original
    assert [(p.name, o.status, o.pages) for p, o in outcomes] == [("a.tif", "written", 5), ("b.tif", "written", 2)]
    assert 1 <= len(builds) <= 2  # the network is built once per worker, not per page (7 pages)
    for name in ("a", "b"):
        mask, probs = single_process(model, tmp_path / f"{name}.tif", tmp_path / "single")
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "dist" / f"{name}_mask.tif"), mask)
        np.testing.assert_allclose(tifffile.imread(tmp_path / "dist" / f"{name}_probs.tif"), probs, atol=1e-6)
    with tifffile.TiffFile(tmp_path / "dist" / "a_mask.tif") as tif:
        assert tif.shaped_metadata[0]["pixel_size_nm"] == pytest.approx(5.0)
    assert (tmp_path / "dist" / "a_overlay.png").exists()
    assert not thread_client.run(lambda dask_worker: list(dask_worker.plugins)).get("emseg")  # unregistered
    assert not [p for p in (tmp_path / "dist").iterdir() if p.name.startswith(".")]


def test_zarr_output_skips_and_failures_keep_input_order(thread_client, model, tmp_path):
    data = make_stack(tmp_path / "a.tif", pages=3)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    make_stack(tmp_path / "c.tif", pages=1)
    paths = [tmp_path / "a.tif", tmp_path / "broken.tif", tmp_path / "gone.tif", tmp_path / "c.tif"]
    outcomes = run(thread_client, model, paths, tmp_path / "out", fmt="zarr", overlay=False, window=2)
    assert [p.name for p, _ in outcomes] == ["a.tif", "broken.tif", "gone.tif", "c.tif"]
    assert [type(o).__name__ for _, o in outcomes] == ["FileResult", "InputError", "InputError", "FileResult"]
    from emseg.io.read import open_image
    with open_image(tmp_path / "out" / "a_mask.zarr") as src:
        assert src.pixel_size_nm == pytest.approx(5.0)
        np.testing.assert_array_equal(np.stack(list(src)), model.predict(data, pixel_size_nm=5.0))
    again = run(thread_client, model, paths[:1], tmp_path / "out", fmt="zarr", overlay=False)
    assert again[0][1].status == "skipped"
    again = run(thread_client, model, paths[:1], tmp_path / "out", fmt="zarr")  # only the overlay is missing
    assert again[0][1].status == "completed" and (tmp_path / "out" / "a_overlay.png").exists()
    with pytest.raises(ValueError, match="'tif' or 'zarr'"):
        run(thread_client, model, paths[:1], tmp_path / "out", fmt="n5")


def test_a_page_that_fails_on_a_worker_fails_only_its_file(thread_client, model, tmp_path):
    make_stack(tmp_path / "good.tif", pages=2)
    bad = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    bad[1, 5, 5] = np.nan  # the header is fine; page 2 fails when a worker reads it
    tifffile.imwrite(tmp_path / "nan.tif", bad, photometric="minisblack")
    outcomes = run(thread_client, model, [tmp_path / "nan.tif", tmp_path / "good.tif"], tmp_path / "out")
    assert isinstance(outcomes[0][1], EmsegError) and "page 2 of 3" in str(outcomes[0][1])
    assert outcomes[1][1].status == "written"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_mask.tif", "good_overlay.png"]


def test_cli_options_and_the_local_cluster_command(tmp_path, model, monkeypatch):
    from emseg.cli import predict as cli_predict
    from emseg.infer import distributed as dist
    parser = argparse.ArgumentParser()
    cli_predict.add_cluster_arguments(parser.add_argument_group("cluster"))
    args = parser.parse_args(["--scheduler", "local", "--workers", "2"])
    assert (args.scheduler, args.workers) == ("local", 2)
    with pytest.raises(ValueError, match="at least 1"):
        dist.connect("local", workers=0)
    with pytest.raises(EmsegError, match="cannot reach the dask scheduler"):
        dist.connect("tcp://127.0.0.1:1", None, timeout="1s")
    # the command: a real (in-process) cluster behind connect(), the CLI's args namespace
    make_stack(tmp_path / "a.tif", pages=2)
    monkeypatch.setattr(cli_predict, "connect", lambda scheduler, workers: distributed.Client(
        distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0")))
    ns = argparse.Namespace(scheduler="local", workers=1, output=tmp_path / "out", tile=None, overlap=None,
                            batch_size=4, tta=False, device="cpu", pixel_size=None, probabilities=False,
                            no_overlay=True, overwrite=False, quiet=True, verbose=False, format="tif")
    assert cli_predict.cmd_predict_distributed(ns, [tmp_path / "a.tif"], model) == 0
    mask, _ = single_process(model, tmp_path / "a.tif", tmp_path / "single")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "a_mask.tif"), mask)
    assert cli_predict.cmd_predict_distributed(ns, [tmp_path / "gone.tif"], model, failed=1) == 1


@pytest.mark.slow
def test_worker_processes_one_killed_mid_run_lose_nothing(model, tmp_path):
    """Two worker processes; one is SIGKILLed after the first page is written. dask reruns its pages
    (on the survivor or on the worker its nanny restarts) and the outputs equal the single-process run."""
    make_stack(tmp_path / "s.tif", pages=8, shape=(128, 128))
    mask, probs = single_process(model, tmp_path / "s.tif", tmp_path / "single")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        before = client.run(os.getpid)
        victim = next(iter(before.values()))
        killed = []

        def kill_after_first_page(path, page, pages):
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(page)

        outcomes = run(client, model, [tmp_path / "s.tif"], tmp_path / "dist", probabilities=True,
                       progress=kill_after_first_page, window=4)
        assert killed == [0] and outcomes[0][1].status == "written" and outcomes[0][1].pages == 8
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "dist" / "s_mask.tif"), mask)
        np.testing.assert_allclose(tifffile.imread(tmp_path / "dist" / "s_probs.tif"), probs, atol=1e-5)
        client.wait_for_workers(2, timeout=60)
        assert victim not in client.run(os.getpid).values()  # the nanny replaced the dead worker
