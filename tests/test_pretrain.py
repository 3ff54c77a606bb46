"""`emseg pretrain`: self-supervised restoration on unlabelled images, and training from its model."""

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from emseg.cli import main
from emseg.errors import InputError, ModelFileError
from emseg.model.card import ModelCard
from emseg.model.modelfile import load_model
from emseg.synthetic import make_em_stack
from emseg.train.loop import TrainConfig, _prepare_network
from emseg.train.pretrain import (
    Contrast,
    Contraster,
    Corruptions,
    Corruptor,
    Masker,
    Masking,
    PretrainConfig,
    load_unlabelled,
    pretrain,
    restoration_loss,
    unlabelled_from_arrays,
    vicreg_loss,
)

CLASSES = ("background", "membrane", "mitochondrion")


@pytest.fixture(scope="module")
def stack_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrain_data")
    image, mask = make_em_stack(pages=3, height=128, width=160, seed=5)[:2]
    tifffile.imwrite(folder / "raw.tif", image, photometric="minisblack", resolution=(1 / 6e-7, 1 / 6e-7),
                     resolutionunit="CENTIMETER")
    tifffile.imwrite(folder / "raw_mask.tif", mask.astype(np.uint8), photometric="minisblack")
    return folder


@pytest.fixture(scope="module")
def pretrained(stack_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain_run") / "run"
    pages = load_unlabelled([stack_files / "raw.tif"], tile=64)
    config = PretrainConfig(encoder="vgg11_bn_micro", tile_size=64, batch_size=4, steps=60, val_every=20,
                            time_limit_minutes=None, device="cpu", seed=0)
    return pretrain(pages, config, out)


def test_a_short_pretraining_lowers_its_own_restoration_loss(pretrained):
    losses = [h["val_loss"] for h in pretrained.history]
    assert len(losses) == 3
    assert losses[0] > losses[1] > losses[2] and losses[-1] < 0.75 * losses[0], losses
    assert all(np.isfinite(losses))
    out = pretrained.model_path.parent
    for name in ("model.safetensors", "curves.png", "restorations.png", "log.json"):
        assert (out / name).is_file(), name


def test_the_pretrained_file_says_what_it_is_and_refuses_to_segment(pretrained, tmp_path):
    model = load_model(pretrained.model_path)
    card = model.card
    assert card.is_pretrained and card.classes == () and card.out_channels == 1
    assert card.pretrained["objective"] == "restoration"
    assert card.pretrained["steps"] == 60 and card.pretrained["pages"] == 3
    assert card.pretrained["sources"] == ["raw.tif"]
    with pytest.raises(ModelFileError, match="pretrained model .* emseg train --init"):
        model.predictor(device="cpu")
    tifffile.imwrite(tmp_path / "page.tif", np.zeros((64, 64), np.uint8))
    assert main(["-q", "predict", str(pretrained.model_path), str(tmp_path / "page.tif"), "-o",
                 str(tmp_path / "out")]) == 1


def test_a_pretrained_card_has_no_classes():
    with pytest.raises(ValueError, match="no classes"):
        ModelCard(encoder="vgg11_bn_micro", classes=("a", "b"), pretrained={"objective": "restoration"})
    with pytest.raises(ValueError, match="2 to"):
        ModelCard(encoder="vgg11_bn_micro", classes=())


def test_training_from_it_keeps_encoder_and_decoder_with_a_fresh_head(pretrained):
    base = load_model(pretrained.model_path)
    net, card = _prepare_network(TrainConfig(encoder="vgg11_bn_micro", classes=CLASSES, device="cpu"), CLASSES, base)
    assert card.classes == CLASSES and not card.is_pretrained
    mine, theirs = net.state_dict(), base.net.state_dict()
    for key, value in theirs.items():
        if key.startswith(("encoder.", "decoder.")):
            assert torch.equal(mine[key], value), key
    head = [k for k in mine if k.startswith("segmentation_head.") and k.endswith("weight")]
    assert mine[head[0]].shape[0] == len(CLASSES)
    assert base.card.is_pretrained  # the file's model is not changed


def test_a_fresh_decoder_keeps_only_the_encoder(pretrained):
    base = load_model(pretrained.model_path)
    config = TrainConfig(encoder="vgg11_bn_micro", classes=CLASSES, device="cpu", fresh_decoder=True)
    net, card = _prepare_network(config, CLASSES, base)
    mine, theirs = net.state_dict(), base.net.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in theirs.items() if k.startswith("encoder."))
    decoder = [k for k in theirs if k.startswith("decoder.") and k.endswith("weight")]
    assert decoder and not any(torch.equal(mine[k], theirs[k]) for k in decoder)
    assert card.classes == CLASSES and card.pixel_size_nm == base.card.pixel_size_nm


def test_settings_for_a_base_say_so_without_one(caplog):
    config = TrainConfig(encoder="vgg11_bn_micro", classes=CLASSES, device="cpu", fresh_decoder=True)
    with caplog.at_level("WARNING", logger="emseg"):
        _prepare_network(config, CLASSES, None)
    assert "fresh_decoder: no effect without a model to start from" in caplog.text


@pytest.mark.parametrize("how", ["init", "finetune"])
def test_cli_train_init_and_finetune_from_a_pretrained_model(pretrained, stack_files, tmp_path, how):
    data = ["--images", str(stack_files / "raw.tif"), "--masks", str(stack_files / "raw_mask.tif"),
            "--classes", ",".join(CLASSES), "--steps", "4", "--val-every", "2", "--tile-size", "64",
            "--batch-size", "2", "--device", "cpu", "-o", str(tmp_path / "run")]
    args = (["train", "--init", str(pretrained.model_path)] if how == "init"
            else ["finetune", str(pretrained.model_path)]) + data
    assert main(["-q", *args]) == 0
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.card.classes == CLASSES and not model.card.is_pretrained
    assert model.card.training["pretrained_from"]["objective"] == "restoration"
    from emseg.train import FINETUNE_DEFAULTS
    assert model.card.training["config"]["lr"] == FINETUNE_DEFAULTS["new_task_lr"]  # a fresh head: the new-task rate
    assert model.predictor(device="cpu").predict_page(np.zeros((64, 64), np.uint8)).shape == (3, 64, 64)


def test_cli_train_init_with_unlabelled_pages_pretrains_then_self_trains(pretrained, stack_files, tmp_path):
    # the lab's unlabelled stack used twice: pretraining, then the model's own labels of it
    assert main(["-q", "train", "--init", str(pretrained.model_path), "--images", str(stack_files / "raw.tif"),
                 "--masks", str(stack_files / "raw_mask.tif"), "--classes", ",".join(CLASSES), "--steps", "6",
                 "--val-every", "3", "--tile-size", "64", "--batch-size", "2", "--device", "cpu",
                 "--unlabelled", str(stack_files / "raw.tif"), "-o", str(tmp_path / "run")]) == 0
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.card.classes == CLASSES and not model.card.is_pretrained
    assert model.card.training["pretrained_from"]["objective"] == "restoration"
    assert model.card.training["self_training"]["unlabelled_pages"] == 3
    teacher = load_model(tmp_path / "run" / "teacher" / "model.safetensors")
    assert teacher.card.training["pretrained_from"]["objective"] == "restoration"


def test_finetune_rate_by_whether_the_head_starts_afresh(pretrained, tiny_model):
    from emseg.train import FINETUNE_DEFAULTS
    from emseg.train.loop import finetune_lr
    new, same = FINETUNE_DEFAULTS["new_task_lr"], FINETUNE_DEFAULTS["lr"]
    assert new != same
    assert finetune_lr(load_model(pretrained.model_path), CLASSES) == new  # pretrained: no head to keep
    assert finetune_lr(None, CLASSES) == new
    assert finetune_lr(tiny_model, tiny_model.classes) == same
    assert finetune_lr(tiny_model, tiny_model.classes, head="fresh") == new
    assert finetune_lr(tiny_model, ("background", "other", "names")) == new


def test_finetune_blends_with_the_base_only_when_its_head_is_kept(pretrained, tiny_model):
    from emseg.train import FINETUNE_DEFAULTS
    from emseg.train.loop import finetune_base_share
    share = FINETUNE_DEFAULTS["base_share"]
    assert share == "auto"  # chosen on the validation pages (docs/training.md, "Fine-tuning that pays")
    assert finetune_base_share(tiny_model, tiny_model.classes) == share
    assert finetune_base_share(load_model(pretrained.model_path), CLASSES) == 0  # no head to average with
    assert finetune_base_share(None, CLASSES) == 0
    assert finetune_base_share(tiny_model, tiny_model.classes, head="fresh") == 0
    assert finetune_base_share(tiny_model, ("background", "other", "names")) == 0


def test_cli_train_init_refuses_another_encoder(pretrained, stack_files, tmp_path, capsys):
    assert main(["-q", "train", "--init", str(pretrained.model_path), "--encoder", "vgg11_bn_slim",
                 "--images", str(stack_files / "raw.tif"), "--masks", str(stack_files / "raw_mask.tif"),
                 "-o", str(tmp_path / "run")]) != 0
    assert "--encoder vgg11_bn_slim differs" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["restoration", "masked"])
def test_cli_pretrain_end_to_end_and_its_bad_inputs(stack_files, tmp_path, capsys, objective):
    assert main(["-q", "pretrain", "--images", str(stack_files / "raw.tif"), "-o", str(tmp_path / "run"),
                 "--encoder", "vgg11_bn_micro", "--steps", "4", "--val-every", "2", "--tile-size", "64",
                 "--batch-size", "2", "--device", "cpu", "--objective", objective]) == 0
    card = load_model(tmp_path / "run" / "model.safetensors").card
    assert card.is_pretrained and card.pixel_size_nm == pytest.approx(6.0)
    assert card.pretrained["objective"] == objective
    assert ("masking" in card.pretrained) == (objective == "masked")
    if objective == "masked":
        return
    capsys.readouterr()
    # no images
    assert main(["-q", "pretrain", "--images", str(tmp_path / "nothing*.tif"), "-o", str(tmp_path / "a")]) == 1
    assert "no unlabelled images" in capsys.readouterr().err
    # pages smaller than the crops
    tifffile.imwrite(tmp_path / "small.tif", np.random.default_rng(0).integers(0, 255, (40, 50), np.uint8))
    assert main(["-q", "pretrain", "--images", str(tmp_path / "small.tif"), "-o", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "small.tif" in err and "smaller than the 128-pixel crops" in err and len(err.strip().splitlines()) == 1
    # a mask given as an image
    assert main(["-q", "pretrain", "--images", str(stack_files / "raw_mask.tif"), "-o", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "raw_mask.tif" in err and "looks like a mask" in err and "--masks" in err


def test_load_unlabelled_takes_pages_evenly_within_the_pixel_budget(stack_files):
    pages = load_unlabelled([stack_files / "raw.tif"], tile=64, max_pixels=2 * 128 * 160)
    assert [p.name for p in pages] == ["raw.tif[0]", "raw.tif[2]"]
    assert all(p.image.dtype == np.float32 and 0 <= p.image.min() and p.image.max() <= 1 for p in pages)
    with pytest.raises(InputError, match="no unlabelled images"):
        load_unlabelled([], tile=64)


def test_in_memory_pages_are_taken_as_files_are_and_bad_ones_named(stack_files):
    stack = tifffile.imread(stack_files / "raw.tif")
    from_files = load_unlabelled([stack_files / "raw.tif"], tile=64, max_pixels=2 * 128 * 160)
    pages = unlabelled_from_arrays(stack, tile=64, pixel_size_nm=6.0, name="layer", max_pixels=2 * 128 * 160)
    assert [p.name for p in pages] == ["layer[0]", "layer[2]"] and all(p.pixel_size_nm == 6.0 for p in pages)
    for a, b in zip(pages, from_files):
        np.testing.assert_array_equal(a.image, b.image)
    assert [p.name for p in unlabelled_from_arrays(stack[1], tile=64, name="page")] == ["page"]
    with pytest.raises(InputError, match="'layer': its pages are 128 x 160 pixels, smaller than the 256-pixel"):
        unlabelled_from_arrays(stack, tile=256, name="'layer'")
    mask = tifffile.imread(stack_files / "raw_mask.tif")
    with pytest.raises(InputError, match="masks page 1 of 3: holds only .* looks like a mask"):
        unlabelled_from_arrays(mask, tile=64, name="masks")
    with pytest.raises(InputError, match="rgb: has shape .*not RGB"):
        unlabelled_from_arrays(np.zeros((64, 64, 3, 2)), tile=32, name="rgb")


def test_corruptions_are_seeded_bounded_and_each_changes_the_crop():
    clean = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    make = lambda **c: Corruptor(Corruptions(**c), 64, torch.device("cpu"), seed=3)  # noqa: E731
    a, b = make()(clean), make()(clean)
    assert torch.equal(a, b) and a.shape == clean.shape and 0 <= a.min() and a.max() <= 1
    off = dict(intensity=0, shuffle=0, paint=0, noise=0)
    assert torch.equal(make(**off)(clean), clean)
    for part in ("intensity", "shuffle", "paint", "noise"):
        changed = make(**{**off, part: 1.0})(clean)
        assert not torch.equal(changed, clean), part
    shuffled = make(**{**off, "shuffle": 1.0})(clean)  # shuffling moves pixels within blocks: same values
    blocks = lambda x: x.view(6, 16, 4, 16, 4).permute(0, 1, 3, 2, 4).reshape(6, 256, 16)  # noqa: E731
    assert torch.equal(blocks(shuffled).sort(-1).values, blocks(clean).sort(-1).values)


def test_pretraining_resumes_from_its_checkpoint(stack_files, tmp_path):
    pages = load_unlabelled([stack_files / "raw.tif"], tile=64)
    config = dict(encoder="vgg11_bn_micro", tile_size=64, batch_size=2, val_every=2, time_limit_minutes=None,
                  device="cpu")
    first = pretrain(pages, PretrainConfig(steps=4, **config), tmp_path / "run")
    assert [h["step"] for h in first.history] == [2, 4]
    with pytest.raises(Exception, match="checkpoint"):  # the folder holds a run: refused without resume
        pretrain(pages, PretrainConfig(steps=6, **config), tmp_path / "run")
    more = pretrain(pages, PretrainConfig(steps=6, **config), tmp_path / "run", resume=True)
    assert [h["step"] for h in more.history] == [2, 4, 6]
    assert load_model(more.model_path).card.pretrained["steps"] == 6


def test_the_intensity_curve_keeps_the_order_of_grey_values():
    # an inverted or non-monotone curve cannot be undone from a small window: the squared error of guessing
    # drove a 20-minute pretraining to output the mean grey everywhere
    clean = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    curved = Corruptor(Corruptions(intensity=1.0, shuffle=0, paint=0, noise=0), 32, torch.device("cpu"), seed=4)(clean)
    flat_clean, flat = clean.view(8, -1), curved.view(8, -1)
    order = flat_clean.argsort(dim=1)
    assert (torch.gather(flat, 1, order).diff(dim=1) >= -1e-6).all()
    assert not torch.allclose(curved, clean, atol=0.01)


def test_masking_hides_a_share_of_patches_under_the_crop_mean_and_scores_only_them():
    clean = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    masked, weights = Masker(Masking(ratio=0.5, patch=16), 64, torch.device("cpu"), seed=2)(clean)
    assert weights.shape == clean.shape
    assert weights.mean(dim=(1, 2, 3)).tolist() == [0.5, 0.5, 0.5]
    blocks = weights.view(3, 4, 16, 4, 16)  # whole 16-pixel patches, never parts of them
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))
    hidden = weights.bool()
    for i in range(3):
        assert torch.allclose(masked[i][hidden[i]], clean[i].mean())
        assert torch.equal(masked[i][~hidden[i]], clean[i][~hidden[i]])
    assert not torch.equal(weights[0], weights[1])  # each crop its own patches
    assert torch.equal(Masker(Masking(ratio=0.5, patch=16), 64, torch.device("cpu"), seed=2)(clean)[1], weights)
    wrong_where_seen = torch.where(hidden, clean, 1 - clean)
    assert restoration_loss(wrong_where_seen, clean, weights) == 0  # the visible pixels are not scored
    assert restoration_loss(masked, clean, weights) > 0
    with pytest.raises(ValueError, match="ratio"):
        Masking(ratio=1.0)
    with pytest.raises(ValueError, match="multiple of the masking patch"):
        PretrainConfig(tile_size=96, masking=Masking(patch=64))


def test_a_short_masked_pretraining_lowers_its_own_loss(stack_files, tmp_path):
    pages = load_unlabelled([stack_files / "raw.tif"], tile=64)
    config = PretrainConfig(encoder="vgg11_bn_micro", tile_size=64, batch_size=4, steps=40, val_every=20,
                            time_limit_minutes=None, device="cpu", objective="masked")
    result = pretrain(pages, config, tmp_path / "run")
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "restorations.png").is_file()
    first, last = (h["val_loss"] for h in result.history)
    assert last < 0.8 * first and np.isfinite(last), result.history
    assert result.model.card.pretrained["masking"] == {"ratio": 0.6, "patch": 16}


def _pooled(views: torch.Tensor, stages) -> list:
    """Stand-in encoder features: the views average-pooled to each stage's stride (exactly equivariant to the
    views' quarter turns, flips and shifts by whole strides)."""
    return [views if s == 0 else F.avg_pool2d(views, 2 ** s) for s in range(max(stages) + 1)]


def test_contrastive_views_meet_at_the_same_places():
    still = Corruptions(intensity=0, shuffle=0, paint=0, noise=0)
    config = Contrast(shift=32, stages=(2, 3, 4), dim=4, invariance=1.0, variance=0.0, covariance=0.0,
                      corruptions=still)
    clean = torch.rand(3, 1, 96, 96, generator=torch.Generator().manual_seed(0))
    seen = set()
    for seed in range(12):
        contraster = Contraster(config, (1,) * 6, 64, torch.device("cpu"), seed=seed)
        contraster.heads = torch.nn.ModuleList(torch.nn.Identity() for _ in config.stages)  # the features as they are
        views, plan = contraster.views(clean)
        assert views.shape == (6, 1, 64, 64)
        (top1, left1, turns1, flip1), (top2, left2, turns2, flip2) = plan
        assert all(v % 16 == 0 and 0 <= v <= 32 for v in (top1, left1, top2, left2))
        seen.add((top1, left1, turns1, flip1))
        with torch.no_grad():
            assert contraster.loss(_pooled(views, config.stages), plan) < 1e-10  # the same places agree
            # told that the first view's window lay one stride lower: other places, other features
            wrong = ((top1 + 16 if top1 < 32 else top1 - 16, left1, turns1, flip1), plan[1])
            assert contraster.loss(_pooled(views, config.stages), wrong) > 1e-3
    assert len(seen) > 6  # offsets, turns and flips are drawn


def test_the_contrastive_terms_score_collapse_and_correlation():
    config = Contrast(invariance=1.0, variance=1.0, covariance=1.0)
    z = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    spread = vicreg_loss(z, z, config)
    assert spread < 0.05  # unit-variance, uncorrelated and equal: near nothing to pay
    assert vicreg_loss(0.01 * z, 0.01 * z, config) > 0.9  # collapsed features pay the variance hinge
    correlated = torch.cat([z[:, :1]] * 8, dim=1)
    assert vicreg_loss(correlated, correlated, config) > spread + 5  # copies of one channel pay the covariance
    assert vicreg_loss(z, z.roll(1, dims=0), config) > spread + 1.5  # unlike pairs pay the invariance


def test_the_contrastive_settings_are_checked():
    with pytest.raises(ValueError, match="multiple of 16"):
        Contrast(shift=24)
    with pytest.raises(ValueError, match="stages"):
        Contrast(stages=(6,))
    with pytest.raises(ValueError, match="too small for the contrastive objective.*at least 64 px"):
        PretrainConfig(objective="contrastive", tile_size=32, contrast=Contrast(shift=32))
    assert PretrainConfig(objective="contrastive", tile_size=64).crop_size == 96
    assert PretrainConfig(objective="masked", tile_size=64).crop_size == 64


def test_a_short_contrastive_pretraining_lowers_its_loss_and_trains_the_encoder_alone(stack_files, tmp_path):
    config = dict(encoder="vgg11_bn_micro", tile_size=64, batch_size=4, val_every=20, time_limit_minutes=None,
                  device="cpu", objective="contrastive")
    pages = load_unlabelled([stack_files / "raw.tif"], tile=PretrainConfig(**config).crop_size)
    result = pretrain(pages, PretrainConfig(steps=40, **config), tmp_path / "run")
    first, last = (h["val_loss"] for h in result.history)
    reference = result.history[0]["copy_loss"]  # the untrained network's
    assert last < first < reference and np.isfinite(last), result.history
    for name in ("features.png", "curves.png", "model.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    card = load_model(result.model_path).card
    assert card.pretrained["objective"] == "contrastive" and card.pretrained["contrast"]["shift"] == 32
    # its projection heads are in the checkpoint, not the model file: resuming goes on from them
    more = pretrain(pages, PretrainConfig(steps=42, **dict(config, val_every=2)), tmp_path / "run", resume=True)
    assert [h["step"] for h in more.history][-2:] == [40, 42] and more.history[-1]["copy_loss"] == reference
    assert not any(k.startswith("heads.") for k in more.model.net.state_dict())
    # the decoder never learnt: training from it keeps the encoder alone unless asked otherwise
    base = load_model(more.model_path)
    net, _ = _prepare_network(TrainConfig(encoder="vgg11_bn_micro", classes=CLASSES, device="cpu"), CLASSES, base)
    mine, theirs = net.state_dict(), base.net.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in theirs.items() if k.startswith("encoder."))
    decoder = [k for k in theirs if k.startswith("decoder.") and theirs[k].ndim == 4]  # its convolutions
    assert decoder and not any(torch.equal(mine[k], theirs[k]) for k in decoder)
    kept, _ = _prepare_network(TrainConfig(encoder="vgg11_bn_micro", classes=CLASSES, device="cpu",
                                           fresh_decoder=False), CLASSES, base)
    assert all(torch.equal(kept.state_dict()[k], theirs[k]) for k in decoder)


def test_cli_contrastive_pretraining_needs_room_for_its_two_views(stack_files, tmp_path, capsys):
    args = ["-q", "pretrain", "--images", str(stack_files / "raw.tif"), "--encoder", "vgg11_bn_micro", "--steps", "2",
            "--val-every", "2", "--batch-size", "2", "--device", "cpu", "--objective", "contrastive"]
    assert main([*args, "--tile-size", "128", "-o", str(tmp_path / "a")]) == 1  # pages of 128 x 160
    err = capsys.readouterr().err
    assert "raw.tif" in err and "smaller than the 160-pixel crops" in err
    assert main([*args, "--tile-size", "64", "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "features.png").is_file()
