"""Self-training (emseg.train.selftrain, `train`/`finetune --unlabelled`): the model labels unlabelled pages itself."""

import threading

import numpy as np
import pytest
import tifffile

from emseg.analysis.metrics import IGNORE
from emseg.cli import main
from emseg.errors import InputError
from emseg.model.card import Normalization
from emseg.model.modelfile import load_model
from emseg.synthetic import make_em_stack
from emseg.train.data import CropSampler, arrays_to_items
from emseg.train.loop import TrainConfig
from emseg.train.selftrain import RawPage, _balanced_thresholds, load_raw_pages, pseudo_labelled, self_train

CLASSES = ("background", "membrane", "mitochondrion")


@pytest.fixture(scope="module")
def stack():
    image, mask = make_em_stack(pages=4, height=128, width=160, seed=3)[:2]
    return image, mask.astype(np.uint8)


def _config(**changes):
    values = dict(encoder="vgg11_bn_micro", classes=CLASSES, tile_size=64, batch_size=2, steps=8, val_every=4,
                  device="cpu", seed=0)
    return TrainConfig(**{**values, **changes})


def test_the_teacher_labels_only_the_pixels_it_is_sure_of(tiny_model, rng):
    pages = [RawPage(rng.integers(0, 255, (96, 80)).astype(np.uint8), None, f"p{i}") for i in range(2)]
    everything, share = pseudo_labelled(tiny_model, pages, confidence=0.0, device="cpu")
    probs = tiny_model.predictor(device="cpu").predict_page(pages[0].image)
    assert share == 1.0 and [it.target.shape for it in everything] == [(96, 80)] * 2
    assert np.array_equal(everything[0].target, probs.argmax(0))
    assert everything[0].image.dtype == np.float32 and 0 <= everything[0].image.min() <= everything[0].image.max() <= 1
    cut = float(np.median(probs.max(0)))
    sure, share = pseudo_labelled(tiny_model, pages, confidence=cut, device="cpu")
    unsure = probs.max(0) < cut
    assert 0 < share < 1 and np.all(sure[0].target[unsure] == IGNORE)
    assert np.array_equal(sure[0].target[~unsure], probs.argmax(0)[~unsure])


def test_balanced_labels_keep_the_same_share_of_every_class():
    # class 0 is sure of itself (0.95-1.0), class 1 is not (0.5-0.8): at 0.9 only class 0 would be labelled
    sure = np.concatenate([np.linspace(0.95, 1.0, 300), np.linspace(0.5, 0.8, 100)]).astype(np.float32)
    cls = np.concatenate([np.zeros(300, np.uint8), np.ones(100, np.uint8)])
    guesses = [(cls[:200].copy(), sure[:200].copy()), (cls[200:].copy(), sure[200:].copy())]
    fair = _balanced_thresholds(guesses, 0.9)
    kept = sure >= fair[cls]
    assert kept.mean() == pytest.approx(0.75, abs=0.01)  # the share that 0.9 keeps of all pixels ...
    assert kept[cls == 0].mean() == pytest.approx(0.75, abs=0.01)  # ... kept of each class, the surest first
    assert kept[cls == 1].mean() == pytest.approx(0.75, abs=0.02) and sure[cls == 1][kept[cls == 1]].min() > 0.57


def test_balanced_pseudo_labels_of_a_model(tiny_model, rng):
    pages = [RawPage(rng.integers(0, 255, (96, 80)).astype(np.uint8), None, f"p{i}") for i in range(2)]
    probs = [tiny_model.predictor(device="cpu").predict_page(p.image) for p in pages]
    cut = float(np.median(np.concatenate([p.max(0).ravel() for p in probs])))
    _, share = pseudo_labelled(tiny_model, pages, confidence=cut, device="cpu")
    fair, fair_share = pseudo_labelled(tiny_model, pages, confidence=cut, balanced=True, device="cpu")
    assert fair_share == pytest.approx(share, abs=0.02)
    guess = np.concatenate([p.argmax(0).ravel() for p in probs])
    fair_kept = np.concatenate([it.target.ravel() != IGNORE for it in fair])
    for c in np.unique(guess):
        if np.count_nonzero(guess == c) > 50:
            assert fair_kept[guess == c].mean() == pytest.approx(share, abs=0.05)
    assert all(np.all((it.target == IGNORE) | (it.target == p.argmax(0))) for it, p in zip(fair, probs))


def test_pages_are_drawn_by_their_sampling_weight(rng):
    image = rng.integers(0, 255, (2, 64, 64)).astype(np.uint8)
    items = arrays_to_items(image, np.ones((2, 64, 64), np.uint8), sparse=False, norm=Normalization())
    items[1].sampling_weight = 3.0
    sampler = CropSampler(items, 32, rng=np.random.default_rng(0))
    assert np.allclose(sampler.weights, [0.25, 0.75])
    from emseg.train.augment import AugmentConfig
    from emseg.train.augment_device import DeviceCropSampler
    on_device = DeviceCropSampler(items, 32, config=AugmentConfig(), device="cpu", seed=0)  # a GPU's sampler, on the CPU
    assert np.allclose(on_device.weights, [0.25, 0.75])


def test_a_self_trained_run_is_a_teacher_then_a_student_on_both(stack, tmp_path):
    image, mask = stack
    items = arrays_to_items(image[:1], mask[:1], sparse=False, norm=Normalization())
    pages = [RawPage(page, None, f"raw[{i}]") for i, page in enumerate(image[1:])]
    events = []
    result = self_train(items, pages, _config(), tmp_path / "run", confidence=0.5, progress=events.append)
    assert (tmp_path / "run" / "teacher" / "model.safetensors").is_file()
    model = load_model(tmp_path / "run" / "model.safetensors")
    record = model.card.training["self_training"]
    assert record["unlabelled_pages"] == 3 and record["teacher_steps"] == 4 and record["confidence"] == 0.5
    assert 0 < record["labelled_share"] <= 1 and record["annotated_weight"] >= 1
    assert model.card.classes == CLASSES and result.history[-1]["step"] == 4  # the student's steps
    steps = [e.step for e in events]
    assert steps == list(range(1, 9)) and {e.total_steps for e in events} == {8}  # one bar over both runs
    again = self_train(items, pages, _config(), tmp_path / "run", confidence=0.5, resume=True)  # both finished
    assert again.model.card.training["self_training"]["teacher_steps"] == 4


def test_stopped_while_the_teacher_learns_the_teacher_is_the_result(stack, tmp_path):
    image, mask = stack
    items = arrays_to_items(image[:1], mask[:1], sparse=False, norm=Normalization())
    stop = threading.Event()
    stop.set()
    result = self_train(items, [RawPage(image[1], None, "raw")], _config(), tmp_path / "run", stop=stop)
    assert result.stopped and (tmp_path / "run" / "model.safetensors").is_file()
    assert "self_training" not in (result.model.card.training or {})


def test_self_training_needs_unlabelled_pages(stack):
    image, mask = stack
    items = arrays_to_items(image[:1], mask[:1], sparse=False, norm=Normalization())
    with pytest.raises(InputError, match="no unlabelled pages"):
        self_train(items, [], _config())
    with pytest.raises(ValueError, match="confidence"):
        self_train(items, [RawPage(image[1], None, "raw")], _config(), confidence=1.0)


def test_unlabelled_files_that_are_masks_or_missing_are_refused(stack, tmp_path):
    image, mask = stack
    tifffile.imwrite(tmp_path / "raw.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", mask, photometric="minisblack")
    pages = load_raw_pages([tmp_path / "raw.tif"])
    assert len(pages) == 4 and pages[0].image.dtype == image.dtype and pages[2].name == "raw.tif[2]"
    assert load_raw_pages([tmp_path / "raw.tif"], max_pixels=2 * 128 * 160)[1].name == "raw.tif[3]"
    with pytest.raises(InputError, match="labels.tif.*looks like a mask.*self-training"):
        load_raw_pages([tmp_path / "labels.tif"])
    with pytest.raises(InputError, match="no unlabelled images"):
        load_raw_pages([tmp_path / "nothing*.tif"])


def test_cli_train_and_finetune_with_unlabelled_images(stack, tmp_path, capsys):
    image, mask = stack
    tifffile.imwrite(tmp_path / "img.tif", image[:1], photometric="minisblack")
    tifffile.imwrite(tmp_path / "img_mask.tif", mask[:1], photometric="minisblack")
    tifffile.imwrite(tmp_path / "raw.tif", image[1:], photometric="minisblack")
    data = ["--images", str(tmp_path / "img.tif"), "--masks", str(tmp_path / "img_mask.tif"), "--classes",
            ",".join(CLASSES), "--steps", "4", "--val-every", "2", "--tile-size", "64", "--batch-size", "2",
            "--device", "cpu", "--encoder", "vgg11_bn_micro"]
    assert main(["-q", "train", *data, "--unlabelled", str(tmp_path / "raw.tif"), "-o", str(tmp_path / "a")]) == 0
    record = load_model(tmp_path / "a" / "model.safetensors").card.training["self_training"]
    assert record["unlabelled_pages"] == 3 and record["confidence"] == 0.9
    assert main(["-q", "finetune", str(tmp_path / "a"), *data[:-2], "--unlabelled", str(tmp_path / "raw.tif"),
                 "--confidence", "0.6", "-o", str(tmp_path / "b")]) == 0
    tuned = load_model(tmp_path / "b" / "model.safetensors").card.training
    assert tuned["self_training"]["confidence"] == 0.6
    assert tuned["fine_tuned_from"]["path"] == str(tmp_path / "a")  # the base given, not the run's own teacher
    assert main(["-q", "train", *data, "--confidence", "0.6", "-o", str(tmp_path / "c")]) != 0
    assert "--confidence is for self-training" in capsys.readouterr().err


def test_the_run_is_shared_between_teacher_and_student_in_steps_or_minutes():
    from emseg.train.selftrain import _split_length
    assert _split_length(_config(steps=600), 0.5) == ({"steps": 300, "time_limit_minutes": None},
                                                       {"steps": 300, "time_limit_minutes": None})
    assert _split_length(_config(steps=None, time_limit_minutes=20), 0.25) == (
        {"steps": None, "time_limit_minutes": 5.0}, {"steps": None, "time_limit_minutes": 15.0})
    first, rest = _split_length(_config(steps=101, time_limit_minutes=10), 0.5)
    assert first["steps"] + rest["steps"] == 101 and first["time_limit_minutes"] == rest["time_limit_minutes"] == 5
    assert _config(**rest).steps == rest["steps"] and _config(steps=None, time_limit_minutes=5).fills_time
