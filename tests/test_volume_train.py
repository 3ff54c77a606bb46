"""Training from volume annotations (emseg.train.volume, `emseg train --planes ortho`)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emseg.analysis.metrics import IGNORE
from emseg.errors import InputError
from emseg.model.card import Normalization
from emseg.train.volume import volume_items, volume_splits


def _labelled(shape=(12, 20, 24), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, shape, dtype=np.uint8)
    mask = (image > 128).astype(np.uint8)
    return image, mask


def test_every_plane_of_a_dense_volume_is_a_page_and_directions_weigh_alike():
    image, mask = _labelled()
    items = volume_items(image, mask, voxel_size_nm=(5, 5, 5), sparse=False, norm=Normalization())
    names = [it.name.split()[-1].split("[")[0] for it in items]
    assert names.count("xy") == 12 and names.count("xz") == 20 and names.count("yz") == 24
    per_direction = {d: sum(it.annotated for it, n in zip(items, names) if n == d) for d in ("xy", "xz", "yz")}
    assert len(set(per_direction.values())) == 1  # the same voxels, seen three ways
    xz3 = next(it for it in items if it.name.endswith("xz[3]"))
    np.testing.assert_array_equal(xz3.target, mask[:, 3, :])
    assert xz3.image.shape == (12, 24) and xz3.pixel_size_nm == 5 and 0 <= xz3.image.min() <= xz3.image.max() <= 1


def test_anisotropic_planes_are_resampled_to_square_pixels():
    image, mask = _labelled((6, 20, 24))
    items = volume_items(image, mask, voxel_size_nm=(10, 5, 5), sparse=False, norm=Normalization())
    yz = next(it for it in items if " yz[" in it.name)
    assert yz.image.shape == yz.target.shape == (12, 20)  # 6 pages at 10 nm -> 12 rows at 5 nm
    assert set(np.unique(yz.target)) <= {0, 1}  # nearest: no invented classes
    xy = next(it for it in items if " xy[" in it.name)
    assert xy.image.shape == (20, 24)


def test_a_few_annotated_slices_in_any_direction_are_enough():
    image, dense = _labelled()
    scribbles = np.zeros_like(dense)
    scribbles[:, 7, :] = dense[:, 7, :] + 1  # one annotated xz slice (sparse: 0 = not annotated)
    items = volume_items(image, scribbles, voxel_size_nm=(5, 5, 5), sparse=True, norm=Normalization())
    xz = [it for it in items if " xz[" in it.name]
    assert [it.name for it in xz] == ["volume xz[7]"]
    np.testing.assert_array_equal(xz[0].target, dense[:, 7, :])
    xy = [it for it in items if " xy[" in it.name]
    assert len(xy) == 12 and all(it.annotated == 24 for it in xy)  # one annotated row per page
    assert all((it.target[np.arange(20) != 7] == IGNORE).all() for it in xy)
    with pytest.raises(InputError, match="no voxel is annotated"):
        volume_items(image, np.zeros_like(dense), voxel_size_nm=(5, 5, 5), sparse=True, norm=Normalization())


def test_validation_strip_is_cut_from_the_volume_before_the_planes():
    image, mask = _labelled()
    train, val = volume_splits(image, mask, 0.25, voxel_size_nm=(5, 5, 5), sparse=False, norm=Normalization())
    assert all(it.image.shape[-1] == 18 for it in train if " yz[" not in it.name)
    assert sum(" yz[" in it.name for it in train) == 18 and sum(" yz[" in it.name for it in val) == 6
    assert all(it.name.startswith("volume (val)") for it in val)
    total = sum(it.annotated for it in train) + sum(it.annotated for it in val)
    assert total == 3 * mask.size  # every voxel in exactly one of the two, three times


def test_refuses_ssTEM_like_anisotropy():
    image, mask = _labelled((6, 20, 24))
    with pytest.raises(InputError, match="anisotropic"):
        volume_items(image, mask, voxel_size_nm=(50, 4, 4), sparse=False, norm=Normalization())


def test_cli_train_planes_ortho(tmp_path):
    from emseg.cli import main
    from emseg.model.modelfile import load_model
    from emseg.synthetic3d import make_em_volume
    vol = make_em_volume((24, 48, 48), seed=0)
    tifffile.imwrite(tmp_path / "img.tif", vol.image, imagej=True, resolution=(0.2, 0.2),
                     metadata={"unit": "nm", "spacing": 5.0, "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "mask.tif", vol.mask, photometric="minisblack")
    code = main(["-q", "train", "--images", str(tmp_path / "img.tif"), "--masks", str(tmp_path / "mask.tif"),
                 "--planes", "ortho", "-o", str(tmp_path / "run"), "--encoder", "vgg11_bn_micro",
                 "--classes", "background,membrane,mitochondrion", "--steps", "2", "--val-every", "2",
                 "--tile-size", "32", "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    card = load_model(tmp_path / "run" / "model.safetensors").card
    assert card.pixel_size_nm == pytest.approx(5.0)
    assert card.training["pages"] > 24 + 48  # pages from all three directions
    assert card.training["sources"] == ["img.tif xy", "img.tif xz", "img.tif yz"]
    assert card.training["validation_pages"] > 0
