"""Ortho-plane inference (emseg.infer.volume): geometry, halos, resampling and combining, checked with oracle
"predictors" whose answers are known exactly, and with a tiny real model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage as ndi

from emseg.errors import InputError
from emseg.infer.volume import (
    OrthoPlanes,
    Slab,
    check_volume,
    parse_voxel_size,
    plan_slabs,
    predict_volume,
    slab_thickness,
)


class _Card:
    def __init__(self, num_classes=2, pixel_size_nm=None):
        self.num_classes, self.pixel_size_nm = num_classes, pixel_size_nm


class PointwiseOracle:
    """p(class 1) = intensity / 255: every direction gives the same answer for the same voxel."""

    overlap = 16

    def __init__(self, pixel_size_nm=None):
        self.card = _Card(2, pixel_size_nm)
        self.calls = []

    def predict_page(self, page, *, pixel_size_nm=None, progress=None):
        self.calls.append((page.shape, pixel_size_nm))
        p1 = np.clip(np.asarray(page, np.float32) / 255.0, 0, 1)
        if progress is not None:
            progress(1, 1)
        return np.stack([1 - p1, p1])


class RowContextOracle(PointwiseOracle):
    """p(class 1) from a running mean over +-``reach`` rows (mirrored at the plane's edge), so a slab's
    xz/yz planes give the whole volume's answer exactly where the halo covers ``reach`` rows."""

    def __init__(self, reach):
        super().__init__()
        self.reach = reach

    def predict_page(self, page, *, pixel_size_nm=None, progress=None):
        mean = ndi.uniform_filter1d(np.asarray(page, np.float64), 2 * self.reach + 1, axis=0, mode="reflect")
        p1 = np.clip(mean / 255.0, 0, 1).astype(np.float32)
        return np.stack([1 - p1, p1])


def _volume(shape=(20, 24, 28), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_parse_voxel_size():
    assert parse_voxel_size("8,5,5") == (8.0, 5.0, 5.0)
    assert parse_voxel_size("5") == (5.0, 5.0, 5.0)
    assert parse_voxel_size("10x4x4") == (10.0, 4.0, 4.0)
    for bad in ("5,5", "a,b,c", "5,-1,5", "0"):
        with pytest.raises(ValueError, match="three positive numbers"):
            parse_voxel_size(bad)


def test_bad_input_gets_one_clear_line(caplog):
    cases = [((64, 64), (5, 5, 5), "2D image"), ((1, 64, 64), (5, 5, 5), "one slice"),
             ((8, 64, 64), None, "--voxel-size"), ((8, 64, 64), (50, 4, 4), "12.5x anisotropic")]
    for shape, voxel, words in cases:
        with pytest.raises(InputError, match=words) as err:
            check_volume(shape, voxel, "stack.tif")
        assert "\n" not in str(err.value) and str(err.value).startswith("stack.tif: ")
    with caplog.at_level(logging.WARNING, logger="emseg.infer.volume"):
        assert check_volume((8, 64, 64), (15, 5, 5), "sbf.tif") == (15.0, 5.0, 5.0)
    assert "3.0x anisotropic" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emseg.infer.volume"):
        check_volume((4, 64, 64), (5, 5, 5), "thin.tif")
        assert "4 slices make xz/yz planes only 4 px tall" in caplog.text
        caplog.clear()
        check_volume((100, 64, 64), (5, 5, 5), "thick.tif")
    assert caplog.text == ""


def test_plan_slabs_cover_every_page_once_with_clipped_halos():
    for depth, thickness, halo in [(10, 3, 2), (100, 7, 5), (5, 10, 4), (9, 1, 0)]:
        slabs = plan_slabs(depth, thickness, halo)
        assert [s.start for s in slabs][0] == 0 and slabs[-1].stop == depth
        assert all(a.stop == b.start for a, b in zip(slabs, slabs[1:]))
        assert all(s.stop - s.start <= thickness for s in slabs)
        for s in slabs:
            assert s.lo == max(0, s.start - (halo if len(slabs) > 1 else 0))
            assert s.hi == min(depth, s.stop + (halo if len(slabs) > 1 else 0))
    assert plan_slabs(5, 10, 4) == [Slab(0, 5, 0, 5)]  # fits: one slab, no halo


def test_slab_thickness_follows_the_memory_budget():
    shape = (512, 512, 512)
    whole = slab_thickness(shape, 1, 2, halo=16, vote=False, memory_mb=4096)
    assert whole == 512
    small = slab_thickness(shape, 1, 2, halo=16, vote=False, memory_mb=256)
    per_page = 512 * 512 * (1 + 2 * 4)
    assert small == (256 * 2**20 - 32 * 512 * 512) // per_page
    assert slab_thickness(shape, 1, 2, halo=16, vote=True, memory_mb=256) < small
    assert slab_thickness(shape, 1, 2, halo=16, vote=False, memory_mb=0.001) == 1


@pytest.mark.parametrize("memory_mb", [1000, 0.05])
def test_pointwise_oracle_gives_the_voxels_own_answer_in_every_direction(memory_mb):
    volume = _volume()
    oracle = PointwiseOracle()
    labels, probs = predict_volume(oracle, volume, voxel_size_nm=(5, 5, 5), memory_mb=memory_mb,
                                   return_probabilities=True)
    np.testing.assert_array_equal(labels, (volume / 255.0 > 0.5).astype(np.uint8))
    np.testing.assert_allclose(probs[:, 1], volume / 255.0, atol=1e-6)
    assert probs.shape == (20, 2, 24, 28)
    z, y, x = volume.shape
    shapes = {shape for shape, _ in oracle.calls}
    if memory_mb == 1000:  # one slab: every xz/yz plane spans all pages
        assert shapes == {(y, x), (z, x), (z, y)}
        assert len(oracle.calls) == z + y + x


def test_halo_makes_slabs_agree_with_the_whole_volume():
    volume = _volume((30, 20, 22), seed=1)
    whole = OrthoPlanes(RowContextOracle(3), (5, 5, 5), memory_mb=1000)
    ref = predict_volume(whole.predictor, volume, voxel_size_nm=(5, 5, 5), return_probabilities=True)[1]
    engine = OrthoPlanes(RowContextOracle(3), (5, 5, 5), memory_mb=0.02, halo=3)
    slabs = engine.plan(volume.shape, 1)
    assert len(slabs) > 2
    for slab in slabs:
        got = engine.predict_slab(volume[slab.lo:slab.hi], slab, keep_probabilities=True).probabilities
        np.testing.assert_allclose(got.transpose(1, 0, 2, 3), ref[slab.start:slab.stop], atol=1e-5)
    # without the halo the slab edges see mirrored context instead of the neighbouring pages
    bare = OrthoPlanes(RowContextOracle(3), (5, 5, 5), memory_mb=0.02, halo=0)
    slab = bare.plan(volume.shape, 1)[1]
    got = bare.predict_slab(volume[slab.lo:slab.hi], slab, keep_probabilities=True).probabilities
    assert np.abs(got.transpose(1, 0, 2, 3) - ref[slab.start:slab.stop]).max() > 0.01


def test_anisotropic_planes_are_made_square_before_the_model_and_mapped_back():
    volume = np.repeat(_volume((10, 16, 18), seed=2), 1, axis=0)
    oracle = PointwiseOracle(pixel_size_nm=4.0)
    engine = OrthoPlanes(oracle, (10, 4, 4), memory_mb=1000)
    result = next(engine.iter_slabs(lambda lo, hi: volume[lo:hi], volume.shape, volume.dtype,
                                    keep_probabilities=True))
    shapes = {shape for shape, px in oracle.calls}
    assert (25, 18) in shapes and (25, 16) in shapes  # 10 pages at 10 nm -> 25 rows at 4 nm
    assert {px for _, px in oracle.calls} == {4.0}
    assert result.probabilities.shape == (2, 10, 16, 18)
    # linear resampling there and back keeps a z-constant volume exactly
    flat = np.repeat(volume[:1], 10, axis=0)
    labels, probs = predict_volume(PointwiseOracle(4.0), flat, voxel_size_nm=(10, 4, 4), return_probabilities=True)
    np.testing.assert_allclose(probs[:, 1], flat / 255.0, atol=1e-5)


def test_vote_keeps_what_two_directions_agree_on_while_the_mean_may_not():
    answers = {"xy": (0.0, 0.55, 0.45), "xz": (0.0, 0.55, 0.45), "yz": (0.0, 0.0, 1.0)}

    class ByDirection(OrthoPlanes):
        def predict_plane(self, plane, direction, progress=None):
            return np.broadcast_to(np.asarray(answers[direction], np.float32)[:, None, None],
                                   (3, *plane.shape)).copy()

    oracle = PointwiseOracle()
    oracle.card = _Card(3)
    volume = _volume((6, 8, 8))
    slab = Slab(0, 6, 0, 6)
    mean = ByDirection(oracle, (5, 5, 5), combine="mean").predict_slab(volume, slab)
    vote = ByDirection(oracle, (5, 5, 5), combine="vote").predict_slab(volume, slab, keep_probabilities=True)
    assert (mean.labels == 2).all()  # mean (0, 0.37, 0.63)
    assert (vote.labels == 1).all()  # two of three directions pick class 1
    np.testing.assert_allclose(vote.probabilities[:, 0, 0, 0], (0.0, 1.1 / 3, 1.9 / 3), atol=1e-6)
    answers["xz"] = (0.2, 0.3, 0.5)
    answers["xy"] = (0.6, 0.3, 0.1)
    answers["yz"] = (0.0, 0.9, 0.1)  # no majority: the mean decides (0.27, 0.5, 0.23)
    assert (ByDirection(oracle, (5, 5, 5), combine="vote").predict_slab(volume, slab).labels == 1).all()


def test_progress_reaches_the_total_and_a_raising_callback_stops():
    volume = _volume((8, 12, 12))
    seen = []
    predict_volume(PointwiseOracle(), volume, voxel_size_nm=(5, 5, 5), memory_mb=0.005,
                   progress=lambda done, total, text: seen.append((done, total, text)))
    assert seen[-1][0] == pytest.approx(seen[-1][1])
    assert all(a[0] <= b[0] + 1e-12 for a, b in zip(seen, seen[1:]))
    assert any("yz plane" in t for _, _, t in seen) and any(t.startswith("slab 1/") for _, _, t in seen)

    class Stop(Exception):
        pass

    def stop(done, total, text):
        if done > total / 3:
            raise Stop()

    with pytest.raises(Stop):
        predict_volume(PointwiseOracle(), volume, voxel_size_nm=(5, 5, 5), progress=stop)


def test_xy_direction_alone_is_the_page_by_page_prediction(tiny_model):
    volume = _volume((3, 40, 48))
    predictor = tiny_model.predictor(tile=64, overlap=16, device="cpu")
    labels, probs = predict_volume(predictor, volume, voxel_size_nm=(6, 6, 6), directions=("xy",),
                                   return_probabilities=True)
    ref_labels, ref_probs = tiny_model.predict(volume, tile=64, overlap=16, device="cpu", return_probabilities=True)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-6)


def test_real_model_ortho_runs_in_slabs(tiny_model):
    volume = _volume((12, 40, 36))
    predictor = tiny_model.predictor(tile=64, overlap=16, device="cpu")
    labels, probs = predict_volume(predictor, volume, voxel_size_nm=(6, 6, 6), return_probabilities=True,
                                   memory_mb=0.05, combine="vote")
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert probs.shape == (12, 3, 40, 36)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
