"""Tests of the synthetic EM stack generator and of the sample files made with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from emseg.synthetic import BACKGROUND, CLASS_NAMES, MEMBRANE, MITOCHONDRION, make_em_stack

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture(scope="module")
def stack() -> tuple[np.ndarray, np.ndarray]:
    """A small stack shared by the tests that only look at it."""
    return make_em_stack(4, 256, 256, seed=0)


def test_class_names() -> None:
    assert CLASS_NAMES == ("background", "membrane", "mitochondrion")
    assert (BACKGROUND, MEMBRANE, MITOCHONDRION) == (0, 1, 2)


def test_shapes_and_dtypes(stack: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = stack
    assert image.shape == mask.shape == (4, 256, 256)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1, 2}
    assert image.std() > 20  # real contrast, not a flat image


def test_same_seed_same_arrays_other_seed_other_arrays() -> None:
    first = make_em_stack(2, 96, 80, seed=7)
    again = make_em_stack(2, 96, 80, seed=7)
    other = make_em_stack(2, 96, 80, seed=8)
    assert first[0].shape == (2, 96, 80)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_fractions_are_plausible(seed: int) -> None:
    _, mask = make_em_stack(2, 256, 256, seed=seed)
    fraction = np.bincount(mask.ravel(), minlength=3) / mask.size
    assert 0.05 <= fraction[MEMBRANE] <= 0.25, fraction
    assert 0.02 <= fraction[MITOCHONDRION] <= 0.20, fraction


def test_membranes_and_mitochondria_are_darker_than_cytoplasm(
        stack: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = stack
    cytoplasm = image[mask == BACKGROUND].mean()
    assert image[mask == MEMBRANE].mean() < cytoplasm - 30
    assert image[mask == MITOCHONDRION].mean() < cytoplasm - 10


def test_consecutive_pages_are_similar_but_not_identical(
        stack: tuple[np.ndarray, np.ndarray]) -> None:
    _, mask = stack
    for p in range(mask.shape[0] - 1):
        a, b = mask[p] > 0, mask[p + 1] > 0
        iou = (a & b).sum() / (a | b).sum()
        assert 0.4 < iou < 1.0, (p, iou)  # thin membranes: ISBI 2012 gives about 0.7
        assert (mask[p] == mask[p + 1]).mean() > 0.85


def test_pixel_size_scales_the_tissue() -> None:
    _, fine = make_em_stack(1, 128, 128, seed=3, pixel_size_nm=3.0)
    _, coarse = make_em_stack(1, 128, 128, seed=3, pixel_size_nm=12.0)
    # at a finer pixel the same membranes are wider in pixels, and there are fewer of them
    assert (fine == MEMBRANE).mean() < (coarse == MEMBRANE).mean()


@pytest.mark.parametrize("args", [(0, 64, 64), (1, 8, 64), (1, 64, 8)])
def test_rejects_unusable_sizes(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        make_em_stack(*args)
    with pytest.raises(ValueError):
        make_em_stack(1, 64, 64, pixel_size_nm=0.0)


def test_sample_files_equal_the_generator() -> None:
    image, mask = make_em_stack(8, 512, 512, seed=0, pixel_size_nm=6.0)
    stored_image = tifffile.imread(SAMPLES / "sample_stack.tif")
    stored_mask = tifffile.imread(SAMPLES / "sample_masks.tif")
    assert stored_image.dtype == stored_mask.dtype == np.uint8
    assert np.array_equal(stored_mask, mask)
    # Exact on one machine; allow the odd grey level where another CPU's float rounding
    # lands on the other side of .5 (a changed generator changes far more pixels).
    differ = stored_image != image
    assert differ.mean() < 1e-5
    assert np.abs(stored_image.astype(int) - image.astype(int)).max(initial=0) <= 1


@pytest.mark.parametrize("name", ["sample_stack.tif", "sample_masks.tif"])
def test_sample_files_carry_6_nm_pixels_and_zlib(name: str) -> None:
    with tifffile.TiffFile(SAMPLES / name) as tif:
        page = tif.pages[0]
        assert len(tif.pages) == 8 and page.shape == (512, 512)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = page.tags["XResolution"].value
        assert 1e7 / (num / den) == pytest.approx(6.0)
    assert (SAMPLES / name).stat().st_size < 3_000_000
