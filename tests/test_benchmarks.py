"""The benchmarks' own data handling: what they measure is only as good as how they resample and score."""

import sys

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_finetune  # noqa: E402
import bench_pretrain  # noqa: E402
import bench_scale  # noqa: E402
from bench_train_real import parse_settings, scribbles_from  # noqa: E402


def band_mask(size=64, width=4, at=30) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[:, at:at + width] = 255
    return mask


@pytest.mark.parametrize("factor", [0.7, 0.8, 1.25, 1.4])
def test_scale_labels_stay_labels_and_keep_their_width_in_nm(factor):
    mask = band_mask()
    shape = bench_scale.resampled_shape(mask.shape, factor)
    out = bench_scale.resample_mask(mask, shape)
    assert out.shape == shape == (round(64 * factor), round(64 * factor))
    assert set(np.unique(out).tolist()) == {0, 255}  # labels, never interpolated grey
    width = (out[shape[0] // 2] > 0).sum()
    assert abs(width - 4 * factor) <= 1  # the membrane keeps its width in nm, not in pixels


def test_scale_labels_follow_the_pixel_under_each_new_centre():
    """At a factor of 2 every new pixel has the class of the old pixel under its centre (nearest)."""
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((16, 16)) > 0.6, 255, 0).astype(np.uint8)
    out = bench_scale.resample_mask(mask, (32, 32))
    nearest = mask.repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(out, nearest)


def test_scale_images_keep_their_range_and_type():
    page = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    out = bench_scale.resample_image(page, (45, 45))
    assert out.dtype == np.uint8 and out.shape == (45, 45)
    assert abs(float(out.mean()) - float(page.mean())) < 2


def test_scale_benchmark_gives_the_true_pixel_size_with_matching_on(monkeypatch, tmp_path, tiny_model):
    calls = []

    def fake_evaluate(model, images, masks, tmp, pixel_nm, tta=False):
        calls.append((images.shape, masks.shape, set(np.unique(masks).tolist()), pixel_nm))
        return {"iou": {"background": 0.9, "membrane": 0.5}, "pixel_error": 0.1, "adapted_rand_error": 0.2}

    monkeypatch.setattr(bench_scale, "evaluate_arrays", fake_evaluate)
    images = np.random.default_rng(1).integers(0, 255, (2, 40, 40)).astype(np.uint8)
    masks = np.stack([band_mask(40, 3, 10)] * 2)
    rows = bench_scale.evaluate_factors(tiny_model, images, masks, [0.8, 1.25], tmp_path, extras=False)
    assert rows["0.8"]["pixel_nm"] == pytest.approx(5.0) and rows["1.2"]["pixel_nm"] == pytest.approx(3.2)
    assert rows["0.8"]["shape"] == [32, 32] and rows["1.2"]["shape"] == [50, 50]
    assert calls == [((2, 32, 32), (2, 32, 32), {0, 255}, pytest.approx(5.0)), ((2, 32, 32), (2, 32, 32), {0, 255}, None),
                     ((2, 50, 50), (2, 50, 50), {0, 255}, pytest.approx(3.2)), ((2, 50, 50), (2, 50, 50), {0, 255}, None)]


def test_microscope_shift_changes_the_image_not_the_labels_meaning():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (2, 32, 32)).astype(np.uint8)
    masks = np.stack([band_mask(32, 4, 12)] * 2)
    imgs, msks = bench_finetune.microscope_shift(images, masks)
    assert imgs.shape == msks.shape == (2, 40, 40) and imgs.dtype == np.uint8
    assert set(np.unique(msks).tolist()) == {0, 255}
    assert 30 <= imgs.mean() <= 160 and not np.array_equal(imgs[0], imgs[1])
    again, _ = bench_finetune.microscope_shift(images, masks)
    assert np.array_equal(imgs, again)  # the same shift every run
    inverted, same_masks = bench_finetune.microscope_shift(images, masks, invert=True)
    assert np.array_equal(inverted, 255 - imgs) and np.array_equal(same_masks, msks)


@pytest.mark.parametrize("masks, classes", [(np.array([[[0, 255], [255, 0]]], np.uint8), {1, 2}),
                                            (np.array([[[0, 1], [2, 1]]], np.uint8), {1, 2, 3})])
def test_scribbles_keep_every_class(masks, classes):
    """Scribbles are class + 1 on the strokes, 0 elsewhere, for 0/255 masks and class indices alike."""
    strokes = scribbles_from(np.tile(masks, (1, 20, 20)), every=3, width=1)
    assert set(np.unique(strokes).tolist()) == {0} | classes


def test_settings_of_the_benchmarks_parse_to_training_fields():
    from emseg.train.augment import PRESETS
    out = parse_settings(["lr=3e-4", "steps=5", "freeze_bn=true", "freeze_encoder=false", "augment=flips",
                          "decoder_upsampling=nearest"])
    assert out["lr"] == pytest.approx(3e-4) and out["steps"] == 5 and isinstance(out["steps"], int)
    assert out["freeze_bn"] is True and out["freeze_encoder"] is False
    assert out["augment"].flips and out["augment"].elastic == 0 and out["augment"].intensity == 0
    assert out["decoder_upsampling"] == "nearest"
    assert parse_settings(["augment=none"])["augment"] == PRESETS["none"]
    with pytest.raises(SystemExit, match="augment is one of"):
        parse_settings(["augment=strong"])
    with pytest.raises(SystemExit, match="not a training setting"):
        parse_settings(["learning_rate=1"])


def test_an_average_with_the_base_is_undone_by_its_inverse_share(tiny_model):
    """bench_finetune scores every share of a base_share=auto run from its averaged weights: the fine-tuned weights
    are recovered by averaging with the base at 1 / (1 - chosen share)."""
    import copy

    import torch
    tuned = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in tuned.net.parameters():
            p.add_(torch.randn_like(p))
    mixed = bench_finetune.weights_averaged(tiny_model, tuned, 0.25)  # 25 % fine-tuned, 75 % base
    back = bench_finetune.weights_averaged(tiny_model, mixed, 1 / (1 - 0.75)).net.state_dict()
    want = tuned.net.state_dict()
    assert not torch.allclose(mixed.net.state_dict()["segmentation_head.0.weight"], want["segmentation_head.0.weight"])
    assert all(torch.allclose(back[k], want[k], atol=1e-5) for k in want if want[k].is_floating_point())


def test_arms_are_compared_seed_by_seed(monkeypatch, tmp_path):
    """`bench_finetune.py compare` pairs two arms' runs by seed (a tag that merely starts alike is another arm),
    and its interval is Student's over the per-seed differences."""
    import json

    from scipy import stats
    for tag, seed, iou in [("ft", 0, 0.60), ("ft", 1, 0.58), ("ft", 2, 0.59), ("ft", 3, 0.99),
                           ("sc", 0, 0.57), ("sc", 1, 0.56), ("sc", 2, 0.60), ("ft_other", 1, 0.10),
                           ("zero", 0, None)]:
        name = f"{tag}_s{seed}"
        (tmp_path / "isbi-epfl").mkdir(exist_ok=True)
        row = {"tag": name, "seed": seed, **({"iou_foreground": iou} if iou else {"note": "other classes"})}
        (tmp_path / "isbi-epfl" / f"{name}.json").write_text(json.dumps(row))
    monkeypatch.setattr(bench_finetune, "OUT", tmp_path)
    ft, sc = bench_finetune._by_seed("isbi-epfl", "ft"), bench_finetune._by_seed("isbi-epfl", "sc")
    assert ft == {0: 0.60, 1: 0.58, 2: 0.59, 3: 0.99}  # not ft_other_s1
    assert bench_finetune._by_seed("isbi-epfl", "zero") == {}  # a run with no score is left out
    c = bench_finetune.paired(ft, sc)
    assert c["seeds"] == [0, 1, 2]  # seed 3 has no counterpart
    diff = np.array([0.03, 0.02, -0.01])
    assert c["diff"] == pytest.approx(diff.mean())
    assert c["half_width"] == pytest.approx(stats.t.ppf(0.975, 2) * diff.std(ddof=1) / np.sqrt(3))
    assert c["led"] == 2 and c["mean_b"] == pytest.approx(np.mean([0.57, 0.56, 0.60]))
    assert bench_finetune.paired({0: 0.5}, {0: 0.4})["half_width"] is None
    assert bench_finetune.paired({0: 0.5}, {1: 0.4}) is None


def test_a_comparison_prints_its_table_and_draws_its_panel(monkeypatch, tmp_path, capsys):
    import argparse
    import json

    from PIL import Image
    for tag, seed, iou in [("ft", 0, 0.60), ("ft", 1, 0.58), ("sc", 0, 0.57), ("sc", 1, 0.56)]:
        (tmp_path / "epfl-isbi").mkdir(exist_ok=True)
        row = {"tag": f"{tag}_s{seed}", "seed": seed, "iou_foreground": iou}
        (tmp_path / "epfl-isbi" / f"{tag}_s{seed}.json").write_text(json.dumps(row))
    monkeypatch.setattr(bench_finetune, "OUT", tmp_path)
    png = tmp_path / "compare.png"
    args = argparse.Namespace(comparisons=["ft:sc=fine-tuned - scratch", "sc:ft"], pairs=list(bench_finetune.PAIRS),
                              plot=str(png))
    bench_finetune.cmd_compare(args)
    out = capsys.readouterr().out
    assert "| epfl-isbi | 0, 1 | 0.600 / 0.580 | 0.570 / 0.560 | 0.590 | 0.565 | +0.025 (" in out
    assert "| 2 of 2 |" in out and "| 0 of 2 |" in out and "isbi-nasa" not in out
    with Image.open(png) as image:
        assert image.size[0] > 2 * image.size[1]  # two panels side by side
    with pytest.raises(SystemExit, match="not TAG_A:TAG_B"):
        bench_finetune.cmd_compare(argparse.Namespace(comparisons=["ft"], pairs=["epfl-isbi"], plot=None))


def test_pretraining_lengths_are_tabled_against_the_gap(monkeypatch, tmp_path, capsys):
    """`bench_pretrain.py scaling` reads each pretraining length's fine-tuning results (one file, or one a seed), and
    the share of the gap between random weights and the ceiling that each closes."""
    import argparse
    import json

    from PIL import Image

    def write(name, rows):
        rows = [{"arm": "pretrained", "seed": seed, "metrics": {"mean_iou": iou}} for seed, iou in rows]
        (tmp_path / f"finetune_membranes_{name}.json").write_text(json.dumps({"rows": rows}))
    write("random_s0", [(0, 0.60)])
    write("random_s1", [(1, 0.62)])
    write("long", [(0, 0.66), (1, 0.64)])
    write("long_encoder_s0", [(0, 0.10)])  # another arm whose tag merely starts alike
    write("full", [(0, 0.71), (1, 0.69)])
    monkeypatch.setattr(bench_pretrain, "OUT", tmp_path)
    rows = bench_pretrain.scaling("membranes", [(0, "random"), (80, "long")], "full")
    assert rows[0]["iou"] == {0: 0.60, 1: 0.62} and rows[1]["iou"] == {0: 0.66, 1: 0.64}
    assert rows[0]["share"] == pytest.approx(0.0) and rows[1]["share"] == pytest.approx(0.04 / 0.09)
    png = tmp_path / "scaling.png"
    series = [["whole", "0=random", "80=long"], ["encoder", "0=random", "20=long_encoder"]]
    bench_pretrain.cmd_scaling(argparse.Namespace(data="membranes", series=series, ceiling="full", plot=str(png)))
    out = capsys.readouterr().out
    assert "| whole | 80 | long | 0, 1 | 0.660 / 0.640 | 0.650 | 44 % |" in out
    assert "| encoder | 20 | long_encoder | 0 | 0.100 | 0.100 | -567 % |" in out
    with Image.open(png) as image:
        assert image.size[0] > image.size[1]
    with pytest.raises(SystemExit, match="no results for tag 'short'"):
        bench_pretrain.scaling("membranes", [(0, "random"), (5, "short")], None)
    with pytest.raises(SystemExit, match="MINUTES=TAG"):
        bench_pretrain.cmd_scaling(argparse.Namespace(data="membranes", series=[["a", "random"]], ceiling=None,
                                                      plot=None))


def test_pretraining_arms_are_set_side_by_side(monkeypatch, tmp_path, capsys):
    """`bench_pretrain.py arms` reads each arm's results per data set, takes the first arm as the reference, and draws
    a panel a data set; a tag without results, a spec without a label and an unknown data set are refused."""
    import argparse
    import json

    from PIL import Image

    def write(data, name, rows):
        rows = [{"arm": "pretrained", "seed": seed, "metrics": {"mean_iou": iou}} for seed, iou in rows]
        (tmp_path / f"finetune_{data}_{name}.json").write_text(json.dumps({"rows": rows}))
    write("membranes", "random_s0", [(0, 0.60)])
    write("membranes", "random_s1", [(1, 0.62)])
    write("membranes", "frozen", [(0, 0.55), (1, 0.53)])
    write("mito", "random", [(0, 0.70)])
    write("mito", "frozen", [(0, 0.80)])
    monkeypatch.setattr(bench_pretrain, "OUT", tmp_path)
    rows = bench_pretrain.arms("membranes", ["random weights=random", "encoder frozen=frozen"])
    assert rows[0]["iou"] == {0: 0.60, 1: 0.62} and rows[0]["diff"] == 0
    assert rows[1]["mean"] == pytest.approx(0.54) and rows[1]["diff"] == pytest.approx(-0.07)
    png = tmp_path / "arms.png"
    panels = [["membranes", "random weights=random", "encoder frozen=frozen"], ["mito", "random=random", "f=frozen"]]
    bench_pretrain.cmd_arms(argparse.Namespace(panel=panels, plot=str(png)))
    out = capsys.readouterr().out
    assert "| membranes | encoder frozen | frozen | 0, 1 | 0.550 / 0.530 | 0.540 | -0.070 |" in out
    assert "| mito | f | frozen | 0 | 0.800 | 0.800 | +0.100 |" in out
    with Image.open(png) as image:
        assert image.size[0] > image.size[1]  # two panels side by side
    with pytest.raises(SystemExit, match="no results for tag 'short'"):
        bench_pretrain.arms("membranes", ["random=random", "short=short"])
    with pytest.raises(SystemExit, match="LABEL=TAG"):
        bench_pretrain.arms("membranes", ["random"])
    with pytest.raises(SystemExit, match="'isbi' is not a data set"):
        bench_pretrain.arms("isbi", ["random=random"])
    with pytest.raises(SystemExit, match="names no arms"):
        bench_pretrain.arms("mito", [])


def test_the_error_picture_draws_one_row_a_model(monkeypatch, tmp_path, tiny_model, rng):
    """`bench_pretrain.py errors` predicts a held-out ISBI slice with each model and draws page, membranes, errors."""
    pages = rng.integers(0, 255, (6, 64, 64)).astype(np.uint8)
    monkeypatch.setattr(bench_pretrain, "load", lambda name: (None, None, pages, (pages > 128) * 255, None, 4.0))
    path = tiny_model.save(tmp_path / "m.safetensors")
    png = tmp_path / "errors.png"
    import argparse
    args = argparse.Namespace(models=[f"a={path}", str(path)], plot=str(png), slice=25, top=8, left=8, size=32)
    assert bench_pretrain.cmd_errors(args) == 0
    from PIL import Image
    with Image.open(png) as picture:
        width, height = picture.size
    assert height > width / 2  # two rows of three panels


def test_gpu_queue_lines_stay_one_run_each(tmp_path):
    """The GPU scripts' queues (gpu_env.sh's ``q``) feed ``xargs -L 1``, which joins a line ending in a blank to the
    next: a run whose options end empty (no ``--base-tag``) must not swallow the next run."""
    import shutil
    import subprocess
    if shutil.which("bash") is None or shutil.which("xargs") is None:
        pytest.skip("needs bash and xargs")
    lines = (REPO / "benchmarks" / "gpu_env.sh").read_text().splitlines()
    q = next(line for line in lines if line.startswith("q() {"))
    script = f'{q}\nqueue={tmp_path}/queue\nq first echo a ""\nq second echo b\n' \
             'xargs -L 1 sh -c \'echo "$#"\' _ < "$queue"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3", "3"]  # two runs of three words each, not one of six
