"""Sub-pixel offset of annotations: measuring it, moving images and predictions, and its use in training."""

import json
import threading

import numpy as np
import pytest
from scipy import ndimage as ndi

from emseg.analysis.metrics import IGNORE
from emseg.infer.alignment import estimate_offset, is_offset, shift_image, shift_probabilities
from emseg.infer.predictor import Predictor
from emseg.model.modelfile import Model
from emseg.synthetic import make_em_stack
from emseg.train import loop as training
from emseg.train.loop import TrainConfig, annotations_from_arrays, train

CLASSES = ("background", "membrane", "mitochondrion")


@pytest.fixture(scope="module")
def membranes():
    _, mask = make_em_stack(pages=1, height=128, width=128, seed=1)
    return (mask[0] == 1).astype(np.int64)


def predicted(target, offset, blur=0.8):
    """Probabilities of a model that draws ``target`` moved by ``offset`` pixels, with soft edges."""
    onehot = np.stack([target == 0, target == 1]).astype(np.float32)
    return np.stack([ndi.gaussian_filter(ndi.shift(c, offset, order=1, mode="nearest"), blur) for c in onehot])


@pytest.mark.parametrize("offset", [(0.4, -0.3), (-0.7, 0.2), (0.0, 0.0)])
def test_offset_is_measured_to_a_tenth_of_a_pixel(membranes, offset):
    dy, dx = estimate_offset([(predicted(membranes, offset), membranes)])
    assert dy == pytest.approx(-offset[0], abs=0.1) and dx == pytest.approx(-offset[1], abs=0.1)
    moved = shift_probabilities(predicted(membranes, offset), (dy, dx))
    assert (moved.argmax(0) != membranes).mean() <= (predicted(membranes, offset).argmax(0) != membranes).mean()


def test_unannotated_pixels_do_not_count(membranes):
    probs = predicted(membranes, (0.5, 0.0))
    sparse = np.where(np.arange(128)[None, :] < 64, membranes, IGNORE)  # right half not annotated
    probs[:, :, 64:] = np.roll(probs[:, :, 64:], 3, axis=1)  # nonsense where nothing is annotated
    dy, dx = estimate_offset([(probs, sparse)])
    assert dy == pytest.approx(-0.5, abs=0.1) and abs(dx) < 0.1
    assert estimate_offset([(probs, np.full_like(membranes, IGNORE))]) == (0.0, 0.0)


def test_moved_images_keep_their_sharpness(rng):
    image = rng.random((80, 96)).astype(np.float32)  # white noise: all of its power in fine detail
    assert np.array_equal(shift_image(image, (1.0, -2.0))[4:-4, 4:-4], np.roll(image, (1, -2), (0, 1))[4:-4, 4:-4])
    moved = shift_image(image, (0.5, 0.0))
    linear = ndi.shift(image, (0.5, 0.0), order=1, mode="nearest")
    assert moved.dtype == np.float32 and moved.shape == image.shape
    assert image.min() <= moved.min() and moved.max() <= image.max()  # no overshoot outside the image's range
    assert moved.std() > 0.9 * image.std() and linear.std() < 0.75 * image.std()  # linear averages the noise away
    smooth = ndi.gaussian_filter(image, 2.0)  # little power near the Nyquist frequency: a shift is undone
    back = shift_image(shift_image(smooth, (0.5, -0.3)), (-0.5, 0.3))
    assert np.abs(back - smooth)[16:-16, 16:-16].max() < 0.05 * smooth.std()
    assert shift_image(image, (0.01, 0.0)) is image and not is_offset((0.01, -0.02))


def test_predictor_moves_probabilities_by_the_cards_offset(tiny_model, rng):
    page = rng.random((96, 80)).astype(np.float32)
    plain = Predictor(tiny_model, device="cpu").predict_page(page)
    tiny_model.card = tiny_model.card.updated(label_offset=(0.5, -0.25), pixel_size_nm=4.0, follow_label_offset=True)
    moved = Predictor(tiny_model, device="cpu").predict_page(page)
    np.testing.assert_allclose(moved, shift_probabilities(plain, (0.5, -0.25)), atol=1e-5)
    np.testing.assert_allclose(moved.sum(0), 1.0, atol=1e-5)
    # a page at twice the model's pixel size: half a model pixel is a quarter of a page pixel
    coarse = Predictor(tiny_model, device="cpu").predict_page(page, pixel_size_nm=8.0)
    tiny_model.card = tiny_model.card.updated(label_offset=(0.0, 0.0))
    coarse_plain = Predictor(tiny_model, device="cpu").predict_page(page, pixel_size_nm=8.0)
    np.testing.assert_allclose(coarse, shift_probabilities(coarse_plain, (0.25, -0.125)), atol=1e-5)


def tiny_config(**changes):
    """Runs that measure and follow the annotation's offset (opt-in: --follow-label-offset)."""
    base = dict(encoder="vgg11_bn_micro", classes=CLASSES, tile_size=64, batch_size=2, steps=8, val_every=2,
                device="cpu", label_offset=True)
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def em():
    return make_em_stack(pages=2, height=96, width=128, seed=3)


def scored(monkeypatch, better_with_offset: bool):
    """Validation scores that favour (or not) predictions moved by an offset, whatever the tiny model draws."""
    real = training._validate

    def validate(net, val, card, amp, offset=None):
        scores = real(net, val, card, amp, offset)
        moved = is_offset(card.label_offset if offset is None else offset)
        return dict(scores, mean_iou=0.9 if moved == better_with_offset else 0.5)
    monkeypatch.setattr(training, "_validate", validate)


def test_training_moves_its_images_once_and_keeps_the_offset(monkeypatch, tmp_path, em):
    measured, moved = [], []
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: measured.append(len(list(pairs))) or (0.5, 0.0))
    real_shift = training.shift_image
    monkeypatch.setattr(training, "shift_image", lambda image, offset: moved.append(offset) or real_shift(image, offset))
    scored(monkeypatch, better_with_offset=True)
    result = train(annotations_from_arrays(*em), tiny_config(), tmp_path / "run")
    # measured at every validation from a quarter into the run (steps 2, 4, 6) and at the end; the
    # same measurement each time, so the two training pages are moved once
    assert len(measured) == 4 and moved == [(0.5, 0.0)] * 2
    card = result.model.card
    assert card.label_offset == (0.5, 0.0)
    assert card.training["label_offset"]["images_moved_by"] == [0.5, 0.0]
    assert card.training["validation"]["mean_iou"] == 0.9
    assert [h.get("images_moved_by") for h in result.history][:2] == [[0.5, 0.0], None]  # marked in curves.png
    # a resumed run moves its images again without measuring anew
    measured.clear(), moved.clear()
    train(annotations_from_arrays(*em), tiny_config(steps=10), tmp_path / "run", resume=True)
    assert moved == [(0.5, 0.0)] * 2 and len(measured) == 1  # only the end-of-run check


def test_the_images_follow_the_mean_of_the_measurements(monkeypatch, tmp_path, em):
    """The first measurement is rough (the network is young) and each later one noisy: the images
    follow the mean of the measurements so far, moved again (from the images as read) when that mean
    has changed by REALIGN_BY or more and scores better; one outlying measurement does not move them."""
    # steps 2, 4, 6 and the end; their means 0.8, 0.6, 0.65, 0.625
    estimates = iter([(0.8, 0.0), (0.4, 0.0), (0.75, 0.0), (0.55, 0.0)])
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: next(estimates))
    moved = []
    real_shift = training.shift_image
    monkeypatch.setattr(training, "shift_image", lambda image, offset: moved.append(offset) or real_shift(image, offset))
    real = training._validate

    def validate(net, val, card, amp, offset=None):  # the closer to 0.5 px, the better
        offset = card.label_offset if offset is None else offset
        return dict(real(net, val, card, amp, offset), mean_iou=0.9 - abs(offset[0] - 0.5))
    monkeypatch.setattr(training, "_validate", validate)
    result = train(annotations_from_arrays(*em), tiny_config(), tmp_path / "run")
    assert moved == [(0.8, 0.0)] * 2 + [(0.6, 0.0)] * 2  # twice the two pages, each time from the originals
    assert [h.get("images_moved_by") for h in result.history][:3] == [[0.8, 0.0], [0.6, 0.0], None]
    assert [h.get("offset_measured") for h in result.history][:3] == [[0.8, 0.0], [0.4, 0.0], [0.75, 0.0]]
    summary = result.model.card.training["label_offset"]
    assert summary["moves"] == [[2, 0.8, 0.0], [4, 0.6, 0.0]] and summary["images_moved_by"] == [0.6, 0.0]
    assert summary["measurements"] == [[2, 0.8, 0.0], [4, 0.4, 0.0], [6, 0.75, 0.0], [8, 0.55, 0.0]]
    # the end's mean (0.625) scores worse than the images' 0.6, which the predictions keep
    assert result.model.card.label_offset == (0.6, 0.0) and summary["used"] == [0.6, 0.0]
    # resumed, the run moves its images by the last move, and its measurements carry on
    moved.clear()
    estimates = iter([(0.2, 0.0)])
    resumed = train(annotations_from_arrays(*em), tiny_config(steps=10), tmp_path / "run", resume=True)
    assert moved == [(0.6, 0.0)] * 2
    summary = resumed.model.card.training["label_offset"]
    assert len(summary["measurements"]) == 4 and summary["measurements"][-1] == [10, 0.2, 0.0]
    assert resumed.model.card.label_offset == (0.538, 0.0)  # (0.8 + 0.4 + 0.75 + 0.2) / 4: nearer 0.5, better


def test_an_interrupted_run_keeps_its_last_measurement(monkeypatch, tmp_path, em):
    """The checkpoint is written again after the offset is measured, so a run stopped right after
    a validation resumes with every measurement and move."""
    estimates = iter([(0.8, 0.0), (0.4, 0.0), (0.75, 0.0)])
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: next(estimates))
    scored(monkeypatch, better_with_offset=True)
    stop = threading.Event()
    result = train(annotations_from_arrays(*em), tiny_config(), tmp_path / "run", stop=stop,
                   progress=lambda event: event.step == 4 and stop.set())
    assert result.stopped
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["state"]
    assert state["offset_measurements"] == [[2, 0.8, 0.0], [4, 0.4, 0.0]] and state["label_offset"] == [0.8, 0.0]
    assert json.loads((tmp_path / "run" / "log.json").read_text())[-1]["offset_measured"] == [0.4, 0.0]


def test_no_moves_near_the_end(monkeypatch, em):
    """Images moved with a tenth of the run left would hardly be learnt from: late validations do not
    measure (the end of the run still does, for the predictions)."""
    measured = []
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: measured.append(1) or (0.5, 0.0))
    monkeypatch.setattr(training, "REALIGN_UNTIL", 0.6)  # of 8 steps: validations at 2 and 4, not 6
    scored(monkeypatch, better_with_offset=True)
    train(annotations_from_arrays(*em), tiny_config())
    assert len(measured) == 3


def test_an_offset_that_does_not_help_is_not_used(monkeypatch, em):
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: (0.5, 0.0))
    monkeypatch.setattr(training, "shift_image", lambda *a: pytest.fail("images moved though the offset scored worse"))
    scored(monkeypatch, better_with_offset=False)
    result = train(annotations_from_arrays(*em), tiny_config())
    assert result.model.card.label_offset == (0.0, 0.0)
    assert result.model.card.training["label_offset"]["mean_iou_measured"] == 0.5


def test_no_offset_no_moving(monkeypatch, em):
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: (0.01, -0.02))
    monkeypatch.setattr(training, "shift_image", lambda *a: pytest.fail("images moved for a negligible offset"))
    result = train(annotations_from_arrays(*em), tiny_config())
    assert result.model.card.label_offset == (0.0, 0.0)
    assert result.model.card.training["label_offset"]["used"] == [0.0, 0.0]


def test_switched_off(monkeypatch, em):
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: pytest.fail("offset measured though switched off"))
    result = train(annotations_from_arrays(*em), tiny_config(label_offset=False))
    assert result.model.card.label_offset == (0.0, 0.0) and "label_offset" not in result.model.card.training


@pytest.mark.parametrize("follow", [True, False])
def test_finetuning_does_not_carry_the_base_offset_over(monkeypatch, em, tiny_model, follow):
    # the base's offset describes its own annotation: the new model's validation and predictions are not moved by it
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: (0.01, 0.0))
    base = Model(tiny_model.net, tiny_model.card.updated(classes=CLASSES, label_offset=(-0.6, 0.2)))
    offsets = []
    real = training._validate

    def validate(net, val, card, amp, offset=None):
        offsets.append(card.label_offset if offset is None else offset)
        return real(net, val, card, amp, offset)
    monkeypatch.setattr(training, "_validate", validate)
    result = train(annotations_from_arrays(*em), tiny_config(label_offset=follow), base=base)
    assert result.model.card.label_offset == (0.0, 0.0)
    assert offsets and not any(is_offset(o) for o in offsets)
    assert base.card.label_offset == (-0.6, 0.2)


# ------------------------------------------------------------------ the offset is opt-in (issue: accuracy that transfers)

def test_an_offset_is_followed_only_when_the_model_was_trained_to_or_a_prediction_asks(tiny_model, rng):
    """A model file of an older emseg (format 3) with ISBI's offset loads and predicts what the image shows;
    its offset applies when asked. A model trained with the offset followed follows it by default."""
    import json
    import tempfile
    from pathlib import Path

    from emseg.model.modelfile import load_model
    page = rng.random((96, 80)).astype(np.float32)
    plain = Predictor(tiny_model, device="cpu").predict_page(page)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "old_model"
        tiny_model.save(folder)
        card = json.loads((folder / "card.json").read_text())
        card.pop("follow_label_offset", None)
        card.update(format_version=3, label_offset=[-0.63, -0.19])
        (folder / "card.json").write_text(json.dumps(card))
        old = load_model(folder)
    assert old.card.label_offset == (-0.63, -0.19) and not old.card.follow_label_offset
    np.testing.assert_allclose(old.predictor(device="cpu").predict_page(page), plain, atol=1e-6)
    asked = old.predictor(device="cpu", follow_label_offset=True).predict_page(page)
    np.testing.assert_allclose(asked, shift_probabilities(plain, (-0.63, -0.19)), atol=1e-5)
    trained = Model(tiny_model.net, tiny_model.card.updated(label_offset=(0.5, 0.0), follow_label_offset=True))
    np.testing.assert_allclose(trained.predictor(device="cpu").predict_page(page),
                               shift_probabilities(plain, (0.5, 0.0)), atol=1e-5)
    np.testing.assert_allclose(trained.predictor(device="cpu", follow_label_offset=False).predict_page(page), plain,
                               atol=1e-6)


def test_new_models_do_not_measure_an_offset_by_default(monkeypatch, em):
    monkeypatch.setattr(training, "estimate_offset", lambda pairs: pytest.fail("offset measured by default"))
    assert TrainConfig().label_offset is False
    result = train(annotations_from_arrays(*em), tiny_config(label_offset=TrainConfig().label_offset))
    assert result.model.card.label_offset == (0.0, 0.0) and not result.model.card.follow_label_offset
