"""Tests of the augmentation pipeline, its config and the preview image."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi

from emseg.synthetic import CLASS_NAMES, make_em_stack
from emseg.train.augment import PRESETS, AugmentConfig, ClipUnit, EdgeSafeElastic, augment_preview, build_transform

NONE = PRESETS["none"]
GEOMETRIC = AugmentConfig(flips=True, elastic=1.0, affine=1.0, intensity=0.0, noise=0.0,
                          blur=0.0)


@pytest.fixture(scope="module")
def em() -> tuple[np.ndarray, np.ndarray]:
    """One synthetic EM page: float32 image in [0, 1] and its uint8 mask."""
    image, mask = make_em_stack(1, 128, 128, seed=5)
    return image[0].astype(np.float32) / 255, mask[0]


def blocky_mask(size: int = 128) -> np.ndarray:
    """Labels in large blocks and a disk, so few pixels sit next to a label boundary."""
    mask = np.zeros((size, size), np.uint8)
    mask[10:70, 20:100] = 1
    yy, xx = np.mgrid[:size, :size]
    mask[(yy - 90) ** 2 + (xx - 60) ** 2 < 25**2] = 2
    mask[:, 110:] = 3
    return mask


def test_geometric_transforms_keep_image_and_mask_aligned() -> None:
    mask = blocky_mask()
    image = mask.astype(np.float32) / 3  # the image is the mask, scaled
    for seed in range(6):
        out = build_transform(GEOMETRIC, seed=seed)(image=image, mask=mask)
        agree = np.rint(out["image"] * 3).astype(np.uint8) == out["mask"]
        # away from label edges (where the image is interpolated across labels) they match
        flat = ndi.maximum_filter(out["mask"], 3) == ndi.minimum_filter(out["mask"], 3)
        assert agree[flat].mean() > 0.99, (seed, agree[flat].mean())
        assert agree.mean() > 0.95, (seed, agree.mean())


@pytest.mark.parametrize("config", [AugmentConfig(), AugmentConfig(elastic=3, affine=3)])
def test_mask_keeps_only_its_own_labels(config: AugmentConfig,
                                        em: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = em
    odd = np.where(mask == 2, 7, mask * 3).astype(np.uint8)  # labels {0, 3, 7}
    for seed in range(4):
        out = build_transform(config, seed=seed)(image=image, mask=odd)
        assert set(np.unique(out["mask"])) <= {0, 3, 7}


def test_borders_are_reflected_not_filled() -> None:
    mask = np.ones((96, 96), np.uint8)
    image = np.full((96, 96), 0.6, np.float32)
    strong = AugmentConfig(flips=False, elastic=3, affine=3, intensity=0, noise=0, blur=0)
    for seed in range(6):
        out = build_transform(strong, seed=seed)(image=image, mask=mask)
        assert (out["mask"] == 1).all()
        assert np.allclose(out["image"], 0.6, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1), (64, 80)])
def test_output_dtype_shape_and_range(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32)
    image[:5] = 1.0  # saturated rows: brightness/noise must not push them above 1
    mask = rng.integers(0, 3, shape[:2], dtype=np.uint8)
    strong = AugmentConfig(elastic=2, affine=2, intensity=3, noise=3, blur=2)
    for seed in range(5):
        out = build_transform(strong, seed=seed)(image=image, mask=mask)
        # D4 rotations by 90 degrees swap height and width of non-square images
        swapped = (shape[1], shape[0], *shape[2:])
        assert out["image"].dtype == np.float32 and out["image"].shape in (shape, swapped)
        assert out["mask"].dtype == np.uint8 and out["mask"].shape == out["image"].shape[:2]
        assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_everything_off_is_the_identity(em: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = em
    transform = build_transform(NONE, seed=0)
    assert [type(t) for t in transform.transforms] == [ClipUnit]
    for _ in range(3):
        out = transform(image=image, mask=mask)
        assert np.array_equal(out["image"], image) and np.array_equal(out["mask"], mask)


SWITCHES = {
    "flips": (True, {A.D4}),
    "affine": (1.0, {A.Affine}),
    "elastic": (1.0, {EdgeSafeElastic}),
    "intensity": (1.0, {A.RandomBrightnessContrast, A.RandomGamma}),
    "blur": (1.0, {A.GaussianBlur}),
    "noise": (1.0, {A.GaussNoise}),
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_each_switch_turns_exactly_its_transform_on(name: str,
                                                    em: tuple[np.ndarray, np.ndarray]) -> None:
    value, expected = SWITCHES[name]
    only = dataclasses.replace(NONE, **{name: value})
    transform = build_transform(only, seed=1)
    assert {type(t) for t in transform.transforms} - {ClipUnit} == expected
    without = dataclasses.replace(AugmentConfig(), **{name: False if name == "flips" else 0.0})
    assert not {type(t) for t in build_transform(without).transforms} & expected
    image, mask = em
    outputs = [transform(image=image, mask=mask)["image"] for _ in range(8)]
    assert any(not np.array_equal(out, image) for out in outputs)  # it does something


def test_same_seed_same_augmentation(em: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = em
    a = build_transform(AugmentConfig(), seed=3)(image=image, mask=mask)
    b = build_transform(AugmentConfig(), seed=3)(image=image, mask=mask)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])


def test_from_dict_rejects_unknown_keys_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        AugmentConfig.from_dict({"flip": True, "elastic": 0.5})
    message = str(info.value)
    assert "flip" in message
    for field in ("flips", "elastic", "affine", "intensity", "noise", "blur"):
        assert field in message


@pytest.mark.parametrize("bad", [{"noise": -1}, {"blur": "strong"}, {"flips": "yes"},
                                 {"affine": float("nan")}, {"elastic": True}])
def test_from_dict_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        AugmentConfig.from_dict(bad)


def test_from_dict_fills_defaults_and_to_dict_round_trips() -> None:
    config = AugmentConfig.from_dict({"noise": 0, "affine": 2})
    assert config == AugmentConfig(noise=0.0, affine=2.0)
    assert AugmentConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) == {"flips", "elastic", "affine", "intensity", "noise", "blur"}


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = AugmentConfig(flips=False, elastic=0.0, affine=0.5, intensity=2.0, noise=0.25,
                           blur=1.0)
    path = tmp_path / "augment.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    assert AugmentConfig.from_yaml(path) == config
    path.write_text("", encoding="utf-8")
    assert AugmentConfig.from_yaml(path) == AugmentConfig()
    path.write_text("elastc: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="augment.yaml.*elastc"):
        AugmentConfig.from_yaml(path)


def test_presets() -> None:
    assert set(PRESETS) == {"em", "light", "none"}
    assert PRESETS["em"] == AugmentConfig()
    light = PRESETS["light"]
    assert light.flips and 0 < light.elastic < 1 and 0 < light.noise < 1
    assert not NONE.flips and all(v == 0 for k, v in NONE.to_dict().items() if k != "flips")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG header."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_preview_writes_a_deterministic_png(tmp_path: Path) -> None:
    image, mask = make_em_stack(2, 96, 96, seed=2)
    images = [page.astype(np.float32) / 255 for page in image]
    first = augment_preview(images, list(mask), tmp_path / "a.png", config=AugmentConfig(),
                            n=3, crop=64, seed=1, class_names=CLASS_NAMES)
    assert first == tmp_path / "a.png"
    width, height = png_size(first)  # 3 panels of 3 inches at 100 dpi, in a row
    assert 900 <= width <= 1000 and 300 <= height <= 450
    assert 10_000 < first.stat().st_size < 2_000_000
    again = augment_preview(images, list(mask), tmp_path / "b.png", config=AugmentConfig(),
                            n=3, crop=64, seed=1, class_names=CLASS_NAMES)
    assert again.read_bytes() == first.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files


def test_preview_rejects_mismatched_inputs(tmp_path: Path) -> None:
    image = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError):
        augment_preview([image], [], tmp_path / "x.png", config=NONE)
    with pytest.raises(ValueError):
        augment_preview([image], [np.zeros((16, 32), np.uint8)], tmp_path / "x.png", config=NONE)
    with pytest.raises(ValueError):
        augment_preview([image + 255], [np.zeros((32, 32), np.uint8)], tmp_path / "x.png",
                        config=NONE)
    assert not list(tmp_path.iterdir())
