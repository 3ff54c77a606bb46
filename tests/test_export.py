"""Exported TorchScript/ONNX networks reproduce emseg's own output; the bioimage.io package validates.

Tolerance: the exported networks' probabilities must equal emseg's (``Model.predict`` on the same
tile, one tile, no overlap) within 1e-4 absolute. Measured on the tiny test model on CPU, tiles of 64, 96
and 256 px: TorchScript max 6e-8, ONNX Runtime max 2e-6, argmax labels identical.
"""

from __future__ import annotations

import argparse
import json
import zipfile

import numpy as np
import pytest
import torch

from emseg.cli.export import add_parser, run_cli
from emseg.infer.preprocess import normalize_page
from emseg.model.export import export_onnx, export_torchscript

ATOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
SIZES = (64, 96)  # two tile sides (multiples of 32): the exports have dynamic height and width


def _tile(side, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (side, side)).astype(np.uint8)


def _emseg_probabilities(model, tile):
    """emseg's own output on one whole tile: Model.predict with tile = the image, no overlap."""
    _, probs = model.predict(tile, tile=tile.shape[0], overlap=0, device="cpu", return_probabilities=True)
    return probs


def _normalised(model, tile):
    return normalize_page(tile, model.card.normalization)[None, None]


def test_torchscript_matches_emseg(tiny_model, tmp_path):
    path = export_torchscript(tiny_model, tmp_path / "m.pt")
    files = {"emseg_card.json": ""}
    ts = torch.jit.load(str(path), _extra_files=files)
    assert json.loads(files["emseg_card.json"])["encoder"] == "vgg11_bn_micro"
    for side in SIZES:
        tile = _tile(side)
        with torch.no_grad():
            out = ts(torch.from_numpy(_normalised(tiny_model, tile)))[0].numpy()
        assert out.shape == (3, side, side)
        np.testing.assert_allclose(out, _emseg_probabilities(tiny_model, tile), atol=ATOL, rtol=0)
    with torch.no_grad():  # non-square, batch of 2
        assert ts(torch.zeros(2, 1, 64, 128)).shape == (2, 3, 64, 128)


def test_onnx_matches_emseg(tiny_model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = export_onnx(tiny_model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == list(tiny_model.classes) and meta["output"] == "probabilities"
    for side in SIZES:
        tile = _tile(side, seed=side)
        out = session.run(None, {"input": _normalised(tiny_model, tile)})[0][0]
        np.testing.assert_allclose(out, _emseg_probabilities(tiny_model, tile), atol=ATOL, rtol=0)
    assert session.run(None, {"input": np.zeros((2, 1, 64, 128), np.float32)})[0].shape == (2, 3, 64, 128)


def test_logits_option(tiny_model, tmp_path):
    ts = torch.jit.load(str(export_torchscript(tiny_model, tmp_path / "l.pt", probabilities=False)))
    x = torch.from_numpy(_normalised(tiny_model, _tile(64)))
    with torch.no_grad():
        np.testing.assert_allclose(ts(x).numpy(), tiny_model.net(x).numpy(), atol=1e-5)


def test_cli_export_torchscript(tiny_model, tmp_path):
    model_file = tiny_model.save(tmp_path / "tiny.safetensors")
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args([str(model_file), "--format", "torchscript", "-o", str(tmp_path / "out.pt")])
    assert run_cli(args) == 0 and (tmp_path / "out.pt").is_file()
    args = parser.parse_args([str(tmp_path / "missing.safetensors"), "--format", "torchscript", "-o",
                              str(tmp_path / "x.pt")])
    assert run_cli(args) == 1 and not (tmp_path / "x.pt").exists()


def test_export_warns_that_the_label_offset_stays_behind(tiny_model, tmp_path, caplog):
    from emseg.model.export import export_model
    plain = tiny_model.save(tmp_path / "plain.safetensors")
    moved = tiny_model.save(tmp_path / "moved.safetensors", tiny_model.card.updated(label_offset=(-0.6, 0.2)))
    caplog.set_level("WARNING", logger="emseg.model.export")
    export_model(plain, "torchscript", tmp_path / "plain.pt")
    assert "label_offset" not in caplog.text
    export_model(moved, "torchscript", tmp_path / "moved.pt")
    assert "moved.safetensors" in caplog.text and "label_offset" in caplog.text


def test_missing_optional_dependency_names_the_extra(tiny_model, tmp_path, monkeypatch):
    import builtins

    from emseg.errors import EmsegError
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnx":
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(__import__("sys").modules, "onnx", raising=False)
    with pytest.raises(EmsegError, match=r'pip install "emseg\[export\]"'):
        export_onnx(tiny_model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def bioimageio_package(tmp_path_factory):
    """A tiny model with a pixel size and training notes, exported once as a bioimage.io zip."""
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("onnx")
    from emseg.model.card import ModelCard
    from emseg.model.export import export_bioimageio
    from emseg.model.modelfile import Model
    torch.manual_seed(0)
    card = ModelCard(encoder="vgg11_bn_micro", classes=("background", "membrane", "mitochondrion"), tile_size=64,
                     overlap=16, pixel_size_nm=6.0, training={"epochs": 3, "images": ["a.tif", "b.tif"]})
    path = tmp_path_factory.mktemp("bioimageio") / "tiny.zip"
    return export_bioimageio(Model.new(card), path, authors=["Test Author"])


@pytest.mark.slow  # the shared package fixture takes ~8-12 s on two CPU cores
def test_bioimageio_package_validates(bioimageio_package):
    import bioimageio.spec as spec
    descr = spec.load_description(bioimageio_package, perform_io_checks=True)
    assert not isinstance(descr, spec.InvalidDescr), descr.validation_summary.format()
    assert descr.validation_summary.status in ("passed", "valid-format")
    inp, out = descr.inputs[0], descr.outputs[0]
    assert [str(a.id) for a in inp.axes] == ["batch", "channel", "y", "x"]
    for axis in inp.axes[2:]:
        assert axis.scale == 6.0 and axis.unit == "nanometer"
    assert [p.id for p in inp.preprocessing] == ["ensure_dtype", "scale_range", "clip", "scale_linear",
                                                 "ensure_dtype"][:len(inp.preprocessing)]
    assert [p.id for p in out.postprocessing][:1] == ["softmax"]
    assert out.axes[1].channel_names == ["background", "membrane", "mitochondrion"]
    assert descr.weights.torchscript is not None and descr.weights.onnx is not None
    assert str(descr.license) == "MIT" and "epochs: 3" in descr.description
    names = zipfile.ZipFile(bioimageio_package).namelist()
    assert {"test_input.npy", "test_output.npy", "cover.png", "README.md", "rdf.yaml"} <= set(names)


@pytest.mark.slow
def test_bioimageio_preprocessing_reproduces_emseg(bioimageio_package):
    """The package's declared preprocessing, applied by hand, equals emseg's normalisation."""
    import io

    import bioimageio.spec as spec

    from emseg.model.card import Normalization
    descr = spec.load_description(bioimageio_package)
    raw = np.load(io.BytesIO(zipfile.ZipFile(bioimageio_package).read("test_input.npy")))[0, 0]
    x = raw.astype(np.float64)
    for step in descr.inputs[0].preprocessing:
        k = step.kwargs
        if step.id == "scale_range":
            lo, hi = np.percentile(x, [k.min_percentile, k.max_percentile])
            x = (x - lo) / (hi - lo + k.eps)
        elif step.id == "clip":
            x = np.clip(x, k.min, k.max)
        elif step.id == "scale_linear":
            x = x * k.gain + k.offset
    np.testing.assert_allclose(x, normalize_page(raw, Normalization()), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["onnx", "torchscript"])
def test_bioimageio_core_reproduces_test_outputs(bioimageio_package, weights):
    core = pytest.importorskip("bioimageio.core")
    summary = core.test_model(bioimageio_package, weight_format=weights)
    assert summary.status == "passed", summary.format()


@pytest.mark.slow
def test_bioimageio_without_pixel_size(tiny_model, tmp_path):
    """No pixel size on the card: y/x keep scale 1 without a unit, and the description says so."""
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("onnx")
    import bioimageio.spec as spec

    from emseg.model.export import export_bioimageio
    sample = np.random.default_rng(1).integers(0, 255, (80, 100)).astype(np.uint8)
    path = export_bioimageio(tiny_model, tmp_path / "nopx.zip", sample=sample, authors=["A"])
    descr = spec.load_description(path)
    assert not isinstance(descr, spec.InvalidDescr)
    assert all(a.scale == 1.0 and a.unit is None for a in descr.inputs[0].axes[2:])
    assert "no pixel size" in descr.description
    test_input = np.load(__import__("io").BytesIO(zipfile.ZipFile(path).read("test_input.npy")))
    assert test_input.shape == (1, 1, 64, 64)  # centre crop of the sample, a multiple of 32
