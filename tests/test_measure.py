"""Measurements on synthetic discs and ellipses of known size and pixel size; summary; `emseg measure`."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from emseg.analysis.measure import measure_objects, object_columns, summarize
from emseg.analysis.objects import class_names_from_tiff, find_instances, mask_stem, match_images
from emseg.cli.measure import add_parser, run_cli

PX = 2.0  # nm per pixel
RADII = (6, 9, 12, 15, 18)  # disc radii in px, well inside the image
CENTRES = ((30, 30), (30, 90), (30, 160), (100, 40), (100, 120))


def _disc_mask(shape=(160, 220)):
    mask = np.zeros(shape, np.uint8)
    for c, r in zip(CENTRES, RADII):
        mask[disk(c, r, shape=shape)] = 1
    return mask


def _table(mask, px=PX, image=None, **options):
    return measure_objects(find_instances(mask, **options), image=image, pixel_size_nm=px,
                           class_names=("matrix", "disc", "ellipse"), name="synthetic")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_discs_count_diameter_area_fraction():
    mask = _disc_mask()
    table = _table(mask)
    cols = object_columns(table)
    assert len(table) == len(RADII)
    diam = np.sort(cols["equivalent_diameter_nm"])
    assert np.all(np.abs(diam - 2 * np.array(RADII) * PX) <= PX)  # within one pixel
    assert np.allclose(cols["area_nm2"].sum(), (mask == 1).sum() * PX**2)
    assert not cols["touches_border"].any()
    (row,) = summarize([table])[:1]
    assert row["count"] == len(RADII) and row["area_fraction"] == (mask == 1).sum() / mask.size
    assert row["diameter_median_nm"] == pytest.approx(np.median(diam))
    assert set(row) >= {"diameter_mean_nm", "diameter_p10_nm", "diameter_p90_nm", "border_objects"}


def test_ellipse_axes_and_centroid_in_nm():
    mask = np.zeros((120, 160), np.uint8)
    mask[ellipse(60, 70, 12, 30)] = 2  # semi-axes 12 and 30 px, along y and x
    cols = object_columns(_table(mask))
    assert cols["class"][0] == "ellipse" and cols["class_index"][0] == 2
    assert abs(cols["major_axis_nm"][0] - 60 * PX) <= PX and abs(cols["minor_axis_nm"][0] - 24 * PX) <= PX
    assert cols["eccentricity"][0] == pytest.approx(np.sqrt(1 - (12 / 30) ** 2), abs=0.02)
    assert cols["centroid_y_nm"][0] == pytest.approx(60 * PX) and cols["centroid_x_nm"][0] == pytest.approx(70 * PX)
    assert cols["solidity"][0] > 0.95


def test_unknown_pixel_size_gives_px_columns():
    cols = object_columns(_table(_disc_mask(), px=None))
    assert "area_px2" in cols and "equivalent_diameter_px" in cols and "centroid_x_px" in cols
    assert not any(name.endswith(("_nm", "_nm2")) for name in cols)
    row = summarize([_table(_disc_mask(), px=None)])[0]
    assert "diameter_median_px" in row and np.isnan(row["pixel_size_nm"])


def test_touching_pair_split_and_measured():
    mask = np.zeros((80, 120), np.uint8)
    for cx in (40, 68):
        mask[disk((40, cx), 15)] = 1
    cols = object_columns(_table(mask, split=True))
    assert len(cols["label"]) == 2
    # each half of two overlapping discs: area below a full disc, above the half-overlap bound
    full = np.pi * 15**2 * PX**2
    assert np.all((cols["area_nm2"] < full) & (cols["area_nm2"] > 0.8 * full))


def test_border_flag_and_exclusion():
    mask = _disc_mask()
    mask[disk((150, 200), 12, shape=mask.shape)] = 1  # cut by the bottom and right edges
    mask[disk((80, 0), 5, shape=mask.shape)] = 1  # cut by the left edge
    table = _table(mask)
    cols = object_columns(table)
    assert cols["touches_border"].sum() == 2
    excluded = summarize([table])[0]
    included = summarize([table], exclude_border=False)[0]
    assert excluded["count"] == len(RADII) and excluded["n_border"] == 2 and excluded["border_objects"] == "excluded"
    assert included["count"] == len(RADII) + 2 and included["border_objects"] == "included"
    assert excluded["area_fraction"] == included["area_fraction"] == (mask == 1).sum() / mask.size


def test_mean_intensity_and_stack_slices():
    mask = _disc_mask()
    image = np.where(mask > 0, 200.0, 50.0)
    cols = object_columns(_table(np.stack([mask, mask]), image=np.stack([image, image])))
    assert len(cols["label"]) == 2 * len(RADII) and set(cols["slice"]) == {0, 1}
    assert np.allclose(cols["mean_intensity"], 200.0)
    assert np.isnan(object_columns(_table(mask))["mean_intensity"]).all()


def test_3d_objects_use_the_largest_section():
    stack = np.zeros((3, 60, 60), np.uint8)
    for i, r in enumerate((6, 12, 8)):
        stack[i][disk((30, 30), r)] = 1
    cols = object_columns(_table(stack, three_d=True))
    assert len(cols["label"]) == 1 and cols["n_slices"][0] == 3 and cols["slice"][0] == 1
    assert abs(cols["equivalent_diameter_nm"][0] - 24 * PX) <= PX


def test_summary_over_inputs_and_mixed_units():
    a, b = _table(_disc_mask()), _table(_disc_mask()[:, ::-1].copy())
    rows = summarize([a, b])
    assert [r["input"] for r in rows] == ["synthetic"] * 4 + ["ALL"] * 2
    all_disc = rows[4]
    assert all_disc["class"] == "disc" and all_disc["count"] == 2 * len(RADII)
    mixed = summarize([a, _table(_disc_mask(), px=None)])
    assert "diameter_median_px" in mixed[0]
    assert mixed[0]["diameter_median_px"] == pytest.approx(np.median(a.data["equivalent_diameter"]))


def _write_mask(path, mask, classes=None, px=PX):
    from emseg.io.write import TiffStackWriter
    with TiffStackWriter(path, shape=mask.shape, dtype=np.uint8, pixel_size_nm=px,
                         metadata={"classes": list(classes)} if classes else None) as w:
        w.write_page(mask)


def _run(argv):
    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub)
    return run_cli(parser.parse_args(argv))


def test_cli_measure_writes_tables_plot_and_instances(tmp_path):
    import tifffile
    masks, images, out = tmp_path / "masks", tmp_path / "images", tmp_path / "out"
    masks.mkdir(), images.mkdir()
    mask = _disc_mask()
    _write_mask(masks / "a_mask.tif", mask, classes=("matrix", "particle"))
    _write_mask(masks / "b_mask.tif", mask[::-1].copy())
    (masks / "a_overlay.png").write_bytes(b"not read")  # predict's other outputs in the folder are skipped
    for name in ("a", "b"):
        tifffile.imwrite(images / f"{name}.tif", np.where(mask > 0, 180, 60).astype(np.uint8))
    assert _run([str(masks), "-o", str(out), "--images", str(images), "--classes", "m,p"]) == 0
    rows = _read_csv(out / "a_objects.csv")
    assert len(rows) == len(RADII) and rows[0]["class"] == "particle"  # names from the mask's metadata
    assert float(rows[0]["mean_intensity"]) == 180 and rows[0]["touches_border"] == "false"
    assert _read_csv(out / "b_objects.csv")[0]["class"] == "p"  # --classes when the mask has none
    summary = _read_csv(out / "summary.csv")
    assert [r["input"] for r in summary] == ["a", "b", "ALL"] and summary[2]["count"] == str(2 * len(RADII))
    assert (out / "a_measure.png").read_bytes()[:4] == b"\x89PNG"
    labels = tifffile.imread(out / "a_instances.tif")
    assert labels.dtype == np.uint16 and labels.max() == len(RADII)


def test_cli_measure_reports_bad_inputs(tmp_path):
    _write_mask(tmp_path / "a_mask.tif", _disc_mask())
    code = _run([str(tmp_path / "a_mask.tif"), str(tmp_path / "missing.tif"), "-o", str(tmp_path / "out"),
                 "--no-plot", "--no-instances"])
    assert code == 1 and (tmp_path / "out" / "a_objects.csv").exists()
    assert not (tmp_path / "out" / "a_measure.png").exists()
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "float_mask.tif", np.zeros((8, 8), np.float32))
    assert _run([str(tmp_path / "float_mask.tif"), "-o", str(tmp_path / "out")]) == 1


def test_image_matching(tmp_path):
    from emseg.errors import InputError
    (tmp_path / "x.png").write_bytes(b"")
    masks = [tmp_path / "x_mask.tif", tmp_path / "y_mask.tif"]
    assert mask_stem(masks[0]) == "x" and match_images(masks, None) == [None, None]
    with pytest.raises(InputError, match="no image named y"):
        match_images(masks, [str(tmp_path)])
    with pytest.raises(InputError, match="1 image.* for 2 mask"):
        match_images(masks, [str(tmp_path / "x.png")])


def test_class_names_from_tiff(tmp_path):
    _write_mask(tmp_path / "m.tif", _disc_mask(), classes=("a", "b"))
    assert class_names_from_tiff(tmp_path / "m.tif") == ("a", "b")
    _write_mask(tmp_path / "n.tif", _disc_mask())
    assert class_names_from_tiff(tmp_path / "n.tif") is None


def test_empty_masks(tmp_path):
    from emseg.analysis.measure import plot_measurements
    for mask, options in ((np.zeros((30, 40), np.uint8), {}), (np.zeros((3, 30, 40), np.uint8), {"three_d": True})):
        instances = find_instances(mask, **options)
        table = measure_objects(instances, class_names=("bg", "a"))
        assert len(table) == 0 and len(object_columns(table)["label"]) == 0
        assert summarize([table])[0]["count"] == 0
        plot_measurements(tmp_path / "empty.png", table, instances)
