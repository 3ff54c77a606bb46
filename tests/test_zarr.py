"""Zarr / OME-Zarr input and output (emseg.io.zarr_store) and their dispatch from emseg.io.read."""

from __future__ import annotations

import builtins
import sys

import numpy as np
import pytest

from emseg.errors import InputError
from emseg.io.read import expand_inputs, open_image
from emseg.io.write import TiffStackWriter
from emseg.io.zarr_store import ZarrStackWriter, is_zarr, stack_writer

zarr = pytest.importorskip("zarr")


def write_ome(path, data, axes, scale, unit="micrometer", chunks=None):
    """An OME-Zarr (NGFF 0.4) image as another tool would write it."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": a, "type": "space", **({"unit": unit} if a in "yx" else {})}
                                   for a in axes],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]
    arr = group.create_array("0", shape=data.shape, chunks=chunks or data.shape, dtype=data.dtype)
    arr[...] = data
    return path


# ------------------------------------------------------------------ writing

def test_stack_round_trip_with_pixel_size_and_ngff_metadata(tmp_path, rng):
    stack = rng.integers(0, 3, (4, 40, 30), dtype=np.uint8)
    out = tmp_path / "m_mask.zarr"
    with ZarrStackWriter(out, shape=stack.shape, dtype=np.uint8, pixel_size_nm=4.5,
                         metadata={"classes": ["a", "b", "c"]}) as writer:
        for page in stack:
            writer.write_page(page)
    assert [p.name for p in tmp_path.iterdir()] == ["m_mask.zarr"]  # no temporary folder left
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].chunks == (1, 40, 30)  # one chunk per page
    ms = group.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert group.attrs["emseg"]["classes"] == ["a", "b", "c"]
    with open_image(out) as src:
        assert src.shape == (4, 40, 30) and src.is_stack and src.dtype == np.uint8
        assert src.pixel_size_nm == pytest.approx(4.5)
        np.testing.assert_array_equal(np.stack(list(src)), stack)


def test_probabilities_are_stored_class_axis_first_and_2d_pages(tmp_path, rng):
    probs = rng.random((3, 2, 20, 16), dtype=np.float32)  # (pages, C, h, w)
    with ZarrStackWriter(tmp_path / "p.zarr", shape=probs.shape, dtype=np.float32) as writer:
        for page in probs:
            writer.write_page(page)
    arr = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")["0"]
    assert arr.shape == (2, 3, 20, 16) and arr.chunks == (2, 1, 20, 16)
    np.testing.assert_array_equal(arr[...], probs.transpose(1, 0, 2, 3))
    page = rng.integers(0, 2, (20, 16), dtype=np.uint8)
    with ZarrStackWriter(tmp_path / "two_d.zarr", shape=page.shape, dtype=np.uint8) as writer:
        writer.write_page(page)
    with open_image(tmp_path / "two_d.zarr") as src:
        assert src.shape == (1, 20, 16) and not src.is_stack and src.pixel_size_nm is None
        np.testing.assert_array_equal(src.page(0), page)


def test_pages_may_come_in_any_order_and_missing_pages_save_nothing(tmp_path):
    out = tmp_path / "o.zarr"
    writer = ZarrStackWriter(out, shape=(3, 8, 8), dtype=np.uint8)
    for i in (2, 0, 1):
        writer.write_page(np.full((8, 8), i, np.uint8), index=i)
    writer.close()
    with open_image(out) as src:
        assert [int(p[0, 0]) for p in src] == [0, 1, 2]
    writer = ZarrStackWriter(tmp_path / "short.zarr", shape=(3, 8, 8), dtype=np.uint8)
    writer.write_page(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="1 of 3 pages"):
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]


def test_existing_output_is_replaced_only_on_close_and_kept_on_abort(tmp_path):
    out = tmp_path / "o.zarr"
    with ZarrStackWriter(out, shape=(4, 4), dtype=np.uint8) as writer:
        writer.write_page(np.ones((4, 4), np.uint8))
    with pytest.raises(RuntimeError):
        with ZarrStackWriter(out, shape=(4, 4), dtype=np.uint8) as writer:
            writer.write_page(np.full((4, 4), 2, np.uint8))
            assert open_image(out).page(0)[0, 0] == 1  # the old store is untouched while writing
            raise RuntimeError("killed")
    assert open_image(out).page(0)[0, 0] == 1
    with ZarrStackWriter(out, shape=(4, 4), dtype=np.uint8) as writer:
        writer.write_page(np.full((4, 4), 3, np.uint8))
    assert open_image(out).page(0)[0, 0] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]


def test_bad_pages_are_refused(tmp_path):
    writer = ZarrStackWriter(tmp_path / "o.zarr", shape=(2, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        writer.write_page(np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        writer.write_page(np.full((4, 4), 300, np.int32))
    with pytest.raises(ValueError, match="cannot be stored"):
        writer.write_page(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="outside"):
        writer.write_page(np.zeros((4, 4), np.uint8), index=2)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_stack_writer_picks_the_format_by_suffix(tmp_path):
    z = stack_writer(tmp_path / "a.zarr", shape=(4, 4), dtype=np.uint8)
    t = stack_writer(tmp_path / "a.tif", shape=(4, 4), dtype=np.uint8)
    assert isinstance(z, ZarrStackWriter) and isinstance(t, TiffStackWriter)
    z.abort()
    t.abort()


# ------------------------------------------------------------------ reading

def test_ome_zarr_from_another_tool_tczyx_with_multi_page_chunks(tmp_path, rng):
    data = rng.integers(0, 65535, (1, 1, 10, 24, 20), dtype=np.uint16)
    path = write_ome(tmp_path / "vol.ome.zarr", data, "tczyx", [1, 1, 0.05, 0.004, 0.004],
                     chunks=(1, 1, 4, 24, 20))
    with open_image(path) as src:
        assert src.shape == (10, 24, 20) and src.is_stack and src.dtype == np.uint16
        assert src.pixel_size_nm == pytest.approx(4.0)
        for i in (9, 0, 5, 4, 3):  # out of order, across chunk slabs
            np.testing.assert_array_equal(src.page(i), data[0, 0, i])
    with open_image(path, pixel_size_nm=2.0) as src:
        assert src.pixel_size_nm == 2.0


def test_ome_zarr_0_5_in_zarr_format_3(tmp_path, rng):
    data = rng.integers(0, 255, (3, 16, 12), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "v3.zarr"), mode="w", zarr_format=3)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "z", "type": "space"}, {"name": "y", "type": "space", "unit": "nanometer"},
                 {"name": "x", "type": "space", "unit": "nanometer"}],
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [40, 3, 3]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2]}]}]}
    group.create_array("s0", data=data, chunks=(1, 16, 12))
    with open_image(tmp_path / "v3.zarr") as src:
        assert src.shape == (3, 16, 12) and src.pixel_size_nm == pytest.approx(6.0)
        np.testing.assert_array_equal(src.page(1), data[1])


def test_plain_arrays_groups_and_their_errors(tmp_path, rng):
    stack = rng.random((3, 16, 16), dtype=np.float32)
    zarr.create_array(str(tmp_path / "plain.zarr"), data=stack, chunks=(1, 16, 16))
    with open_image(tmp_path / "plain.zarr") as src:
        assert src.shape == (3, 16, 16)
        np.testing.assert_array_equal(src.page(2), stack[2])
    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    group.create_array("raw", data=stack)
    group.create_array("labels", data=stack.astype(np.uint8))
    with pytest.raises(InputError, match=r"2 arrays \(labels, raw\).*two.zarr/labels"):
        open_image(tmp_path / "two.zarr")
    with open_image(tmp_path / "two.zarr" / "raw") as src:  # pointing at one array works
        assert src.shape == (3, 16, 16)
    write_ome(tmp_path / "multichannel.zarr", np.zeros((2, 3, 8, 8), np.uint8), "czyx", [1, 1, 1, 1])
    with pytest.raises(InputError, match="multichannel.zarr.*dimensions"):
        open_image(tmp_path / "multichannel.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match="empty.zarr"):
        open_image(tmp_path / "empty.zarr")


def test_zarr_stores_are_single_inputs_of_expand_inputs(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    with ZarrStackWriter(folder / "b.zarr", shape=(4, 4), dtype=np.uint8) as writer:
        writer.write_page(np.zeros((4, 4), np.uint8))
    (folder / "a.tif").write_bytes(b"")
    (folder / "notes").mkdir()
    files, errors = expand_inputs([folder, folder / "b.zarr"])
    assert errors == [] and [f.name for f in files] == ["a.tif", "b.zarr"]
    assert is_zarr(folder / "b.zarr") and not is_zarr(folder / "notes") and not is_zarr(folder / "a.tif")


def test_predict_file_reads_zarr_and_writes_a_tiff_mask(tmp_path, tiny_model, rng):
    import tifffile

    from emseg.infer.runner import predict_file
    data = rng.integers(0, 255, (2, 48, 40), dtype=np.uint8)
    write_ome(tmp_path / "in.zarr", data, "zyx", [1, 0.005, 0.005])
    result = predict_file(tiny_model.predictor(), tmp_path / "in.zarr", tmp_path / "out", overlay=False)
    mask = tifffile.imread(result.outputs.mask)
    np.testing.assert_array_equal(mask, tiny_model.predict(data))


def test_missing_zarr_names_the_install_command(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "zarr":
            raise ImportError("no zarr")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(sys.modules, "zarr")
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(InputError, match=r"x.zarr.*pip install"):
        open_image(tmp_path / "x.zarr")
    with pytest.raises(InputError, match="pip install"):
        ZarrStackWriter(tmp_path / "y.zarr", shape=(4, 4), dtype=np.uint8)
