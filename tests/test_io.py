"""Tests for emseg.io.read: reading images page by page, pixel sizes, atomic writers, overlays."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from emseg.errors import InputError
from emseg.io.read import SUPPORTED_SUFFIXES, array_source, expand_inputs, open_image
from emseg.io.source import ImageSource
from emseg.io.tiff import _unit_to_nm, pixel_size_from_tiff
from emseg.io.write import TiffStackWriter, atomic_output, write_overlay_png

EM_FORMATS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "em_formats"


def _stack(pages=3, h=40, w=50, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((pages, h, w)) * 1000).astype(dtype)


def _px(path) -> float | None:
    with tifffile.TiffFile(path) as tif:
        return pixel_size_from_tiff(tif)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ TiffStackWriter

def test_stack_round_trip_values_dtype_pixel_size_compression(tmp_path):
    data = _stack()
    out = tmp_path / "mask.tif"
    with TiffStackWriter(out, shape=data.shape, dtype=data.dtype, pixel_size_nm=0.5,
                         metadata={"classes": ["bg", "membrane"]}) as writer:
        for page in data:
            writer.write_page(page)
    assert _listing(tmp_path) == ["mask.tif"]
    back = tifffile.imread(out)
    assert back.shape == data.shape and back.dtype == data.dtype
    np.testing.assert_array_equal(back, data)
    with tifffile.TiffFile(out) as tif:
        assert len(tif.series) == 1
        page = tif.pages[0]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = page.tags["XResolution"].value
        assert 1e7 * den / num == pytest.approx(0.5, rel=1e-6)  # Fiji reads this
        assert tif.shaped_metadata[0]["classes"] == ["bg", "membrane"]
    with open_image(out) as src:
        assert src.shape == (3, 40, 50) and len(src) == 3
        assert src.dtype == np.uint16 and src.is_stack
        assert src.pixel_size_nm == pytest.approx(0.5)
        np.testing.assert_array_equal(src.page(1), data[1])
        np.testing.assert_array_equal(src.page(-1), data[2])
        np.testing.assert_array_equal(np.stack(list(src)), data)
        with pytest.raises(IndexError):
            src.page(3)


def test_2d_round_trip_uncompressed(tmp_path):
    data = np.linspace(-1, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    out = tmp_path / "one.tif"
    with TiffStackWriter(out, shape=data.shape, dtype=np.float32, compression=None) as writer:
        writer.write_page(data)
    back = tifffile.imread(out)
    assert back.shape == (30, 20)
    np.testing.assert_array_equal(back, data)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.NONE
    with open_image(out) as src:
        assert src.shape == (1, 30, 20) and not src.is_stack
        assert src.pixel_size_nm is None
        np.testing.assert_array_equal(src.page(0), data)


def test_single_page_stack_is_still_a_stack(tmp_path):
    out = tmp_path / "s.tif"
    with TiffStackWriter(out, shape=(1, 8, 9), dtype=np.uint8) as writer:
        writer.write_page(np.ones((8, 9), np.uint8))
    with open_image(out) as src:
        assert src.shape == (1, 8, 9) and src.is_stack


def test_probabilities_4d_shape_and_block_writes(tmp_path):
    probs = np.random.default_rng(1).random((2, 3, 16, 12)).astype(np.float32)
    out = tmp_path / "probs.tif"
    with TiffStackWriter(out, shape=probs.shape, dtype=np.float32, pixel_size_nm=2.0) as writer:
        for page in probs:
            writer.write_page(page)  # (C, h, w)
    back = tifffile.imread(out)
    assert back.shape == (2, 3, 16, 12)
    np.testing.assert_array_equal(back, probs)
    assert _px(out) == pytest.approx(2.0)
    # a 2D image's probabilities (C, h, w) written in one call as a block of pages
    out2 = tmp_path / "probs2d.tif"
    with TiffStackWriter(out2, shape=probs[0].shape, dtype=np.float32) as writer:
        writer.write_page(probs[0])
    np.testing.assert_array_equal(tifffile.imread(out2), probs[0])
    with pytest.raises(InputError, match=r"4 dimensions"):
        open_image(out)


def test_writer_copies_pages_so_callers_can_reuse_buffers(tmp_path):
    out = tmp_path / "reuse.tif"
    buf = np.zeros((32, 32), np.uint8)
    with TiffStackWriter(out, shape=(5, 32, 32), dtype=np.uint8) as writer:
        for i in range(5):
            buf[:] = i
            writer.write_page(buf)
    assert [int(p.max()) for p in tifffile.imread(out)] == [0, 1, 2, 3, 4]


def test_writer_casts_fitting_integers_and_rejects_bad_pages(tmp_path):
    out = tmp_path / "x.tif"
    writer = TiffStackWriter(out, shape=(2, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        writer.write_page(np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        writer.write_page(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        writer.write_page(np.full((4, 4), 300, np.int64))
    writer.write_page(np.ones((4, 4), np.int64))  # argmax labels: values fit, cast
    writer.write_page(np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError, match="more than"):
        writer.write_page(np.ones((4, 4), np.uint8))
    writer.close()
    assert tifffile.imread(out).dtype == np.uint8


def test_abort_leaves_no_file_and_no_temp(tmp_path):
    writer = TiffStackWriter(tmp_path / "a.tif", shape=(4, 64, 64), dtype=np.uint16)
    writer.write_page(np.zeros((64, 64), np.uint16))
    assert len(_listing(tmp_path)) == 1 and _listing(tmp_path)[0].startswith(".")  # hidden temp
    writer.abort()
    assert _listing(tmp_path) == []


def test_exception_inside_with_keeps_old_file_and_removes_temp(tmp_path):
    out = tmp_path / "b.tif"
    out.write_bytes(b"old result")
    with pytest.raises(RuntimeError, match="model crashed"):
        with TiffStackWriter(out, shape=(3, 16, 16), dtype=np.uint8) as writer:
            writer.write_page(np.zeros((16, 16), np.uint8))
            raise RuntimeError("model crashed")
    assert _listing(tmp_path) == ["b.tif"]
    assert out.read_bytes() == b"old result"


def test_close_with_missing_pages_raises_and_saves_nothing(tmp_path):
    writer = TiffStackWriter(tmp_path / "c.tif", shape=(3, 8, 8), dtype=np.uint8)
    writer.write_page(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="1 of 3 pages"):
        writer.close()
    assert _listing(tmp_path) == []


def test_background_failure_is_raised_and_cleaned_up(tmp_path, monkeypatch):
    def broken_write(self, data, **kwargs):
        next(iter(data))
        raise OSError("disk full")

    monkeypatch.setattr(tifffile.TiffWriter, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        with TiffStackWriter(tmp_path / "d.tif", shape=(6, 8, 8), dtype=np.uint8) as writer:
            for _ in range(6):
                writer.write_page(np.zeros((8, 8), np.uint8))
    assert _listing(tmp_path) == []


def test_writer_options_bigtiff_and_tiny_pixel_size(tmp_path):
    out = tmp_path / "big.tif"
    with pytest.raises(ValueError, match="JSON"):
        TiffStackWriter(out, shape=(4, 4), dtype=np.uint8, metadata={"x": object()})
    with TiffStackWriter(out, shape=(4, 4), dtype=np.uint8, bigtiff=True, pixel_size_nm=0.001) as w:
        w.write_page(np.zeros((4, 4), np.uint8))
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff
        assert "ResolutionUnit" not in tif.pages[0].tags or \
            tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
        assert pixel_size_from_tiff(tif) == pytest.approx(0.001)  # from the JSON description


def test_atomic_output(tmp_path):
    target = tmp_path / "report.txt"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".txt"
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done" and _listing(tmp_path) == ["report.txt"]
    with pytest.raises(KeyError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise KeyError("boom")
    assert target.read_text() == "done" and _listing(tmp_path) == ["report.txt"]


# ------------------------------------------------------------------ pixel size from TIFF metadata

@pytest.mark.parametrize(("unit", "per_unit", "expected_nm"), [
    ("um", 1 / 0.25, 250.0), ("nm", 1 / 3.5, 3.5), ("micron", 100.0, 10.0),
    ("\\u00B5m", 1000.0, 1.0), ("\\u00C5", 0.5, 0.2),  # ImageJ escapes non-ASCII units
])
def test_pixel_size_from_imagej(tmp_path, unit, per_unit, expected_nm):
    out = tmp_path / "ij.tif"
    tifffile.imwrite(out, np.zeros((2, 8, 8), np.uint8), imagej=True,
                     resolution=(per_unit, per_unit), metadata={"unit": unit, "axes": "ZYX"})
    assert _px(out) == pytest.approx(expected_nm, rel=1e-4)


def test_pixel_size_from_ome(tmp_path):
    out = tmp_path / "a.ome.tif"
    tifffile.imwrite(out, np.zeros((2, 8, 8), np.uint8), ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 3.5, "PhysicalSizeXUnit": "nm"})
    assert _px(out) == pytest.approx(3.5)
    tifffile.imwrite(out, np.zeros((8, 8), np.uint8), ome=True, metadata={"PhysicalSizeX": 0.002})
    assert _px(out) == pytest.approx(2.0)  # default unit µm
    with open_image(out) as src:  # '.ome.tif' is a TIFF
        assert src.shape == (1, 8, 8) and src.pixel_size_nm == pytest.approx(2.0)


@pytest.mark.parametrize(("resolution", "unit", "expected_nm"), [
    (1e7 / 2.0, "CENTIMETER", 2.0),
    (2.54e7 / 5.0, "INCH", 5.0),
    (72.0, "INCH", None),        # screen default: not a microscope calibration
    (1e7 / 0.8, "NONE", None),   # no physical unit
])
def test_pixel_size_from_resolution_tags(tmp_path, resolution, unit, expected_nm):
    out = tmp_path / "r.tif"
    tifffile.imwrite(out, np.zeros((8, 8), np.uint8), resolution=(resolution, resolution),
                     resolutionunit=unit)
    if expected_nm is None:
        assert _px(out) is None
    else:
        assert _px(out) == pytest.approx(expected_nm, rel=1e-5)


def test_pixel_size_override(tmp_path):
    out = tmp_path / "r.tif"
    tifffile.imwrite(out, np.zeros((8, 8), np.uint8), resolution=(1e7, 1e7), resolutionunit="CENTIMETER")
    with open_image(out) as src:
        assert src.pixel_size_nm == pytest.approx(1.0)
    with open_image(out, pixel_size_nm=4.2) as src:
        assert src.pixel_size_nm == pytest.approx(4.2)
    with pytest.raises(InputError, match="positive"):
        open_image(out, pixel_size_nm=-1)


def test_unit_names():
    assert _unit_to_nm("µm") == _unit_to_nm("\u03bcm") == _unit_to_nm("UM") == 1000.0
    assert _unit_to_nm("Å") == _unit_to_nm("angstrom") == 0.1
    assert _unit_to_nm("pixel") is None and _unit_to_nm(None) is None


# ------------------------------------------------------------------ input errors

def test_missing_file(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(InputError) as info:
        open_image(path)
    assert str(info.value).startswith(str(path)) and "not found" in str(info.value)


def test_unsupported_suffix_lists_supported(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hi")
    with pytest.raises(InputError) as info:
        open_image(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and ".tif" in msg and ".dm3" in msg and ".png" in msg


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("keep", [0.95, 0.6, 0.05])
def test_truncated_tiff(tmp_path, compression, keep):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, _stack(4, 64, 64), compression=compression, photometric="minisblack",
                     metadata={})
    data = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError) as info:
        with open_image(cut) as src:
            for i in range(len(src)):
                src.page(i)
    msg = str(info.value)
    assert msg.startswith(str(cut)) and "Is the file complete?" in msg


def test_corrupt_page_data_named_on_read(tmp_path):
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, _stack(4, 64, 64), compression="zlib", photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[2].dataoffsets[0], tif.pages[2].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[offset:offset + count] = b"\xff" * count  # same size, garbage zlib stream
    path.write_bytes(bytes(raw))
    with open_image(path) as src:  # structure intact: opens fine
        src.page(1)
        with pytest.raises(InputError) as info:
            src.page(2)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "page 3 of 4 cannot be read" in msg


def test_garbage_tiff(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InputError, match="cannot be read as TIFF"):
        open_image(bad)


def test_rgb_png_and_tiff_rejected(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # coloured: not a greyscale image stored as RGB
    png = tmp_path / "c.png"
    Image.fromarray(rgb).save(png)
    tif = tmp_path / "c.tif"
    tifffile.imwrite(tif, rgb, photometric="rgb")
    for path in (png, tif):
        with pytest.raises(InputError) as info:
            open_image(path)
        assert str(info.value).startswith(str(path))
        assert "is an RGB image" in str(info.value) and "greyscale" in str(info.value)
    with pytest.raises(InputError, match="RGB"):
        array_source(np.dstack([rgb[..., 0], rgb[..., 0] // 2, rgb[..., 0]]))


def test_grey_image_stored_as_rgb_is_accepted(tmp_path):
    grey = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    png = tmp_path / "g.png"
    Image.fromarray(np.dstack([grey] * 3)).save(png)
    tif = tmp_path / "g.tif"
    tifffile.imwrite(tif, np.dstack([grey] * 3), photometric="rgb")
    for path in (png, tif):
        with open_image(path) as src:
            assert src.shape == (1, 20, 30) and src.dtype == np.uint8 and not src.is_stack
            np.testing.assert_array_equal(src.page(0), grey)


def test_4d_array_rejected():
    with pytest.raises(InputError, match=r"has shape \(2, 3, 8, 8\), 4 dimensions"):
        array_source(np.zeros((2, 3, 8, 8)), name="probs")
    src = array_source(np.zeros((1, 3, 8, 8)))  # singleton axes are dropped
    assert src.shape == (3, 8, 8)


def test_nan_page_named(tmp_path):
    data = np.zeros((3, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[1, 0, 0] = np.inf
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, data, photometric="minisblack")  # default would be planar RGB
    with open_image(path) as src:
        src.page(0)
        with pytest.raises(InputError) as info:
            src.page(1)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "page 2 of 3" in msg and "2 NaN or infinite" in msg


def test_empty_and_complex_arrays_rejected():
    with pytest.raises(InputError, match="empty"):
        array_source(np.zeros((0, 5)))
    with pytest.raises(InputError, match="complex"):
        array_source(np.zeros((4, 4), np.complex64), name="fft")
    with pytest.raises(InputError, match="not numeric"):
        array_source(np.array([["a", "b"], ["c", "d"]]))


# ------------------------------------------------------------------ other readers

def test_png_16bit_and_jpeg_bmp(tmp_path):
    img16 = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500)
    png = tmp_path / "a.PNG"  # suffixes are case-insensitive
    Image.fromarray(img16).save(png)
    with open_image(png) as src:
        assert src.dtype == np.uint16 and src.shape == (1, 12, 10) and not src.is_stack
        np.testing.assert_array_equal(src.page(0), img16)
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (16, 1))
    for name in ("b.bmp", "c.jpg"):
        Image.fromarray(grey).save(tmp_path / name)
        with open_image(tmp_path / name) as src:
            assert src.shape == (1, 16, 25) and src.dtype == np.uint8
            assert np.abs(src.page(0).astype(int) - grey).max() <= 8


def test_array_source_numpy_and_dask():
    data = _stack(4, 10, 12)
    src = array_source(data, pixel_size_nm=1.5, name="layer")
    assert src.shape == (4, 10, 12) and src.is_stack and src.pixel_size_nm == 1.5
    np.testing.assert_array_equal(src.page(2), data[2])
    flat = array_source(data[0])
    assert flat.shape == (1, 10, 12) and not flat.is_stack

    da = pytest.importorskip("dask.array")
    computed = []
    lock = threading.Lock()

    def record(block, block_info=None):
        with lock:
            computed.append(block_info[0]["chunk-location"][0])
        return block

    lazy = da.from_array(data, chunks=(1, 10, 12)).map_blocks(record, dtype=data.dtype)
    dsrc = array_source(lazy)
    assert dsrc.shape == (4, 10, 12) and dsrc.dtype == np.uint16 and computed == []
    page = dsrc.page(3)
    assert isinstance(page, np.ndarray)
    np.testing.assert_array_equal(page, data[3])
    assert computed == [3]  # only that page was computed
    nan = da.from_array(np.full((2, 4, 4), np.nan, np.float32), chunks=(1, 4, 4))
    with pytest.raises(InputError, match="layer: page 1 of 2"):
        array_source(nan, name="layer").page(0)


def test_hspy_stack_through_hyperspy(tmp_path):
    hs = pytest.importorskip("hyperspy.api")
    data = _stack(3, 16, 20, dtype=np.float32)
    sig = hs.signals.Signal2D(data)
    for ax in sig.axes_manager.signal_axes:
        ax.scale, ax.units = 0.002, "µm"
    path = tmp_path / "stack.hspy"
    sig.save(path)
    with open_image(path) as src:
        assert src.shape == (3, 16, 20) and src.is_stack and src.dtype == np.float32
        assert src.pixel_size_nm == pytest.approx(2.0)
        np.testing.assert_array_equal(src.page(1), data[1])
    path4d = tmp_path / "4dstem.hspy"
    hs.signals.Signal2D(np.zeros((2, 3, 8, 8), np.float32)).save(path4d)
    with pytest.raises(InputError, match=r"4 dimensions"):
        open_image(path4d)


@pytest.mark.parametrize(("name", "shape", "pixel_nm"), [
    ("Se_implanted_MoS2_STEM.dm3", (1, 1024, 1024), 0.0127),
    ("Au_nanoparticle_HAADF.emd", (1, 2048, 2048), 0.0075),
])
def test_real_microscope_files(name, shape, pixel_nm):
    path = EM_FORMATS / name
    if not path.exists():
        pytest.skip(f"shared data folder {EM_FORMATS} is absent (no {name})")
    with open_image(path) as src:
        assert src.shape == shape and not src.is_stack
        assert src.pixel_size_nm == pytest.approx(pixel_nm, rel=0.05)
        page = src.page(0)
        assert page.shape == shape[1:] and page.dtype == src.dtype and page.std() > 0
    if name.endswith(".emd"):
        assert src.dtype == np.uint16


def test_io_import_stays_light():
    code = ("import sys, emseg.io.read; bad = [m for m in ('hyperspy', 'matplotlib', 'napari', "
            "'PyQt5', 'PyQt6', 'qtpy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ------------------------------------------------------------------ expand_inputs

def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_expand_folder_natural_sort_skips_hidden_and_unsupported(tmp_path):
    _touch(tmp_path / "d", "img10.tif", "img2.tif", "img1.TIF", "notes.txt", "._img3.tif",
           ".img4.partial-1-0.tif", "x.dm3")
    (tmp_path / "d" / "sub.tif").mkdir()
    files, errors = expand_inputs([tmp_path / "d"])
    assert errors == []
    assert [f.name for f in files] == ["img1.TIF", "img2.tif", "img10.tif", "x.dm3"]


def test_expand_mix_dedups_and_keeps_order(tmp_path):
    _touch(tmp_path / "d", "a1.tif", "a2.tif", "a10.tif")
    _touch(tmp_path, "z.png")
    d = tmp_path / "d"
    files, errors = expand_inputs([tmp_path / "z.png", str(d / "a*.tif"), d, d / "a2.tif",
                                   str(tmp_path / "z.png")])
    assert errors == []
    assert files == [tmp_path / "z.png", d / "a1.tif", d / "a2.tif", d / "a10.tif"]


def test_expand_errors(tmp_path):
    _touch(tmp_path / "empty")
    _touch(tmp_path / "texts", "readme.txt")
    files, errors = expand_inputs([tmp_path / "empty", tmp_path / "texts",
                                   str(tmp_path / "*.dm4"), tmp_path / "gone.tif",
                                   str(tmp_path / "texts" / "*")])
    assert files == []
    assert len(errors) == 5 and all(isinstance(e, InputError) for e in errors)
    msgs = [str(e) for e in errors]
    assert msgs[0].startswith(str(tmp_path / "empty")) and "no supported images" in msgs[0]
    assert ".tif" in msgs[0] and ".emd" in msgs[0]
    assert "no supported images" in msgs[1]
    assert "matches no file" in msgs[2]
    assert "not found" in msgs[3]
    assert "matches no supported image" in msgs[4]


def test_supported_suffixes_are_lower_case_with_dot():
    assert all(s.startswith(".") and s == s.lower() for s in SUPPORTED_SUFFIXES)
    for needed in (".tif", ".tiff", ".btf", ".png", ".jpg", ".jpeg", ".bmp", ".dm3", ".dm4",
                   ".emd", ".ser", ".mrc", ".hspy"):
        assert needed in SUPPORTED_SUFFIXES


# ------------------------------------------------------------------ overlay preview

def test_overlay_png(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.normal(1000, 50, (600, 900)).astype(np.float32)
    labels = np.zeros((600, 900), np.uint8)
    labels[100:300, 100:400] = 1
    labels[350:550, 500:850] = 2
    labels[:, 450] = 3  # a 1-pixel line must survive downsampling
    out = write_overlay_png(tmp_path / "o.png", image, labels, max_size=256)
    assert out == tmp_path / "o.png" and _listing(tmp_path) == ["o.png"]
    with Image.open(out) as im:
        assert im.mode == "RGB" and max(im.size) <= 256
        rgb = np.asarray(im).astype(int)
    h, w = rgb.shape[:2]
    inside1 = rgb[int(200 / 600 * h), int(250 / 900 * w)]  # label 1: orange tint
    background = rgb[int(50 / 600 * h), int(50 / 900 * w)]
    assert inside1[0] > inside1[2] + 30
    assert abs(background[0] - background[2]) < 5  # grey
    line = rgb[:, int(450 / 900 * w) - 1: int(450 / 900 * w) + 2]
    assert (np.abs(line[..., 0] - line[..., 2]) > 20).any(axis=1).mean() > 0.9  # coloured column


def test_overlay_png_with_legend(tmp_path):
    image = np.tile(np.linspace(0, 1, 400, dtype=np.float32), (300, 1))
    labels = np.zeros((300, 400), np.int32)
    labels[50:250, 50:150] = 1
    labels[50:250, 200:350] = 2
    out = write_overlay_png(tmp_path / "legend.png", image, labels,
                            class_names=["background", "membrane", "mitochondria"], max_size=1024)
    with Image.open(out) as im:
        assert im.mode == "RGB" and max(im.size) <= 1024 and min(im.size) > 200
    with pytest.raises(ValueError, match="same shape"):
        write_overlay_png(tmp_path / "x.png", image, labels[:10])


def test_image_source_is_context_manager():
    closed = []
    src = ImageSource(path=None, name="t", shape=(1, 2, 2), dtype=np.uint8, pixel_size_nm=None,
                      is_stack=False, read=lambda i: np.zeros((2, 2), np.uint8),
                      close=lambda: closed.append(True))
    with src as s:
        assert s.page(0).shape == (2, 2)
    assert closed == [True]
