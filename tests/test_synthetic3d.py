"""The synthetic isotropic volume (emseg.synthetic3d): exact 3D labels, determinism, what it looks like."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label, regionprops

from emseg.synthetic3d import CLASS_NAMES, make_em_volume


@pytest.fixture(scope="module")
def volume():
    return make_em_volume((48, 96, 96), seed=3)


def test_shapes_dtypes_and_classes(volume):
    assert volume.image.shape == volume.mask.shape == volume.mitochondria.shape == (48, 96, 96)
    assert volume.image.dtype == np.uint8 and volume.mask.dtype == np.uint8
    assert CLASS_NAMES == ("background", "membrane", "mitochondrion")
    fractions = np.bincount(volume.mask.ravel(), minlength=3) / volume.mask.size
    assert 0.03 < fractions[1] < 0.2 and 0.02 < fractions[2] < 0.15
    assert volume.voxel_size_nm == (5.0, 5.0, 5.0)


def test_instance_labels_are_exactly_the_mitochondria(volume):
    mito = volume.mitochondria
    np.testing.assert_array_equal(mito > 0, volume.mask == 2)
    n = int(mito.max())
    assert n >= 3 and set(np.unique(mito)) == set(range(n + 1))  # 1..n without gaps
    # objects are kept apart: connected components never join two labels
    components = label(mito > 0, connectivity=3)
    for region in regionprops(components, intensity_image=mito):
        values = np.unique(mito[components == region.label])
        assert len(values) == 1


def test_organelles_are_3d_objects_spanning_slices_in_every_orientation(volume):
    mito = volume.mitochondria
    spans = [r.bbox[3] - r.bbox[0] for r in regionprops(mito)]
    assert np.median(spans) >= 5  # several slices each, not flat discs
    # isotropic: the image looks alike in xy and xz planes (membrane share of the mid planes)
    xy = (volume.mask[24] == 1).mean()
    xz = (volume.mask[:, 48] == 1).mean()
    assert 0.3 < xy / xz < 3


def test_dark_structures_are_darker_than_cytoplasm(volume):
    image, mask = volume.image.astype(float), volume.mask
    assert image[mask == 1].mean() < image[mask == 0].mean() - 40
    assert image[mask == 2].mean() < image[mask == 0].mean() - 20


def test_same_seed_same_volume_other_seed_other_volume():
    a = make_em_volume((16, 32, 32), seed=1)
    b = make_em_volume((16, 32, 32), seed=1)
    c = make_em_volume((16, 32, 32), seed=2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mitochondria, b.mitochondria)
    assert not np.array_equal(a.image, c.image)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 16|>= 16"):
        make_em_volume((8, 32, 32))
    with pytest.raises(ValueError, match="positive"):
        make_em_volume((16, 32, 32), voxel_size_nm=0)
