"""`emseg predict`, `emseg models` and `emseg summary` end to end, in process."""

import numpy as np
import pytest
import tifffile

from emseg.cli import main
from emseg.io.read import open_image


@pytest.fixture
def model_file(tmp_path, tiny_model):
    return tiny_model.save(tmp_path / "tiny.safetensors")


def write_stack(path, pages=3, shape=(80, 60), dtype=np.uint8, pixel_size_nm=5.0, seed=0):
    data = np.random.default_rng(seed).integers(0, 200, (pages, *shape)).astype(dtype)
    tifffile.imwrite(path, data, photometric="minisblack",
                     resolution=(1e7 / pixel_size_nm, 1e7 / pixel_size_nm), resolutionunit="CENTIMETER")
    return data


def test_predict_writes_masks_with_pages_and_pixel_size(tmp_path, model_file):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_stack(inputs / "a.tif", pages=3)
    tifffile.imwrite(inputs / "b.tif", np.zeros((50, 70), np.uint16))
    before = (inputs / "a.tif").read_bytes()
    assert main(["-q", "predict", str(model_file), str(inputs), "-o", str(tmp_path / "out"), "--tile", "64"]) == 0
    with open_image(tmp_path / "out" / "a_mask.tif") as mask:
        assert mask.shape == (3, 80, 60) and mask.is_stack
        assert mask.pixel_size_nm == pytest.approx(5.0)
        assert mask.dtype == np.uint8 and mask.page(2).max() <= 2
    with open_image(tmp_path / "out" / "b_mask.tif") as mask:
        assert mask.shape == (1, 50, 70) and not mask.is_stack
    assert tifffile.TiffFile(tmp_path / "out" / "a_mask.tif").pages[0].compression != 1
    assert (tmp_path / "out" / "a_overlay.png").stat().st_size > 0
    assert (inputs / "a.tif").read_bytes() == before, "the input was modified"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_mask.tif", "a_overlay.png", "b_mask.tif", "b_overlay.png"]


def test_rerun_skips_finished_outputs_unless_overwrite(tmp_path, model_file, caplog):
    write_stack(tmp_path / "a.tif")
    args = ["predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out"), "--tile", "64"]
    assert main(args) == 0
    mask = tmp_path / "out" / "a_mask.tif"
    mtime = mask.stat().st_mtime_ns
    assert main(args) == 0
    assert mask.stat().st_mtime_ns == mtime
    assert "skipped" in caplog.text
    assert main(args + ["--overwrite"]) == 0
    assert mask.stat().st_mtime_ns != mtime


def test_probabilities_and_pixel_size_override(tmp_path, model_file):
    write_stack(tmp_path / "a.tif", pages=2)
    assert main(["predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out"),
                 "--probabilities", "--no-overlay", "--pixel-size", "2.5", "--tile", "64"]) == 0
    probs = tifffile.imread(tmp_path / "out" / "a_probs.tif")
    assert probs.shape == (2, 3, 80, 60) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert not (tmp_path / "out" / "a_overlay.png").exists()
    assert open_image(tmp_path / "out" / "a_mask.tif").pixel_size_nm == pytest.approx(2.5)


def _bad_inputs(folder):
    folder.mkdir()
    write_stack(folder / "good.tif")
    (folder / "truncated.tif").write_bytes(open(folder / "good.tif", "rb").read()[:3000])
    colour = np.random.default_rng(1).integers(0, 255, (40, 40, 3)).astype(np.uint8)
    tifffile.imwrite(folder / "rgb.tif", colour, photometric="rgb")  # grey saved as RGB is accepted; colour is not
    tifffile.imwrite(folder / "fourd.tif", np.zeros((2, 2, 3, 40, 40), np.uint8), photometric="minisblack")
    nan = np.ones((2, 40, 40), np.float32)
    nan[1, 5, 5] = np.nan
    tifffile.imwrite(folder / "nan.tif", nan, photometric="minisblack")
    return folder


def test_bad_inputs_each_get_one_line_and_the_rest_still_run(tmp_path, model_file, capsys):
    folder = _bad_inputs(tmp_path / "in")
    (tmp_path / "empty").mkdir()
    code = main(["-q", "predict", str(model_file), str(folder), str(tmp_path / "missing.tif"),
                 str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--tile", "64"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name, words in [("truncated.tif", "Is the file complete"), ("rgb.tif", "RGB"),
                        ("fourd.tif", "dimensions"), ("nan.tif", "NaN"), ("missing.tif", "not found"),
                        ("empty", "no supported")]:
        lines = [line for line in err.splitlines() if name in line]
        assert lines and any(words in line for line in lines), (name, err)
    out = tmp_path / "out"
    assert (out / "good_mask.tif").exists()
    assert sorted(p.name for p in out.iterdir() if "mask" in p.name) == ["good_mask.tif"], \
        "a failed input left a mask (or a partial file) behind"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_verbose_shows_the_traceback(tmp_path, model_file, capsys):
    folder = _bad_inputs(tmp_path / "in")
    main(["-v", "predict", str(model_file), str(folder / "nan.tif"), "-o", str(tmp_path / "out"), "--tile", "64"])
    assert "Traceback" in capsys.readouterr().err


def test_output_that_would_overwrite_an_input_is_refused(tmp_path, model_file, capsys):
    write_stack(tmp_path / "x_mask.tif")
    write_stack(tmp_path / "x.tif")
    before = (tmp_path / "x_mask.tif").read_bytes()
    assert main(["predict", str(model_file), str(tmp_path), "-o", str(tmp_path)]) == 1
    assert "would overwrite an input" in capsys.readouterr().err
    assert (tmp_path / "x_mask.tif").read_bytes() == before


def test_broken_model_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_text("not a model")
    write_stack(tmp_path / "a.tif")
    assert main(["predict", str(bad), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not an emseg model file" in err and "Traceback" not in err


def test_bad_tile_option_is_a_usage_error(tmp_path, model_file, capsys):
    write_stack(tmp_path / "a.tif")
    assert main(["predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "o"),
                 "--tile", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_models_lists_every_encoder_with_measured_cost(capsys):
    from emseg.model.networks import ENCODERS
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line and line.split()[0] in ENCODERS}
    assert set(rows) == set(ENCODERS)
    gflops = {name: float(row[3]) for name, row in rows.items()}
    assert gflops["vgg16"] > gflops["vgg11"] > gflops["vgg11_bn_slim"] > gflops["vgg11_bn_micro"] > 0
    assert rows["densenet161"][2].endswith("M")


def test_summary_prints_block_shapes(capsys):
    assert main(["summary", "vgg11_bn_micro", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "[1, 8, 64, 64]" in out  # first VGG block at full resolution
    assert "[1, 64, 2, 2]" in out  # deepest feature map, 64 / 32
    assert "[1, 2, 64, 64]" in out  # 2-class output


def test_unknown_encoder_in_summary(capsys):
    assert main(["summary", "resnet50"]) == 2
    assert "vgg16_bn" in capsys.readouterr().err


def test_predict_with_instances_and_measurements(tmp_path, model_file):
    write_stack(tmp_path / "a.tif", pages=2)
    assert main(["-q", "predict", str(model_file), str(tmp_path / "a.tif"), "-o", str(tmp_path / "out"),
                 "--tile", "64", "--measure", "--min-size", "3"]) == 0
    out = tmp_path / "out"
    for name in ("a_instances.tif", "a_objects.csv", "a_measure.png", "summary.csv"):
        assert (out / name).exists(), name
    header = (out / "a_objects.csv").read_text().splitlines()[0]
    assert "area_nm2" in header and "touches_border" in header  # 5 nm/px from the input file
    instances = tifffile.imread(out / "a_instances.tif")
    assert instances.shape == (2, 80, 60)


def test_every_subcommand_has_help(capsys):
    for command in ("predict", "train", "finetune", "evaluate", "augment-preview", "models", "summary",
                    "measure", "export"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: emseg " + command in capsys.readouterr().out
