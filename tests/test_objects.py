"""Instances from class masks: counts, splitting of touching objects, size filter, holes, stacks."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from emseg.analysis.objects import find_instances, instance_dtype, split_touching, write_instances


def _discs(shape, centres, radius, value=1, mask=None):
    mask = np.zeros(shape, np.uint8) if mask is None else mask
    for c in centres:
        mask[disk(c, radius, shape=shape)] = value
    return mask


def test_counts_per_class_and_numbering():
    mask = _discs((120, 160), [(30, 30), (30, 90), (90, 40)], 10)
    mask[ellipse(80, 120, 8, 25)] = 2
    inst = find_instances(mask)
    assert inst.count == 4
    assert list(inst.classes) == [0, 1, 1, 1, 2]
    assert list(inst.count_per_class(3)) == [0, 3, 1]
    assert set(np.unique(inst.labels)) == {0, 1, 2, 3, 4}
    assert inst.labels.dtype == np.uint16
    assert ((inst.labels > 0) == (mask > 0)).all()


def test_touching_pair_is_split_along_the_neck():
    r = 15
    mask = _discs((80, 120), [(40, 40), (40, 40 + 26)], r)  # centres 26 px apart: overlapping discs
    assert find_instances(mask).count == 1
    inst = find_instances(mask, split=True)
    assert inst.count == 2
    for k, cx in ((1, 40), (2, 66)):
        ys, xs = np.nonzero(inst.labels == k)
        assert abs(ys.mean() - 40) < 1 and abs(xs.mean() - cx) < 1.5
    # the cut runs through the neck, half-way between the centres
    cut = [x for x in range(40, 67) if inst.labels[40, x] != inst.labels[40, x - 1]]
    assert cut and abs(cut[0] - 53) <= 1


def test_touching_chain_and_different_classes():
    mask = _discs((60, 160), [(30, 30), (30, 56), (30, 82)], 14)
    mask = _discs((60, 160), [(30, 125)], 14, value=2, mask=mask)
    mask[30, 97:112] = 1  # class 1 touches the class 2 disc: still separate objects
    inst = find_instances(mask, split=True, min_size_px=20)
    assert list(inst.count_per_class(3)) == [0, 3, 1]


def test_elongated_objects_are_not_oversplit():
    mask = np.zeros((100, 200), np.uint8)
    mask[ellipse(50, 100, 12, 70, rotation=0.3)] = 1
    mask[ellipse(20, 40, 4, 30)] = 1  # thin: no seed deeper than the split depth
    assert find_instances(mask, split=True).count == 2


def test_split_touching_keeps_unseeded_thin_objects():
    binary = np.zeros((30, 30), bool)
    binary[5, 2:28] = True  # a 1-px line: distance max 1 < depth
    labels = split_touching(binary, depth_px=2.0)
    assert labels.max() == 1 and (labels > 0).sum() == 26


def test_min_size_and_hole_filling():
    mask = _discs((100, 100), [(50, 50)], 20)
    mask[45:56, 45:56] = 0  # background hole
    mask[10:12, 10:12] = 1  # 4-pixel speck
    mask[ellipse(50, 50, 2, 2)] = 2  # another class inside the hole is kept as its own object
    inst = find_instances(mask, min_size_px=5)
    assert inst.count == 2 and list(inst.classes) == [0, 1, 2]
    filled = find_instances(mask, min_size_px=5, fill_holes=True)
    big = filled.labels == 1
    assert big.sum() == (mask == 1).sum() - 4 + (mask[45:56, 45:56] == 0).sum()
    assert filled.count == 2 and (filled.labels[mask == 2] == 2).all()


def test_stacks_per_slice_and_3d():
    page = _discs((40, 40), [(20, 20)], 8)
    stack = np.stack([page, page, np.zeros_like(page), page])
    per_slice = find_instances(stack)
    assert per_slice.count == 3 and not per_slice.three_d
    assert [int(per_slice.labels[i].max()) for i in range(4)] == [1, 2, 0, 3]
    volume = find_instances(stack, three_d=True)
    assert volume.count == 2 and volume.three_d


def test_instance_dtype():
    assert instance_dtype(65535) == np.uint16 and instance_dtype(65536) == np.uint32


def test_bad_mask_is_refused():
    with pytest.raises(ValueError, match="integer class labels"):
        find_instances(np.zeros((4, 4), np.float32))


def test_write_instances_roundtrip(tmp_path):
    import tifffile

    from emseg.io.read import open_image
    stack = np.stack([_discs((40, 50), [(20, 20)], 8), _discs((40, 50), [(10, 30), (30, 30)], 5, value=2)])
    inst = find_instances(stack)
    path = write_instances(tmp_path / "x_instances.tif", inst, pixel_size_nm=3.5, class_names=("bg", "a", "b"))
    with open_image(path) as src:
        assert src.pixel_size_nm == pytest.approx(3.5) and src.shape == (2, 40, 50)
    with tifffile.TiffFile(path) as tif:
        data = tif.asarray()
        meta = tif.shaped_metadata[0]
    assert data.dtype == np.uint16 and (data == inst.labels).all()
    assert meta["instance_class"] == [1, 2, 2] and meta["classes"] == ["bg", "a", "b"]
