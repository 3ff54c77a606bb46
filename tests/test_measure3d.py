"""3D measurements (emseg.analysis.measure3d) through `measure_objects` and `emseg measure --3d`, and 3D scores."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import tifffile

from emseg.analysis.measure import measure_objects, object_columns
from emseg.analysis.measure3d import measure_3d, segmentation_scores_3d, surface_area
from emseg.analysis.objects import find_instances


def _ball(shape, centre, radius_nm, voxel):
    grids = np.meshgrid(*[(np.arange(n) - c) * v for n, c, v in zip(shape, centre, voxel)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_nm**2


@pytest.mark.parametrize("voxel", [(5.0, 5.0, 5.0), (10.0, 4.0, 4.0)])
def test_ball_volume_surface_and_diameter_in_nm(voxel):
    r = 60.0
    labels = _ball((40, 50, 50), (20, 25, 25), r, voxel).astype(np.uint16)
    m = measure_3d(labels, voxel)
    assert m["volume"][0] == pytest.approx(4 / 3 * math.pi * r**3, rel=0.04)
    assert m["surface_area"][0] == pytest.approx(4 * math.pi * r**2, rel=0.08)
    assert m["equivalent_diameter_3d"][0] == pytest.approx(2 * r, rel=0.02)
    assert 0.9 < m["sphericity"][0] <= 1.05
    assert m["centroid_z"][0] == pytest.approx(20 * voxel[0], abs=0.5 * voxel[0])


def test_elongated_object_is_less_spherical_and_boxes_are_voxel_indices():
    labels = np.zeros((20, 30, 40), np.uint16)
    labels[2:5, 3:6, 4:34] = 1  # a 3 x 3 x 30 rod
    labels[10:16, 10:16, 10:16] = 2  # a 6^3 cube
    m = measure_3d(labels)
    assert list(m["label"]) == [1, 2]
    assert [m[k][0] for k in ("bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1")] == [2, 3, 4, 5, 6, 34]
    assert m["volume"][0] == 270 and m["volume"][1] == 216
    assert m["sphericity"][0] < 0.65 < m["sphericity"][1]
    assert surface_area(np.ones((1, 1, 1), bool)) > 0  # a single voxel still has a surface


def test_measure_objects_adds_3d_columns_with_units_and_flags_end_slices():
    mask = np.zeros((12, 30, 30), np.uint8)
    mask[3:8, 5:12, 5:12] = 2     # inside
    mask[0:4, 18:25, 18:25] = 2   # touches the first slice
    instances = find_instances(mask, three_d=True)
    table = measure_objects(instances, pixel_size_nm=4.0, voxel_size_nm=(8.0, 4.0, 4.0), class_names=("bg", "m", "mito"))
    cols = object_columns(table)
    order = np.argsort(cols["bbox_z0"])[::-1]  # the inside object first
    cols = {k: np.asarray(v)[order] for k, v in cols.items()}
    assert cols["volume_nm3"].tolist() == [5 * 49 * 8 * 16, 4 * 49 * 8 * 16]
    assert {"surface_area_nm2", "equivalent_diameter_3d_nm", "sphericity", "centroid_z_nm", "bbox_z0"} <= set(cols)
    assert cols["touches_border"].tolist() == [False, True]
    assert cols["n_slices"].tolist() == [5, 4]
    from emseg.analysis.measure import summarize
    [row] = [r for r in summarize([table]) if r["class"] == "mito"]
    assert row["count"] == 1 and row["n_border"] == 1  # the one at the first slice is left out
    assert row["diameter_median_nm"] == pytest.approx(cols["equivalent_diameter_3d_nm"][0])
    unknown = object_columns(measure_objects(instances))
    assert "volume_vox3" in unknown and "volume_nm3" not in unknown
    flat = object_columns(measure_objects(find_instances(mask)))
    assert "volume_nm3" not in flat and "volume_vox3" not in flat  # per-slice objects: no 3D columns


def test_scores_count_splits_and_merges():
    truth = np.zeros((10, 20, 20), np.uint16)
    truth[1:9, 2:6, 2:6] = 1
    truth[1:9, 10:14, 10:14] = 2
    same = segmentation_scores_3d(truth, truth)
    assert same["vi_split"] == pytest.approx(0, abs=1e-9) and same["splits"] == same["merges"] == 0
    split = truth.copy()
    split[5:9][split[5:9] == 1] = 3  # object 1 cut in two along z
    s = segmentation_scores_3d(split, truth)
    assert s["splits"] == 1 and s["merges"] == 0 and s["objects_pred"] == 3 and s["count_error"] == 0.5
    assert s["vi_split"] > 0.01 and s["vi_merge"] == pytest.approx(0.0, abs=1e-9) and s["iou"] == 1.0
    merged = truth.copy()
    merged[merged == 2] = 1
    merged[1:9, 6:10, 2:14] = 1  # a bridge joins them
    m = segmentation_scores_3d(merged, truth)
    assert m["merges"] == 1 and m["splits"] == 0 and m["vi_merge"] > 0.01 and m["iou"] < 1


def test_cli_measure_3d_writes_volumes_in_nm(tmp_path):
    from emseg.cli import main
    from emseg.io.zarr_store import stack_writer
    mask = np.zeros((10, 32, 32), np.uint8)
    mask[2:7, 4:14, 4:14] = 2
    mask[3:9, 18:28, 18:28] = 2
    path = tmp_path / "vol_mask.tif"
    with stack_writer(path, shape=mask.shape, dtype=np.uint8, pixel_size_nm=5.0, z_spacing_nm=10.0,
                      metadata={"classes": ["background", "membrane", "mitochondrion"]}) as writer:
        writer.write_page(mask)
    assert main(["-q", "measure", str(path), "-o", str(tmp_path / "out"), "--3d", "--no-plot"]) == 0
    with open(tmp_path / "out" / "vol_objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["volume_nm3"]) for r in rows] == [5 * 100 * 250.0, 6 * 100 * 250.0]
    assert main(["-q", "measure", str(path), "-o", str(tmp_path / "out2"), "--3d", "--no-plot",
                 "--voxel-size", "20,5,5"]) == 0
    with open(tmp_path / "out2" / "vol_objects.csv") as f:
        assert float(next(csv.DictReader(f))["volume_nm3"]) == 5 * 100 * 500.0
    tifffile.imwrite(tmp_path / "plain_mask.tif", mask, photometric="minisblack")
    assert main(["-q", "measure", str(tmp_path / "plain_mask.tif"), "-o", str(tmp_path / "out3"), "--3d"]) == 0
    with open(tmp_path / "out3" / "plain_objects.csv") as f:
        assert "volume_vox3" in next(csv.DictReader(f))
    assert (tmp_path / "out3" / "plain_measure.png").exists()


def test_cli_voxel_size_is_checked(capsys):
    from emseg.cli import main
    assert main(["measure", "x.tif", "-o", "out", "--voxel-size", "5,4,8"]) == 2  # a usage error, one line
    assert "non-square pixels" in capsys.readouterr().err
