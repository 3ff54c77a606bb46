"""Voxel size (page spacing) read from files and written into outputs (emseg.io.read, emseg.io.zarr_store)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emseg.errors import InputError
from emseg.io.read import array_source, check_voxel_size, open_image


def test_imagej_spacing_and_unit(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint8), imagej=True, resolution=(1 / 0.005, 1 / 0.005),
                     metadata={"unit": "um", "spacing": 0.0075, "axes": "ZYX"})
    with open_image(path) as src:
        assert src.pixel_size_nm == pytest.approx(5.0)
        assert src.z_spacing_nm == pytest.approx(7.5)
        assert src.voxel_size_nm == pytest.approx((7.5, 5.0, 5.0))


def test_ome_physical_size_z(tmp_path):
    path = tmp_path / "v.ome.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint8), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 4.0, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 4.0, "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.01})
    with open_image(path) as src:
        assert src.voxel_size_nm == pytest.approx((10.0, 4.0, 4.0))  # PhysicalSizeZ defaults to µm


def test_plain_tiff_stack_has_no_voxel_size_and_2d_never_has_one(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint8), photometric="minisblack", resolution=(1e7 / 5, 1e7 / 5),
                     resolutionunit="CENTIMETER")
    with open_image(path) as src:
        assert src.shape == (3, 8, 8) and src.pixel_size_nm == pytest.approx(5.0)
        assert src.z_spacing_nm is None and src.voxel_size_nm is None
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.zeros((8, 8), np.uint8), imagej=True, metadata={"unit": "nm", "spacing": 3.0})
    with open_image(flat) as src:
        assert src.z_spacing_nm is None


def test_override_and_checks(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    with open_image(path, voxel_size_nm=(8, 5, 5)) as src:
        assert src.voxel_size_nm == (8.0, 5.0, 5.0) and src.pixel_size_nm == 5.0
    with open_image(path, pixel_size_nm=3.0) as src:
        assert src.voxel_size_nm is None  # no z spacing: a pixel size alone is not a voxel size
    with pytest.raises(InputError, match="non-square"):
        check_voxel_size((5, 4, 8))
    with pytest.raises(InputError, match="three positive numbers"):
        check_voxel_size((5, 0, 5))
    with pytest.raises(InputError, match="three positive numbers"):
        check_voxel_size((5, 5))
    src = array_source(np.zeros((4, 8, 8), np.uint8), voxel_size_nm=(6, 3, 3))
    assert src.voxel_size_nm == (6.0, 3.0, 3.0)


def test_writer_stores_voxel_size_and_reader_reads_it(tmp_path):
    from emseg.io.zarr_store import stack_writer
    for name in ("mask.tif", "mask.zarr"):
        path = tmp_path / name
        with stack_writer(path, shape=(3, 8, 8), dtype=np.uint8, pixel_size_nm=5.0, z_spacing_nm=7.0) as writer:
            for _ in range(3):
                writer.write_page(np.ones((8, 8), np.uint8))
        with open_image(path) as src:
            assert src.voxel_size_nm == pytest.approx((7.0, 5.0, 5.0)), name


def test_ome_zarr_z_scale_is_written(tmp_path):
    zarr = pytest.importorskip("zarr")
    from emseg.io.zarr_store import stack_writer
    path = tmp_path / "p.zarr"
    with stack_writer(path, shape=(2, 3, 8, 8), dtype=np.float32, pixel_size_nm=5.0, z_spacing_nm=9.0) as writer:
        writer.write_page(np.zeros((3, 8, 8), np.float32))
        writer.write_page(np.zeros((3, 8, 8), np.float32))
    ms = zarr.open(str(path), mode="r").attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 9.0, 5.0, 5.0]
    assert ms["axes"][1]["unit"] == "nanometer"


def _write_mrc(path, data: np.ndarray, voxel_angstrom: tuple[float, float, float]) -> None:
    """A minimal MRC2014 file (mode 0, uint8) with the cell size giving ``voxel_angstrom`` (z, y, x)."""
    from rsciio.mrc._api import get_std_dtype_list
    header = np.zeros(1, dtype=get_std_dtype_list("<"))
    nz, ny, nx = data.shape
    header["NX"], header["NY"], header["NZ"], header["MODE"] = nx, ny, nz, 0
    header["MX"], header["MY"], header["MZ"] = nx, ny, nz
    header["Xlen"], header["Ylen"], header["Zlen"] = (nx * voxel_angstrom[2], ny * voxel_angstrom[1],
                                                      nz * voxel_angstrom[0])
    header["MAPC"], header["MAPR"], header["MAPS"] = 1, 2, 3
    header["CMAP"] = b"MAP "
    header["STAMP"] = b"DA\x00\x00"
    assert header.itemsize == 1024
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(data, np.uint8).tobytes())


def test_mrc_header_voxel_size(tmp_path):
    pytest.importorskip("hyperspy")
    path = tmp_path / "tomo.mrc"
    data = np.arange(4 * 6 * 8, dtype=np.uint8).reshape(4, 6, 8)
    _write_mrc(path, data, (80.0, 50.0, 50.0))
    with open_image(path) as src:
        assert src.shape == (4, 6, 8) and src.is_stack
        np.testing.assert_array_equal(src.page(2), data[2])
        assert src.voxel_size_nm == pytest.approx((8.0, 5.0, 5.0))


def test_hspy_navigation_axis_is_the_z_spacing(tmp_path):
    hs = pytest.importorskip("hyperspy.api")
    sig = hs.signals.Signal2D(np.zeros((3, 8, 8), np.float32))
    for ax in sig.axes_manager.signal_axes:
        ax.scale, ax.units = 4.0, "nm"
    nav = sig.axes_manager.navigation_axes[0]
    nav.scale, nav.units = 0.006, "µm"
    path = tmp_path / "stack.hspy"
    sig.save(path)
    with open_image(path) as src:
        assert src.voxel_size_nm == pytest.approx((6.0, 4.0, 4.0))
