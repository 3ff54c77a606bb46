import numpy as np
import pytest

from emseg.analysis.metrics import IGNORE, adapted_rand_error, boundary_class_of, confusion, scores


def test_scores_from_a_known_confusion():
    target = np.array([0, 0, 1, 1, 1, IGNORE])
    pred = np.array([0, 1, 1, 1, 0, 1])
    s = scores(confusion(target, pred, 2), ("bg", "fg"))
    assert s["iou"]["fg"] == pytest.approx(2 / 4)
    assert s["dice"]["fg"] == pytest.approx(4 / 6)
    assert s["iou"]["bg"] == pytest.approx(1 / 3)
    assert s["pixel_error"] == pytest.approx(2 / 5)
    assert s["pixels"] == 5


def test_absent_class_is_none_not_zero():
    s = scores(confusion(np.zeros(4, int), np.zeros(4, int), 3), ("a", "b", "c"))
    assert s["iou"]["b"] is None and s["mean_iou"] is None and s["pixel_error"] == 0


def test_rand_error_on_cells_between_membranes():
    target = np.zeros((20, 20), np.uint8)
    target[:, 10] = 1  # a membrane splitting two cells
    assert adapted_rand_error(target, target, boundary_class=1) == pytest.approx(0)
    merged = target.copy()
    merged[5:8, 10] = 0  # a gap merges the cells
    assert adapted_rand_error(target, merged, boundary_class=1) > 0.3
    thick = target.copy()
    thick[:, 8:13] = 1  # the same two cells behind a thicker membrane: thinned, no error
    assert adapted_rand_error(target, thick, boundary_class=1) == pytest.approx(0)
    assert adapted_rand_error(target, thick, boundary_class=1, thin=False) > 0.1
    assert boundary_class_of(("background", "membrane")) == 1
    assert boundary_class_of(("background", "mito")) is None
