"""Bad input, interrupts and hostile files (issue 27, section 2), as a new user meets them.

Each test crafts small files in tmp_path and holds emseg to its promises: bad input gets one line
naming the file (or option, config key, model file), what is wrong and what to do, never a
traceback (except with -v); the other inputs still run and the exit code is 1 (2 for a bad option);
no input is ever modified; outputs appear whole or not at all; an interrupted run can be re-run or
resumed; nothing is ever unpickled. Hypothesis fuzzes the checks that take arbitrary values.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from emseg.cli import main
from emseg.errors import EmsegError, InputError, ModelFileError
from emseg.model.modelfile import load_card, load_model

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- helpers

@pytest.fixture
def model_file(tmp_path, tiny_model):
    """The tiny 3-class model, trained (the card says) at 6 nm per pixel."""
    return tiny_model.save(tmp_path / "tiny.safetensors", tiny_model.card.updated(pixel_size_nm=6.0))


def write_image(path, shape=(80, 60), pixel_size_nm=6.0, seed=0, dtype=np.uint8):
    data = np.random.default_rng(seed).integers(0, 200, shape).astype(dtype)
    tifffile.imwrite(path, data, photometric="minisblack",
                     resolution=(1e7 / pixel_size_nm, 1e7 / pixel_size_nm), resolutionunit="CENTIMETER")
    return path


def digest(*paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def errors_of(capsys) -> list[str]:
    """The stderr lines of the last command; none of them may be part of a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("emseg") for line in lines), err  # one line each, no continuation lines
    return lines


def one_line_about(lines, name: str, *words: str) -> str:
    """The one error line naming ``name``; it must hold every word."""
    hits = [line for line in lines if name in line]
    assert len(hits) == 1, (name, lines)
    assert all(w.lower() in hits[0].lower() for w in words), (words, hits[0])
    return hits[0]


def no_model_loaded(monkeypatch):
    """Make loading a model fail the test: an output problem must be found before any work."""
    import emseg.model.modelfile

    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the output location was checked")
    monkeypatch.setattr(emseg.model.modelfile, "load_model", refuse)


# ---------------------------------------------------------------- one bad input, the others run

def test_truncated_rgb_tiff_is_one_line_and_the_rest_run(tmp_path, model_file, capsys):
    rgb = np.random.default_rng(0).integers(0, 255, (256, 256, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    (tmp_path / "t.tif").write_bytes((tmp_path / "rgb.tif").read_bytes()[:100_000])
    good = write_image(tmp_path / "good.tif")
    before = digest(tmp_path / "t.tif", good)
    assert main(["-q", "predict", str(model_file), str(tmp_path / "t.tif"), str(good), "-o", str(tmp_path / "o")]) == 1
    one_line_about(errors_of(capsys), "t.tif", "complete")
    assert (tmp_path / "o" / "good_mask.tif").exists()
    assert digest(tmp_path / "t.tif", good) == before


def test_absurd_pixel_size_in_a_file_is_refused_before_allocating(tmp_path, model_file, capsys):
    write_image(tmp_path / "coarse.tif", pixel_size_nm=5000.0)  # 833x the model's 6 nm: a 7e15-pixel page
    write_image(tmp_path / "good.tif")
    assert main(["-q", "predict", str(model_file), str(tmp_path / "coarse.tif"), str(tmp_path / "good.tif"),
                 "-o", str(tmp_path / "o")]) == 1
    one_line_about(errors_of(capsys), "coarse.tif", "pixel size", "5000", "--pixel-size")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["good_mask.tif", "good_overlay.png"]


def test_a_rescaled_page_larger_than_memory_is_refused(tmp_path, model_file, capsys, monkeypatch):
    import emseg.infer.preprocess
    monkeypatch.setattr(emseg.infer.preprocess, "_physical_memory", lambda: 10_000_000)  # a 10 MB machine
    write_image(tmp_path / "a.tif", shape=(200, 200), pixel_size_nm=60.0)  # 10x: 2000x2000 x 5 planes = 80 MB
    assert main(["-q", "predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o")]) == 1
    one_line_about(errors_of(capsys), "a.tif", "2000x2000", "GB", "memory")


@FUZZ
@given(image_nm=st.floats(min_value=1e-6, max_value=1e7), model_nm=st.floats(min_value=1e-3, max_value=1e4),
       height=st.integers(1, 5000), width=st.integers(1, 5000))
def test_the_rescale_check_refuses_with_one_error_or_bounds_the_page(image_nm, model_nm, height, width):
    from emseg.infer.preprocess import MAX_RESCALE, check_rescale, rescale_factor, scaled_shape
    try:
        check_rescale("x.tif", (height, width), image_nm, model_nm, channels=4)
    except InputError as exc:
        assert str(exc).startswith("x.tif: ") and "--pixel-size" in str(exc)
        return
    factor = rescale_factor(image_nm, model_nm)
    assert 1 / MAX_RESCALE <= factor <= MAX_RESCALE
    h, w = scaled_shape((height, width), factor)
    assert h <= MAX_RESCALE * height + 1 and w <= MAX_RESCALE * width + 1


@pytest.mark.parametrize("value", ["1e6", "1e300", "1e-300", "0", "-6", "nan", "inf", "6nm"])
def test_pixel_size_option_out_of_range_is_a_usage_error(tmp_path, model_file, capsys, value):
    write_image(tmp_path / "a.tif")
    assert main(["-q", "predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o"),
                 f"--pixel-size={value}"]) == 2
    one_line_about(errors_of(capsys), "--pixel-size", value)
    assert not (tmp_path / "o").exists()


def test_an_unexpected_failure_of_one_input_is_one_line(tmp_path, model_file, capsys, monkeypatch):
    import emseg.infer.runner
    real = emseg.infer.runner.predict_file

    def flaky(predictor, path, *args, **kwargs):
        if path.name == "bad.tif":
            raise MemoryError("cannot allocate 182 GB")
        return real(predictor, path, *args, **kwargs)
    monkeypatch.setattr(emseg.infer.runner, "predict_file", flaky)
    for name in ("bad.tif", "good.tif"):
        write_image(tmp_path / name)
    args = ["predict", str(model_file), str(tmp_path / "bad.tif"), str(tmp_path / "good.tif"), "-o", str(tmp_path / "o")]
    assert main(["-q", *args]) == 1
    one_line_about(errors_of(capsys), "bad.tif", "MemoryError", "-v")
    assert (tmp_path / "o" / "good_mask.tif").exists()
    assert main(["-v", *args, "--overwrite"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------- output locations, before any work

def _output_cases(tmp_path, model_file):
    image = write_image(tmp_path / "img.tif")
    tifffile.imwrite(tmp_path / "msk.tif", np.random.default_rng(1).integers(0, 3, (80, 60)).astype(np.uint8))
    (tmp_path / "afile").write_text("not a folder")
    images = ["--images", str(image), "--masks", str(tmp_path / "msk.tif")]
    return {
        "predict -o FILE": (["predict", str(model_file), str(image), "-o", str(tmp_path / "afile")], "afile"),
        "predict -o FILE/sub": (["predict", str(model_file), str(image), "-o", str(tmp_path / "afile" / "sub")],
                                "afile"),
        "evaluate -o FILE": (["evaluate", str(model_file), *images, "-o", str(tmp_path / "afile")], "afile"),
        "measure -o FILE": (["measure", str(tmp_path / "msk.tif"), "-o", str(tmp_path / "afile")], "afile"),
        "export -o FILE/x.pt": (["export", str(model_file), "--format", "torchscript", "-o",
                                 str(tmp_path / "afile" / "x.pt")], "x.pt"),
        "export -o FOLDER": (["export", str(model_file), "--format", "torchscript", "-o", str(tmp_path)], "folder"),
        "export -o MODEL": (["export", str(model_file), "--format", "onnx", "-o", str(model_file)], "overwrite"),
        "augment-preview -o FILE/x.png": (["augment-preview", *images, "-o", str(tmp_path / "afile" / "x.png")],
                                          "x.png"),
    }


@pytest.mark.parametrize("case", ["predict -o FILE", "predict -o FILE/sub", "evaluate -o FILE", "measure -o FILE",
                                  "export -o FILE/x.pt", "export -o FOLDER", "export -o MODEL",
                                  "augment-preview -o FILE/x.png"])
def test_an_output_location_that_cannot_be_written_is_one_line_before_any_work(
        tmp_path, model_file, capsys, monkeypatch, case):
    args, words = _output_cases(tmp_path, model_file)[case]
    before = digest(model_file, tmp_path / "afile")
    no_model_loaded(monkeypatch)
    assert main(["-q", *args]) == 1
    lines = errors_of(capsys)
    assert len(lines) == 1 and words in lines[0], lines
    assert digest(model_file, tmp_path / "afile") == before


def test_a_read_only_output_folder_is_one_line(tmp_path, model_file, capsys, monkeypatch):
    """Simulated (root may write anywhere): the write test in the folder is refused."""
    from types import SimpleNamespace

    import emseg.io.write

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(emseg.io.write, "tempfile", SimpleNamespace(mkstemp=denied))
    no_model_loaded(monkeypatch)
    write_image(tmp_path / "a.tif")
    (tmp_path / "ro").mkdir()
    assert main(["-q", "predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "ro")]) == 1
    one_line_about(errors_of(capsys), "ro", "cannot write", "Permission denied", "-o")
    assert main(["-q", "export", str(model_file), "--format", "torchscript", "-o", str(tmp_path / "ro" / "m.pt")]) == 1
    one_line_about(errors_of(capsys), "m.pt", "cannot write", "-o")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="file permissions do not bind root (or this OS): the simulated test above covers it")
def test_a_real_read_only_output_folder_is_one_line(tmp_path, model_file, capsys):
    write_image(tmp_path / "a.tif")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["-q", "predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(ro)]) == 1
        one_line_about(errors_of(capsys), "ro", "cannot write")
        assert main(["-q", "export", str(model_file), "--format", "torchscript", "-o", str(ro / "m.pt")]) == 1
        one_line_about(errors_of(capsys), "m.pt", "cannot write")
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- options and YAML config keys

@pytest.fixture
def stacks(tmp_path):
    from emseg.synthetic import make_em_stack
    image, mask = make_em_stack(pages=2, height=96, width=128, seed=3)
    tifffile.imwrite(tmp_path / "img.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "msk.tif", mask, photometric="minisblack")
    return tmp_path / "img.tif", tmp_path / "msk.tif"


BAD_OPTIONS = [
    ("predict", ["--device", "bogus"], "--device"),
    ("predict", ["--tile", "0"], "--tile"),
    ("predict", ["--tile", "64.0"], "--tile"),
    ("predict", ["--tile", "100"], "multiple of 32"),
    ("predict", ["--overlap", "-5"], "--overlap"),
    ("predict", ["--batch-size", "0"], "--batch-size"),
    ("predict", ["--min-size", "-1"], "--min-size"),
    ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--steps", "0"], "--steps"),
    ("train", ["--steps", "-5"], "--steps"),
    ("train", ["--tile-size", "7"], "--tile-size"),
    ("train", ["--classes", "bg,bg,mem"], "--classes"),
    ("train", ["--classes", "onlyone"], "--classes"),
    ("train", ["--lr", "fast"], "--lr"),
    ("train", ["--val-fraction", "1.5"], "--val-fraction"),
    ("train", ["--device", "bogus"], "--device"),
    ("train", ["--encoder", "resnet9000"], "--encoder"),
    ("evaluate", ["--tile", "0"], "--tile"),
    ("measure", ["--pixel-size", "-1"], "--pixel-size"),
]


@pytest.mark.parametrize("command, option, name", BAD_OPTIONS, ids=[f"{c} {' '.join(o)}" for c, o, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_naming_it(tmp_path, model_file, stacks, capsys, command, option, name):
    img, msk = stacks
    base = {"predict": ["predict", str(model_file), str(img), "-o", str(tmp_path / "o")],
            "train": ["train", "--images", str(img), "--masks", str(msk), "-o", str(tmp_path / "o")],
            "evaluate": ["evaluate", str(model_file), "--images", str(img), "--masks", str(msk)],
            "measure": ["measure", str(msk), "-o", str(tmp_path / "o")]}[command]
    assert main(["-q", *base, *option]) == 2
    lines = errors_of(capsys)
    assert len(lines) == 1 and name in lines[0] and "--help" in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_overlap_not_below_the_tile_names_both_options(tmp_path, tiny_model, capsys):
    model = tiny_model.save(tmp_path / "m.safetensors", tiny_model.card.updated(tile_size=64, overlap=32))
    write_image(tmp_path / "a.tif")
    assert main(["-q", "predict", str(model), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o"), "--tile", "32"]) == 1
    one_line_about(errors_of(capsys), "--tile 32", "the model's overlap 32")
    assert main(["-q", "predict", str(model), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o"), "--overlap", "64"]) == 1
    one_line_about(errors_of(capsys), "--overlap 64", "the model's tile 64")


def test_a_bad_device_from_python_is_a_value_error(tiny_model):
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        tiny_model.predict(np.zeros((64, 64), np.float32), device="bogus")


BAD_YAML = ["lr: [1, 2]", "lr: fast", "steps: abc", "classes: 5", "classes: abc", "augment: 5", "batch_size: -4",
            "tile_size: 7", "sparse: 3", "augment_preset: strong", "seed: -1", "ema_decay: 1.5", "device: bogus",
            "encoder: resnet9000", "pixel_size_nm: 1e300", "name: [a]"]


@pytest.mark.parametrize("text", BAD_YAML)
def test_a_bad_yaml_value_names_the_file_and_the_key(tmp_path, stacks, capsys, text):
    img, msk = stacks
    (tmp_path / "run.yaml").write_text(text + "\n")
    assert main(["-q", "train", "--images", str(img), "--masks", str(msk), "--config", str(tmp_path / "run.yaml"),
                 "-o", str(tmp_path / "o")]) == 1
    key = text.split(":")[0]
    one_line_about(errors_of(capsys), "run.yaml", f"run.yaml: {key}:")
    assert not (tmp_path / "o").exists()


def test_yaml_numbers_pyyaml_reads_as_text_are_numbers(tmp_path):
    from emseg.cli.app import build_parser
    from emseg.cli.train import train_config
    (tmp_path / "run.yaml").write_text("lr: 1e-3\nsteps: 10\nclasses: [bg, membrane]\nfreeze_bn: null\n"
                                       "augment:\n  noise: 0\n")
    args = build_parser().parse_args(["train", "--images", "x", "--masks", "y", "-o", "o",
                                      "--config", str(tmp_path / "run.yaml")])
    config = train_config(args)
    assert config.lr == 1e-3 and config.steps == 10 and config.classes == ("bg", "membrane")
    assert config.augment.noise == 0


@FUZZ
@given(value=st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(), st.none(),
                       st.lists(st.integers(), max_size=3)),
       key=st.sampled_from(["lr", "steps", "batch_size", "tile_size", "classes", "val_fraction", "seed", "sparse",
                            "device", "time_limit_minutes", "ema_decay", "loader_workers", "name"]))
def test_any_yaml_value_is_taken_or_refused_with_its_key(tmp_path, key, value):
    from emseg.cli.train import _yaml_value
    try:
        _yaml_value(tmp_path / "c.yaml", key, value)
    except InputError as exc:
        assert f"c.yaml: {key}: " in str(exc)


# ---------------------------------------------------------------- model cards and weights

def _folder_model(tmp_path, tiny_model, edit):
    folder = tiny_model.save(tmp_path / "model")
    card = json.loads((folder / "card.json").read_text())
    edit(card)
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def _set(*keys_value):
    *keys, value = keys_value

    def edit(card):
        d = card
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


BAD_CARDS = {
    "pixel size -6": (_set("pixel_size_nm", -6), "pixel_size_nm"),
    "pixel size 1e300": (_set("pixel_size_nm", 1e300), "pixel_size_nm"),
    "pixel size 1e-300": (_set("pixel_size_nm", 1e-300), "pixel_size_nm"),
    "pixel size '6nm'": (_set("pixel_size_nm", "6nm"), "pixel_size_nm"),
    "std 0": (_set("normalization", "std", 0), "std"),
    "mean NaN": (_set("normalization", "mean", float("nan")), "mean"),
    "label offset 1e9": (_set("label_offset", [1e9, -1e9]), "label_offset"),
    "tile 7": (_set("tile_size", 7), "tile_size"),
    "tile 0": (_set("tile_size", 0), "tile_size"),
    "tile -512": (_set("tile_size", -512), "tile_size"),
    "overlap -5": (_set("overlap", -5), "overlap"),
    "overlap 1e9": (_set("overlap", 10**9), "overlap"),
    "classes 'abc'": (_set("classes", "abc"), "classes"),
    "classes twice": (_set("classes", ["bg", "bg", "mito"]), "more than once"),
    "training not a dict": (_set("training", "not a dict"), "training"),
    "in_channels 0": (_set("in_channels", 0), "in_channels"),
}


@pytest.mark.parametrize("case", list(BAD_CARDS))
def test_a_card_with_absurd_values_is_refused_naming_the_file(tmp_path, tiny_model, capsys, case):
    edit, words = BAD_CARDS[case]
    folder = _folder_model(tmp_path, tiny_model, edit)
    with pytest.raises(ModelFileError, match=words) as info:
        load_model(folder)
    assert str(info.value).startswith(str(folder))
    write_image(tmp_path / "a.tif")
    assert main(["-q", "predict", str(folder), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o")]) == 1
    one_line_about(errors_of(capsys), str(folder), words)


@pytest.mark.parametrize("case", ["std 0", "training not a dict"])
def test_export_of_a_bad_card_is_one_line(tmp_path, tiny_model, capsys, case):
    folder = _folder_model(tmp_path, tiny_model, BAD_CARDS[case][0])
    assert main(["-q", "export", str(folder), "--format", "bioimageio", "-o", str(tmp_path / "m.zip")]) == 1
    one_line_about(errors_of(capsys), str(folder), BAD_CARDS[case][1])


CARD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(), st.text(max_size=6),
                        st.lists(st.one_of(st.text(max_size=3), st.floats(), st.integers()), max_size=4),
                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@FUZZ
@given(key=st.sampled_from(["pixel_size_nm", "tile_size", "overlap", "classes", "label_offset", "in_channels",
                            "decoder_channels", "training", "name", "encoder", "full_resolution_skip",
                            "decoder_upsampling", "normalization"]), value=CARD_VALUES)
def test_any_card_value_loads_as_a_sane_card_or_is_refused_naming_the_file(tmp_path, tiny_model, key, value):
    folder, original = tmp_path / "fuzz", tmp_path / "card.original.json"
    if not original.exists():
        tiny_model.save(folder)
        (folder / "card.json").replace(original)
    card = json.loads(original.read_text())
    card[key] = value
    (folder / "card.json").write_text(json.dumps(card))
    try:
        loaded = load_card(folder)
    except ModelFileError as exc:
        assert str(exc).startswith(str(folder))
        return
    assert loaded.tile_size % 32 == 0 and 0 <= loaded.overlap < loaded.tile_size
    assert loaded.pixel_size_nm is None or 0 < loaded.pixel_size_nm <= 10_000
    assert len(set(loaded.classes)) == len(loaded.classes) >= 2
    assert all(np.isfinite(loaded.label_offset)) and isinstance(loaded.training, dict)
    assert np.isfinite(loaded.normalization.std) and loaded.normalization.std > 0


def test_non_finite_weights_are_refused(tmp_path, tiny_model, capsys):
    path = tiny_model.save(tmp_path / "nan.safetensors")
    state = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        load_model(path)
    write_image(tmp_path / "a.tif")
    assert main(["-q", "predict", str(path), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o")]) == 1
    one_line_about(errors_of(capsys), "nan.safetensors", "NaN")


# ---------------------------------------------------------------- pickles and YAML tags are never run

class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".pkl", ".ckpt", ".bin"])
@pytest.mark.parametrize("kind", ["pickle", "torch zip", "torch legacy"])
def test_pickles_are_refused_without_running_them(tmp_path, capsys, suffix, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"weights": _Payload(marker)}, path, _use_new_zipfile_serialization=kind == "torch zip")
    with pytest.raises(ModelFileError):
        load_model(path)
    with pytest.raises(ModelFileError):
        load_card(path)
    write_image(tmp_path / "a.tif")
    assert main(["-q", "predict", str(path), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o")]) == 1
    one_line_about(errors_of(capsys), path.name)
    assert not marker.exists(), "a pickle was unpickled"


def test_python_yaml_tags_are_refused(tmp_path, stacks, capsys):
    img, msk = stacks
    marker = tmp_path / "pwned"
    (tmp_path / "run.yaml").write_text(f"steps: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    assert main(["-q", "train", "--images", str(img), "--masks", str(msk), "--config", str(tmp_path / "run.yaml"),
                 "-o", str(tmp_path / "o")]) == 1
    one_line_about(errors_of(capsys), "run.yaml", "YAML")
    assert not marker.exists()


def test_a_crafted_huge_tiff_header_is_one_line(tmp_path, model_file, capsys):
    """A 64x64 TIFF whose tags claim 100000 x 100000 pixels."""
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((64, 64), np.uint8))
    data = bytearray((tmp_path / "small.tif").read_bytes())
    with tifffile.TiffFile(tmp_path / "small.tif") as tif:
        tags = tif.pages[0].tags
        offsets = {name: tags[name].valueoffset for name in ("ImageWidth", "ImageLength", "RowsPerStrip",
                                                              "StripByteCounts")}
    for name, value in (("ImageWidth", 100_000), ("ImageLength", 100_000), ("RowsPerStrip", 100_000),
                        ("StripByteCounts", 2**32 - 1)):
        struct.pack_into("<I", data, offsets[name], value)
    (tmp_path / "huge.tif").write_bytes(bytes(data))
    write_image(tmp_path / "good.tif")
    assert main(["-q", "predict", str(model_file), str(tmp_path / "huge.tif"), str(tmp_path / "good.tif"),
                 "-o", str(tmp_path / "o")]) == 1
    one_line_about(errors_of(capsys), "huge.tif", "complete")
    assert (tmp_path / "o" / "good_mask.tif").exists()


# ---------------------------------------------------------------- interrupts and re-runs

def test_the_outputs_of_one_input_are_one_unit_on_a_re_run(tmp_path, model_file, caplog):
    write_image(tmp_path / "a.tif", shape=(3, 80, 60))
    out = tmp_path / "o"
    args = ["predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(out)]
    assert main(args) == 0
    mask, overlay = out / "a_mask.tif", out / "a_overlay.png"
    first = overlay.read_bytes()

    def stamp():
        return mask.stat().st_ino, mask.stat().st_mtime_ns
    written = stamp()
    overlay.unlink()  # as if killed between the mask's rename and the overlay's write (an older emseg)
    assert main(args) == 0
    assert overlay.read_bytes() == first and stamp() == written  # remade from the mask alone
    assert "made the missing" in caplog.text
    assert main(args + ["--probabilities"]) == 0  # the probabilities are missing: segmented again
    assert (out / "a_probs.tif").exists() and stamp() != written
    assert main(args + ["--probabilities"]) == 0
    assert "skipped" in caplog.text


def test_the_mask_is_renamed_last(tmp_path, model_file, monkeypatch, capsys):
    """A failure (or kill) before the overlay is written leaves no mask, so the re-run redoes the input."""
    import emseg.infer.runner

    def fail(*_a, **_k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(emseg.infer.runner, "write_overlay_png", fail)
    write_image(tmp_path / "a.tif")
    assert main(["-q", "predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o"),
                 "--probabilities"]) == 1
    one_line_about(errors_of(capsys), "a.tif", "No space left")
    assert not (tmp_path / "o" / "a_mask.tif").exists()
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_files_of_dead_processes_are_removed(tmp_path, model_file):
    from emseg.io.write import _HOST_TAG
    out = tmp_path / "o"
    out.mkdir()
    dead, alive = _dead_pid(), os.getpid()
    stale = [out / f".a_mask.partial-{dead}-0-h{_HOST_TAG}.tif", out / f".b_mask.partial-{dead}-3.tif",
             out / f".c_mask.zarr.old-{dead}"]
    kept = [out / f".a_mask.partial-{alive}-1-h{_HOST_TAG}.tif",  # a live process (this one)
            out / f".a_mask.partial-{dead}-0-h{'0' * 6 if _HOST_TAG != '0' * 6 else '1' * 6}.tif",  # another machine
            out / ".notes.txt"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    (out / f".d_mask.partial-{dead}-0-h{_HOST_TAG}.zarr").mkdir()
    stale.append(out / f".d_mask.partial-{dead}-0-h{_HOST_TAG}.zarr")
    write_image(tmp_path / "a.tif")
    assert main(["-q", "predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(out)]) == 0
    assert not [p for p in stale if p.exists()]
    assert all(p.exists() for p in kept)


def _emseg(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.Popen([sys.executable, "-m", "emseg.cli", "-q", *args], env=env, stderr=subprocess.PIPE,
                            **kwargs)


@pytest.mark.slow
def test_a_killed_predict_leaves_no_output_and_the_re_run_equals_a_clean_run(tmp_path, model_file):
    write_image(tmp_path / "a.tif", shape=(8, 128, 128))
    clean = _emseg("predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "clean"), "--device", "cpu")
    assert clean.wait() == 0
    out = tmp_path / "o"
    proc = _emseg("predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(out), "--device", "cpu")
    partial = None
    while partial is None and proc.poll() is None:
        partial = next(iter(out.glob(".a_mask.partial-*")), None) if out.exists() else None
        time.sleep(0.005)
    assert partial is not None, "the run ended before its partial file was seen"
    proc.kill()
    proc.wait()
    assert not (out / "a_mask.tif").exists() and partial.exists()
    rerun = _emseg("predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(out), "--device", "cpu")
    assert rerun.wait() == 0
    assert not partial.exists(), "the killed run's partial file was not cleaned up"
    assert (out / "a_mask.tif").read_bytes() == (tmp_path / "clean" / "a_mask.tif").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.tif", "a_overlay.png"]


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder_give_whole_identical_files(tmp_path, model_file):
    write_image(tmp_path / "a.tif", shape=(8, 128, 128))
    runs = [_emseg("predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o"), "--overwrite",
                   "--device", "cpu") for _ in range(2)]
    assert [r.wait() for r in runs] == [0, 0]
    assert _emseg("predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "clean"),
                  "--device", "cpu").wait() == 0
    assert (tmp_path / "o" / "a_mask.tif").read_bytes() == (tmp_path / "clean" / "a_mask.tif").read_bytes()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_mask.tif", "a_overlay.png"]


# ---------------------------------------------------------------- training runs and checkpoints

def _train_args(stacks, out, *extra):
    img, msk = stacks
    return ["-q", "train", "--images", str(img), "--masks", str(msk), "--tile-size", "64", "--batch-size", "2",
            "--steps", "2", "--val-every", "2", "--device", "cpu", "--encoder", "vgg11_bn_micro",
            "--classes", "background,membrane,mitochondrion", "--no-label-offset", "-o", str(out), *extra]


def test_train_into_a_folder_with_a_checkpoint_needs_resume(tmp_path, stacks, capsys):
    run = tmp_path / "run"
    assert main(_train_args(stacks, run)) == 0
    before = digest(*sorted(p for p in run.rglob("*") if p.is_file()))
    assert main(_train_args(stacks, run)) == 1
    one_line_about(errors_of(capsys), str(run), "checkpoint", "step 2", "--resume", "another folder")
    assert digest(*sorted(p for p in run.rglob("*") if p.is_file())) == before
    from emseg.train.loop import TrainConfig, annotations_from_arrays, train
    with pytest.raises(EmsegError, match="--resume"):
        train(annotations_from_arrays(np.zeros((64, 64)), np.ones((64, 64), np.uint8), sparse=True),
              TrainConfig(encoder="vgg11_bn_micro", steps=1), run)


def _checkpoint_parts():
    from emseg.train.loop import TrainConfig
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return net, optimizer, scheduler, TrainConfig(encoder="vgg11_bn_micro", classes=("bg", "fg"))


def _step(net, optimizer, scheduler):
    net(torch.randn(1, 1, 8, 8)).sum().backward()
    optimizer.step()
    scheduler.step()


def test_the_checkpoint_pair_is_one_unit(tmp_path, monkeypatch):
    """A kill after the tensors were renamed and before state.json was written must not pair new
    weights with an old step: the state travels inside the tensors file."""
    import emseg.train.checkpoint as ckpt
    net, optimizer, scheduler, config = _checkpoint_parts()
    folder = tmp_path / "checkpoint"
    _step(net, optimizer, scheduler)
    ckpt.save_checkpoint(folder, net, optimizer, scheduler, config, {"step": 2}, {}, config.classes)
    _step(net, optimizer, scheduler)
    weights_at_4 = {k: v.clone() for k, v in net.state_dict().items()}

    def killed(*_a, **_k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "atomic_output", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, net, optimizer, scheduler, config, {"step": 4}, {}, config.classes)
    assert json.loads((folder / "state.json").read_text())["state"]["step"] == 2  # the copy is behind
    fresh, optimizer2, scheduler2, _ = _checkpoint_parts()
    state = ckpt.load_checkpoint(folder, fresh, optimizer2, scheduler2, config)
    assert state["step"] == 4
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights_at_4.items())


def test_a_kill_while_the_checkpoint_is_written_keeps_the_previous_one(tmp_path, monkeypatch):
    import emseg.train.checkpoint as ckpt
    net, optimizer, scheduler, config = _checkpoint_parts()
    folder = tmp_path / "checkpoint"
    ckpt.save_checkpoint(folder, net, optimizer, scheduler, config, {"step": 2}, {}, config.classes)
    weights_at_2 = {k: v.clone() for k, v in net.state_dict().items()}
    _step(net, optimizer, scheduler)

    def killed(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, net, optimizer, scheduler, config, {"step": 4}, {}, config.classes)
    fresh, optimizer2, scheduler2, _ = _checkpoint_parts()
    assert ckpt.load_checkpoint(folder, fresh, optimizer2, scheduler2, config)["step"] == 2
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights_at_2.items())
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "tensors.safetensors"]


def test_a_checkpoint_of_an_older_emseg_still_resumes(tmp_path):
    """Older checkpoints kept the state in state.json only."""
    import emseg.train.checkpoint as ckpt
    net, optimizer, scheduler, config = _checkpoint_parts()
    folder = tmp_path / "checkpoint"
    ckpt.save_checkpoint(folder, net, optimizer, scheduler, config, {"step": 6}, {}, config.classes)
    save_file(load_file(str(folder / "tensors.safetensors")), str(folder / "tensors.safetensors"))  # no header
    fresh, optimizer2, scheduler2, _ = _checkpoint_parts()
    assert ckpt.load_checkpoint(folder, fresh, optimizer2, scheduler2, config)["step"] == 6
    assert ckpt.checkpoint_classes(folder) == ("bg", "fg")


def test_a_stray_mask_value_asks_for_classes(tmp_path, stacks, capsys):
    img, msk = stacks
    mask = tifffile.imread(msk)
    mask[0, 0, 0] = 200
    tifffile.imwrite(tmp_path / "stray.tif", mask, photometric="minisblack")
    assert main(["-q", "train", "--images", str(img), "--masks", str(tmp_path / "stray.tif"), "--steps", "1",
                 "-o", str(tmp_path / "run")]) == 1
    one_line_about(errors_of(capsys), "stray.tif", "200", "--classes")
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------- measure and evaluate

def test_measure_refuses_instance_labels_huge_and_negative_values_and_goes_on(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "inst_mask.tif", np.arange(256 * 256, dtype=np.uint32).reshape(256, 256)
                     .astype(np.uint16))
    huge = np.zeros((64, 64), np.uint32)
    huge[10:20, 10:20], huge[30, 30] = 1, 4_000_000_000
    tifffile.imwrite(tmp_path / "huge_mask.tif", huge)
    neg = np.zeros((64, 64), np.int16)
    neg[10:20, 10:20], neg[0, 0] = 1, -1
    tifffile.imwrite(tmp_path / "neg_mask.tif", neg)
    good = np.zeros((64, 64), np.uint8)
    good[10:20, 10:20] = 1
    tifffile.imwrite(tmp_path / "good_mask.tif", good)
    assert main(["-q", "measure", str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    lines = errors_of(capsys)
    one_line_about(lines, "inst_mask.tif", "instance-label", "65535 different")
    one_line_about(lines, "huge_mask.tif", "4000000000")
    one_line_about(lines, "neg_mask.tif", "negative", "-1")
    assert (tmp_path / "o" / "good_objects.csv").exists()
    assert "good" in (tmp_path / "o" / "summary.csv").read_text()


@FUZZ
@given(values=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=20), named=st.integers(0, 300))
def test_the_class_label_check_refuses_exactly_negative_and_too_many(values, named):
    from emseg.analysis.measure import MAX_CLASSES, check_class_labels
    mask = np.array(values, np.int64).reshape(1, -1)
    bad = min(values) < 0 or max(values) >= max(MAX_CLASSES, named)
    if bad:
        with pytest.raises(InputError, match="^m.tif: "):
            check_class_labels(mask, "m.tif", named)
    else:
        check_class_labels(mask, "m.tif", named)


def test_an_empty_mask_still_gets_a_summary_with_its_header(tmp_path):
    tifffile.imwrite(tmp_path / "empty_mask.tif", np.zeros((64, 64), np.uint8))
    assert main(["-q", "measure", str(tmp_path / "empty_mask.tif"), "-o", str(tmp_path / "o")]) == 0
    header = (tmp_path / "o" / "summary.csv").read_text().splitlines()
    assert header[0].startswith("input,class,count,") and "diameter_mean_px" in header[0]


def test_evaluate_sparse_with_nothing_annotated_says_so(tmp_path, model_file, stacks, capsys, monkeypatch):
    img, _ = stacks
    tifffile.imwrite(tmp_path / "none.tif", np.zeros((2, 96, 128), np.uint8))
    import emseg.infer.predictor

    def no_inference(*_a, **_k):
        raise AssertionError("inference ran although nothing is annotated")
    monkeypatch.setattr(emseg.infer.predictor.Predictor, "predict_page", no_inference)
    assert main(["-q", "evaluate", str(model_file), "--images", str(img), "--masks", str(tmp_path / "none.tif"),
                 "--sparse"]) == 1
    one_line_about(errors_of(capsys), "none.tif", "nothing to evaluate", "--sparse")


# ---------------------------------------------------------------- smaller ones

@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symbolic links")
def test_broken_and_looping_links_in_an_input_folder_are_named(tmp_path, model_file, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "good.tif")
    (folder / "loop.tif").symlink_to("loop.tif")
    (folder / "gone.tif").symlink_to("nowhere.tif")
    assert main(["-q", "predict", str(model_file), str(folder), "-o", str(tmp_path / "o")]) == 1
    lines = errors_of(capsys)
    one_line_about(lines, "loop.tif", "loops")
    one_line_about(lines, "gone.tif", "does not exist")
    assert (tmp_path / "o" / "good_mask.tif").exists()


def test_inputs_whose_outputs_share_a_name_are_left_out_and_the_others_run(tmp_path, model_file, capsys):
    from PIL import Image
    write_image(tmp_path / "rgb.tif")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "rgb.png")
    write_image(tmp_path / "other.tif")
    assert main(["-q", "predict", str(model_file), str(tmp_path / "rgb.tif"), str(tmp_path / "rgb.png"),
                 str(tmp_path / "other.tif"), "-o", str(tmp_path / "o")]) == 1
    lines = errors_of(capsys)
    one_line_about(lines, "rgb.tif: ", "rgb.png", "separate output folders")
    one_line_about(lines, "rgb.png: ", "rgb.tif")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["other_mask.tif", "other_overlay.png"]


def test_every_training_option_is_checked():
    """A TrainConfig field without a parser would reach the training loop unchecked from YAML."""
    import dataclasses

    from emseg.cli.train import OPTIONS
    from emseg.train.loop import TrainConfig
    assert {f.name for f in dataclasses.fields(TrainConfig)} - {"augment"} <= set(OPTIONS)
