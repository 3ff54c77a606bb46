"""The napari plugin driven through a real viewer and its widgets (headless, under Xvfb).

Run: ``QT_QPA_PLATFORM=xcb xvfb-run -a python -m pytest tests/test_plugin_gui.py``. Skipped (not
failed) without napari, pytest-qt, or an X/Wayland display; napari's vispy canvas needs OpenGL,
which Qt's ``offscreen`` platform does not give.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from conftest import shared_data

pytest.importorskip("napari", reason='needs the napari extra: pip install "emseg[napari]"')
pytest.importorskip("pytestqt", reason="needs pytest-qt (the dev extra)")
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) \
        or os.environ.get("QT_QPA_PLATFORM") == "offscreen":
    pytest.skip("needs a display with OpenGL for napari's canvas: run under `xvfb-run -a` with "
                "QT_QPA_PLATFORM=xcb", allow_module_level=True)

pytestmark = [pytest.mark.gui, pytest.mark.filterwarnings("ignore::DeprecationWarning:pydantic.*")]

CLASSES = ("background", "membrane", "mitochondrion")
JOB_TIMEOUT_MS = 300_000


# -- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated_models(tmp_path, monkeypatch):
    """Fine-tuned models go to a temporary folder; the session's model list starts empty."""
    from emseg_napari import _utils
    monkeypatch.setenv("EMSEG_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(_utils.MODELS, "_added", [])
    monkeypatch.setattr(_utils.MODELS, "_listeners", [])
    monkeypatch.setattr(_utils.MODELS, "latest", None)
    monkeypatch.setattr("emseg.model.modelfile.default_model_path", lambda: tmp_path / "no_default.safetensors")
    return tmp_path / "models"


@pytest.fixture
def tiny_path(tiny_model, tmp_path):
    return tiny_model.save(tmp_path / "tiny.safetensors")


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def sample(viewer):
    """A small crop of the synthetic sample (2 pages, 6 nm/px) with its ground truth."""
    from emseg_napari._sample import make_sample_data
    layers = []
    for data, kwargs, kind in make_sample_data():
        layers.append(getattr(viewer, f"add_{kind}")(data[:2, :96, :128].copy(), **kwargs))
    return layers


def wait(qtbot, widget, timeout=JOB_TIMEOUT_MS):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def dock(viewer, name):
    _dock, widget = viewer.window.add_plugin_dock_widget("emseg", name)
    return widget


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- reader, writer, sample ----------------------------------------------------------------------

def test_sample_opens_with_scale(viewer):
    viewer.open_sample("emseg", "synthetic_tem")
    image, truth = viewer.layers
    assert image.data.shape == truth.data.shape == (8, 512, 512)
    assert tuple(image.scale) == pytest.approx((6.0, 6.0, 6.0))
    assert str(image.units[-1]) == "nanometer"
    assert list(truth.features["class"]) == list(CLASSES)


def test_labels_round_trip_with_scale(viewer, tmp_path):
    import napari
    from emseg_napari._utils import labels_layer_kwargs
    labels = np.zeros((3, 40, 50), np.uint8)
    labels[1, 5:20, 10:30] = 2
    layer = viewer.add_labels(labels, name="mask", **labels_layer_kwargs(CLASSES, 2.5, 3))
    [path] = napari.save_layers(str(tmp_path / "mask.tif"), [layer], plugin="emseg")
    [back] = viewer.open(path, plugin="emseg")
    assert back.__class__.__name__ == "Labels"
    np.testing.assert_array_equal(back.data, labels)
    assert tuple(back.scale) == pytest.approx((2.5, 2.5, 2.5))
    assert list(back.features["class"]) == list(CLASSES)


def test_dm3_opens_with_its_scale_and_segments(viewer, tiny_model, tmp_path, qtbot):
    path = shared_data("em_formats", "Se_implanted_MoS2_STEM.dm3")
    [layer] = viewer.open(str(path), plugin="emseg")
    assert layer.data.shape == (1024, 1024)
    assert layer.scale[-1] == pytest.approx(0.0127, rel=0.02)
    assert str(layer.units[-1]) == "nanometer"
    # a model trained at 6 nm/px: rescaling a 0.0127 nm/px image 470x would leave 2 x 2 pixels
    model = tiny_model.save(tmp_path / "at6nm.safetensors", card=tiny_model.card.updated(pixel_size_nm=6.0))
    seg = dock(viewer, "Segment")
    seg.select_model(model)
    assert seg.run()
    wait(qtbot, seg)
    result = viewer.layers[f"{layer.name} [at6nm]"]
    assert result.data.shape == (1024, 1024) and tuple(result.scale) == pytest.approx(tuple(layer.scale))
    assert len(np.unique(result.data)) > 1  # segmented at the image's pixels, not from 2 x 2 pixels


# -- Segment -----------------------------------------------------------------------------------

def test_segment_stack_gives_labels_with_the_image_scale(viewer, sample, tiny_path, qtbot, monkeypatch):
    import time

    from emseg.infer.predictor import Predictor
    forward = Predictor.forward

    def slow_forward(self, batch, **options):  # segmenting lasts long enough for the GUI timer to tick
        time.sleep(0.1)
        return forward(self, batch, **options)
    monkeypatch.setattr(Predictor, "forward", slow_forward)
    image = sample[0]
    seg = dock(viewer, "Segment")
    seg.select_model(tiny_path)
    seg.image.set_layer(image)
    seg.probabilities.setChecked(True)
    from qtpy.QtCore import QTimer
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(seg.running))
    timer.start(20)
    assert seg.run(whole_stack=True)
    wait(qtbot, seg)
    timer.stop()
    assert sum(ticks) >= 3, "the GUI thread was blocked while segmenting"
    result = viewer.layers["emseg sample [tiny]"]
    assert result.data.shape == image.data.shape
    assert tuple(result.scale) == pytest.approx(tuple(image.scale))
    assert list(result.features["class"]) == list(CLASSES)
    assert result.metadata["emseg_classes"] == list(CLASSES)
    assert result.colormap.map(1) is not None
    assert "Segmented 2 slices" in seg.last_message
    probs = viewer.layers["emseg sample [tiny] p(membrane)"]
    assert probs.data.shape == image.data.shape and 0 <= probs.data.min() <= probs.data.max() <= 1
    assert seg.progress.bar.value() == 1000


def test_segment_slice_fills_only_that_slice(viewer, sample, tiny_path, qtbot):
    seg = dock(viewer, "Segment")
    seg.select_model(tiny_path)
    seg.image.set_layer(sample[0])
    viewer.dims.set_point(0, sample[0].scale[0] * 1)  # show slice 2
    assert seg.run(whole_stack=False)
    wait(qtbot, seg)
    result = viewer.layers["emseg sample [tiny]"]
    assert result.data.shape == (2, 96, 128)
    assert not result.data[0].any() and result.data[1].any()
    assert "slice 2" in seg.last_message


def test_segment_cancel_leaves_the_layers_alone(viewer, sample, tiny_path, qtbot):
    seg = dock(viewer, "Segment")
    seg.select_model(tiny_path)
    seg.image.set_layer(sample[0])
    seg.tta.setChecked(True)
    before = [layer.name for layer in viewer.layers]
    assert seg.run(whole_stack=True)
    assert seg.progress.button.isEnabled()
    seg.progress.button.click()
    wait(qtbot, seg)
    assert "cancelled" in seg.last_message
    assert [layer.name for layer in viewer.layers] == before
    assert seg.slice_button.isEnabled() and not seg.progress.button.isEnabled()


def test_pixel_size_can_be_set_for_an_uncalibrated_image(viewer, tiny_path, qtbot):
    truth = viewer.add_labels(np.zeros((64, 96), np.uint8), name="truth")
    other = viewer.add_image(np.zeros((32, 32), np.uint8), name="other")
    image = viewer.add_image(np.random.default_rng(0).integers(0, 255, (64, 96), np.uint8), name="plain")
    seg = dock(viewer, "Segment")
    assert seg.pixel_size.text() == "unknown"
    seg.pixel_size.setValue(5.0)
    assert tuple(image.scale) == pytest.approx((5.0, 5.0)) and str(image.units[-1]) == "nanometer"
    assert tuple(truth.scale) == pytest.approx((5.0, 5.0))  # same shape, uncalibrated: kept aligned
    assert tuple(other.scale) == (1.0, 1.0)
    seg.select_model(tiny_path)
    assert seg.run()
    wait(qtbot, seg)
    result = viewer.layers["plain [tiny]"]
    assert result.data.shape == (64, 96) and tuple(result.scale) == pytest.approx((5.0, 5.0))
    assert result.metadata["emseg_pixel_size_nm"] == 5.0


def test_segment_errors_are_notifications(viewer, tiny_path, tmp_path, qtbot):
    seg = dock(viewer, "Segment")
    seg.select_model(tiny_path)
    assert not seg.run()
    assert "No image layer" in seg.last_message
    viewer.add_image(np.zeros((64, 64), np.uint8), name="img")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is no model")
    seg.select_model(broken)
    assert seg.model_info.text().startswith("⚠")
    assert seg.run()
    wait(qtbot, seg)
    assert "not an emseg model file" in seg.last_message
    assert [layer.name for layer in viewer.layers] == ["img"]


# -- Fine-tune ---------------------------------------------------------------------------------

def _paint_sparse(layer, truth, every=6):
    """Scribbles: every ``every``-th row of the ground truth, as sparse labels (class k -> k + 1)."""
    data = np.zeros_like(layer.data)
    data[..., ::every, :] = truth[..., ::every, :] + 1
    layer.data = data


def test_finetune_saves_a_model_that_segment_uses(viewer, sample, tiny_path, isolated_models, qtbot):
    image, truth = sample
    base_digest = digest(tiny_path)
    seg = dock(viewer, "Segment")
    ft = dock(viewer, "Fine-tune")
    ft.base.add(tiny_path)
    assert ft.class_names() == CLASSES and not ft.encoder.isEnabled()
    assert ft.blend.isEnabled() and ft.blend.isChecked()  # a base with classes: blended with it by default
    ft.image.set_layer(image)
    scribbles = ft.make_scribble_layer()
    assert scribbles.data.shape == image.data.shape and tuple(scribbles.scale) == tuple(image.scale)
    _paint_sparse(scribbles, truth.data)
    ft.classes.item(1, 1).setText("cell membrane")  # class names are editable
    assert list(scribbles.features["class"]) == ["(not annotated)", "background", "cell membrane", "mitochondrion"]
    ft.steps.setValue(10)
    ft.val_every.setValue(5)
    ft.batch.setValue(2)
    ft.tile.setValue(64)
    assert ft.start()
    wait(qtbot, ft)
    assert ft.class_names() == ("background", "cell membrane", "mitochondrion")  # kept after saving
    saved = ft.last_model_path
    assert saved is not None and saved.parent == isolated_models and saved.exists(), ft.last_message
    assert saved.name.startswith("tiny-finetuned-") and saved.suffix == ".safetensors"
    assert digest(tiny_path) == base_digest
    from emseg.model.modelfile import load_card
    assert load_card(saved).training["config"]["base_share"] == 0  # a class renamed: a fresh head, nothing to blend
    assert "step 10/10" in ft.readout.text() and "loss" in ft.readout.text()
    preview = viewer.layers["emseg sample preview"]
    assert preview.data.shape == image.data.shape
    assert seg.model.path() == saved  # offered and selected in the Segment widget
    seg.image.set_layer(image)
    assert seg.run(whole_stack=False)
    wait(qtbot, seg)
    result = viewer.layers[f"emseg sample [{saved.stem}]"]
    assert list(result.features["class"]) == ["background", "cell membrane", "mitochondrion"]
    assert dock(viewer, "Segment").model.path() == saved  # a Segment widget opened later offers it first


def test_finetune_new_model_stop_keeps_a_checkpoint(viewer, sample, qtbot):
    image, truth = sample
    ft = dock(viewer, "Fine-tune")
    assert ft.base.is_new() and ft.encoder.isEnabled() and not ft.blend.isEnabled()
    ft.encoder.setCurrentText("vgg11_bn_micro")
    ft.set_classes(CLASSES)
    ft.image.set_layer(image)
    _paint_sparse(ft.make_scribble_layer(), truth.data)
    ft.steps.setValue(100_000)
    ft.val_every.setValue(2)
    ft.batch.setValue(2)
    ft.tile.setValue(64)
    assert ft.start()
    qtbot.waitUntil(lambda: "held-out IoU" in ft.readout.text(), timeout=JOB_TIMEOUT_MS)
    ft.stop_button.click()
    wait(qtbot, ft)
    assert ft.last_model_path is not None and ft.last_model_path.exists(), ft.last_message
    assert ft.last_message.startswith("Stopped after")
    from emseg.model.modelfile import load_card
    card = load_card(ft.last_model_path)
    assert card.encoder == "vgg11_bn_micro" and card.classes == CLASSES
    assert card.training["steps"] < 100_000


def test_finetune_self_trains_on_the_slices_not_painted(viewer, sample, qtbot):
    image, truth = sample
    ft = dock(viewer, "Fine-tune")
    ft.encoder.setCurrentText("vgg11_bn_micro")
    ft.set_classes(CLASSES)
    ft.image.set_layer(image)
    scribbles = ft.make_scribble_layer()
    painted = scribbles.data.copy()
    painted[0] = truth.data[0] + 1  # the first slice painted whole, the second left for the model to label
    scribbles.data = painted
    for box, value in ((ft.steps, 10), (ft.val_every, 5), (ft.batch, 2), (ft.tile, 64)):
        box.setValue(value)
    assert not ft.self_train.isChecked()  # an option: it helped membranes only (docs/training.md)
    ft.self_train.setChecked(True)
    assert ft.start()
    wait(qtbot, ft)
    assert ft.last_model_path is not None, ft.last_message
    from emseg.model.modelfile import load_card
    record = load_card(ft.last_model_path).training["self_training"]
    assert record["unlabelled_pages"] == 1 and record["teacher_steps"] == 5
    assert "step 10/10" in ft.readout.text()  # one count over the teacher's and the student's steps


def test_finetune_errors_are_notifications(viewer, tiny_path, qtbot):
    ft = dock(viewer, "Fine-tune")
    ft.base.add(tiny_path)
    assert not ft.start() and "No image layer" in ft.last_message
    image = viewer.add_image(np.zeros((64, 64), np.uint8), name="img")
    ft.image.set_layer(image)
    assert not ft.start() and "No annotation layer" in ft.last_message
    scribbles = ft.make_scribble_layer()
    assert not ft.start() and "nothing is painted" in ft.last_message
    viewer.layers.remove(scribbles)
    other = viewer.add_labels(np.ones((32, 32), np.uint8), name="other")
    ft.annotations.set_layer(other)
    assert not ft.start() and "shape" in ft.last_message
    assert not ft.running and [layer.name for layer in viewer.layers] == ["img", "other"]


def test_a_pretrained_model_is_a_base_for_finetuning_not_for_segmenting(viewer, sample, tmp_path, qtbot):
    from emseg.synthetic import make_em_stack
    from emseg.train.data import Annotated
    from emseg.train.pretrain import PretrainConfig, _crop_grid, pretrain
    page = make_em_stack(pages=1, height=96, width=96, seed=2)[0][0].astype(np.float32) / 255
    result = pretrain([Annotated(page, _crop_grid(page.shape), "page", None)],
                      PretrainConfig(encoder="vgg11_bn_micro", tile_size=64, batch_size=2, steps=2, val_every=2,
                                     time_limit_minutes=None, device="cpu"), tmp_path / "pre")
    image, truth = sample
    ft = dock(viewer, "Fine-tune")
    ft.base.add(result.model_path)
    assert len(ft.class_names()) >= 2 and "pretrained" in ft.status.text() and not ft.blend.isEnabled()
    ft.set_classes(CLASSES)  # the sample's three
    ft.image.set_layer(image)
    scribbles = ft.make_scribble_layer()
    _paint_sparse(scribbles, truth.data)
    ft.steps.setValue(4)
    ft.val_every.setValue(2)
    ft.batch.setValue(2)
    ft.tile.setValue(64)
    assert ft.start()
    wait(qtbot, ft)
    from emseg.model.modelfile import load_card
    card = load_card(ft.last_model_path)
    assert not card.is_pretrained and card.classes == ft.class_names()
    seg = dock(viewer, "Segment")
    seg.model.add(result.model_path)
    seg.image.set_layer(image)
    seg.run(whole_stack=False)
    wait(qtbot, seg)
    assert "pretrained model" in seg.last_message


@pytest.mark.parametrize("objective", ["masked", "contrastive"])
def test_pretrain_on_a_layer_gives_a_base_for_finetuning(viewer, sample, isolated_models, qtbot, objective):
    image, _truth = sample  # a stack of 2 pages at 6 nm/px, taken as unlabelled
    pre = dock(viewer, "Pretrain")
    pre.image.set_layer(image)
    assert pre.name.text() == "emseg_sample-pretrained"
    pre.encoder.setCurrentText("vgg11_bn_micro")
    assert pre.objective.currentText() == "restoration"
    pre.objective.setCurrentText(objective)
    pre.tile.setValue(64)
    pre.batch.setValue(2)
    assert pre.start(steps=4)
    wait(qtbot, pre)
    saved = pre.last_model_path
    assert saved is not None and saved.name == "model.safetensors", pre.last_message
    assert saved.parent.parent == isolated_models and saved.parent.name.startswith("emseg_sample-pretrained-")
    picture = "features.png" if objective == "contrastive" else "restorations.png"
    assert (saved.parent / picture).is_file() and not pre.picture.pixmap().isNull()
    assert pre.last_message.startswith("Finished after 4 steps") and "Base model in Fine-tune" in pre.last_message
    what, reference = {"masked": ("filling in the hidden patches of held-out crops", "the masked input itself"),
                       "contrastive": ("matching the features of held-out crops' two views",
                                       "the untrained network")}[objective]
    assert f"{what}:" in pre.readout.text() and f"({reference}:" in pre.readout.text()
    assert f"; {what}: a loss of" in pre.last_message and f"for {reference}" in pre.last_message
    from emseg.model.modelfile import load_card
    card = load_card(saved)
    assert card.is_pretrained and card.encoder == "vgg11_bn_micro" and card.pretrained["steps"] == 4
    assert card.pretrained["objective"] == objective
    assert card.pretrained["sources"] == ["emseg sample"] and card.pretrained["pages"] == 2
    assert card.pixel_size_nm == pytest.approx(6.0)  # the layer's, kept end to end
    ft = dock(viewer, "Fine-tune")  # offered by its folder's name, in this session and the next
    labels = [ft.base.combo.itemText(i) for i in range(ft.base.combo.count())]
    assert saved.parent.name in labels
    ft.base.combo.setCurrentIndex(labels.index(saved.parent.name))
    assert "pretrained" in ft.status.text()


def test_pretrain_refuses_what_it_cannot_learn_from(viewer, qtbot):
    pre = dock(viewer, "Pretrain")
    assert not pre.start() and "No image layer" in pre.last_message
    small = viewer.add_image(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8), name="small")
    pre.image.set_layer(small)
    assert not pre.start() and "smaller than the 128-pixel crops" in pre.last_message
    mask = viewer.add_image(np.repeat(np.arange(4, dtype=np.uint8), 64)[None].repeat(256, 0), name="mask")
    pre.image.set_layer(mask)
    assert not pre.start() and "looks like a mask" in pre.last_message
    pre.objective.setCurrentText("contrastive")  # its two views need room: crops of 32 px leave none
    pre.tile.setValue(32)
    assert not pre.start() and "crop size of at least 64 px" in pre.last_message
    assert not pre.running and pre.last_model_path is None


# -- the whole sequence --------------------------------------------------------------------------

def _disks(size=128, seed=0):
    """A page with bright disks (class 1) on a noisy background, and its truth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), np.uint8)
    for cy, cx, r in [(30, 30, 12), (80, 40, 15), (60, 100, 10), (105, 95, 14), (20, 85, 9)]:
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    image = (60 + 120 * truth + rng.normal(0, 20, truth.shape)).clip(0, 255).astype(np.uint8)
    return image, truth


@pytest.mark.slow
def test_open_segment_paint_finetune_resegment_save(viewer, tmp_path, isolated_models, monkeypatch, qtbot):
    """The issue's "done when" sequence, through the widgets: open a calibrated file, segment it with
    the default model, paint scribbles on the mistakes, fine-tune, re-segment, see them fixed, save."""
    import napari
    import torch

    from emseg.io.read import open_image
    from emseg.io.write import TiffStackWriter
    from emseg.model.card import ModelCard
    from emseg.model.modelfile import Model, load_model

    image, truth = _disks()
    path = tmp_path / "disks.tif"
    with TiffStackWriter(path, shape=image.shape, dtype=image.dtype, pixel_size_nm=5.0) as w:
        w.write_page(image)
    torch.manual_seed(0)
    default = Model.new(ModelCard(encoder="vgg11_bn_micro", classes=("background", "disk"), tile_size=64,
                                  overlap=16)).save(tmp_path / "default_model.safetensors")
    monkeypatch.setattr("emseg.model.modelfile.default_model_path", lambda: default)
    default_digest = digest(default)

    # open: the scale is the file's pixel size
    [layer] = viewer.open(str(path), plugin="emseg")
    assert tuple(layer.scale) == pytest.approx((5.0, 5.0))

    # segment with the default model (first in the list)
    seg = dock(viewer, "Segment")
    assert seg.model.combo.currentText() == "default (bundled)"
    seg.image.set_layer(layer)
    assert seg.run()
    wait(qtbot, seg)
    before = viewer.layers["disks [default_model]"].data.copy()
    mistakes = before != truth
    assert mistakes.mean() > 0.05  # an untrained model gets plenty wrong

    # paint scribbles on the mistakes (plus a little of each class elsewhere), through the class table
    ft = dock(viewer, "Fine-tune")
    assert ft.base.combo.currentText() == "default (bundled)"
    ft.image.set_layer(layer)
    scribbles = ft.make_scribble_layer()
    scribbles.brush_size = 1
    rows = np.zeros_like(mistakes)
    rows[::5] = True
    for cls in (0, 1):
        ft.classes.selectRow(cls)
        assert scribbles.selected_label == cls + 1 and scribbles.mode == "paint"
        ys, xs = np.nonzero(rows & (truth == cls) & (mistakes | (np.arange(128) % 15 == 0)))
        for y, x in zip(ys, xs):
            scribbles.paint((y, x), scribbles.selected_label, refresh=False)
    scribbles.refresh()
    assert set(np.unique(scribbles.data)) == {0, 1, 2}

    # fine-tune
    ft.steps.setValue(40)
    ft.val_every.setValue(20)
    ft.batch.setValue(4)
    ft.tile.setValue(64)
    ft.lr.setValue(5e-3)
    assert ft.start()
    wait(qtbot, ft)
    saved = ft.last_model_path
    assert saved is not None and saved.parent == isolated_models, ft.last_message
    assert digest(default) == default_digest  # the base model is never changed
    chosen = load_model(saved).card.training["base_share"]  # the classes kept: blended by validation (auto)
    assert set(chosen["validation_mean_iou"]) == {"0", "0.25", "0.5", "0.75"}
    assert ("blended with the base model" in ft.last_message) is (chosen["chosen"] > 0)

    # re-segment with the fine-tuned model (selected for us) and see the mistakes fixed
    assert seg.model.path() == saved
    assert seg.run()
    wait(qtbot, seg)
    after = viewer.layers[f"disks [{saved.stem}]"]
    assert tuple(after.scale) == pytest.approx((5.0, 5.0))
    fixed = (after.data == truth)[mistakes].mean()
    assert fixed > 0.9, f"only {fixed:.2f} of the mistakes fixed"
    assert (after.data == truth).mean() > 0.95

    # save the labels and check the model file
    [out] = napari.save_layers(str(tmp_path / "disks_labels.tif"), [after], plugin="emseg")
    with open_image(out) as src:
        np.testing.assert_array_equal(src.page(0), after.data)
        assert src.pixel_size_nm == pytest.approx(5.0)
    assert load_model(saved).classes == ("background", "disk")


def test_segment_finds_objects_and_shows_their_measurements(viewer, qtbot, tmp_path):
    """Segment with "find objects": an objects layer whose features are the measurements in nm, and
    the measurements panel (summary, histograms, table) that takes the viewer to a clicked object."""
    import csv

    from conftest import REPO
    from emseg_napari._sample import make_sample_data
    (image_data, kwargs, _), *_ = make_sample_data()
    image = viewer.add_image(image_data[:2].copy(), **kwargs)
    seg = dock(viewer, "Segment")
    seg.select_model(REPO / "emseg" / "data" / "default_model.safetensors")
    seg.image.set_layer(image)
    seg.objects.setChecked(True)
    seg.min_size.setValue(20)
    assert seg.split.isEnabled()
    assert seg.object_classes.text() == "mitochondrion"  # from the model, the membrane network left out
    seg.object_classes.setText("mitochondrion, nucleus")
    assert not seg.run(whole_stack=True) and "nucleus" in seg.last_message
    seg.object_classes.setText("mitochondrion")
    assert seg.run(whole_stack=True)
    wait(qtbot, seg)
    assert seg.last_objects_layer is not None, seg.last_message
    objects = viewer.layers[seg.last_objects_layer.name]
    assert objects.data.shape == image.data.shape
    assert tuple(objects.scale) == pytest.approx(tuple(image.scale))
    n = int(objects.data.max())
    assert n >= 5 and f"{n} objects measured" in seg.last_message
    features = objects.features
    assert len(features) == n + 1 and list(features["label"]) == list(range(n + 1))
    assert {"area_nm2", "equivalent_diameter_nm", "touches_border", "mean_intensity"} <= set(features.columns)
    assert set(features["class"].iloc[1:]) == {"mitochondrion"}
    assert features["area_nm2"].iloc[1:].min() >= 20 * 6.0 ** 2  # min size 20 px at 6 nm/px
    panel = seg.measurements
    assert panel.table.rowCount() == n and panel.summary.text().startswith(f"{n} objects")
    assert len(panel.figure.axes) >= 1 and panel.figure.axes[0].patches  # a histogram was drawn
    label = int(features["label"].iloc[-1])
    panel.go_to(label)
    assert objects.selected_label == label
    row = features.iloc[-1]
    assert viewer.dims.point[0] == pytest.approx(row["slice"] * image.scale[0])
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    assert camera.center[-1] == pytest.approx(row["centroid_x_nm"], abs=1e-3)
    path = panel.save(tmp_path / "objects.csv")
    with open(path) as f:
        assert len(list(csv.DictReader(f))) == n
    assert (tmp_path / "objects_summary.csv").exists()


# -- whole volume (ortho-plane) -------------------------------------------------------------------

@pytest.fixture
def volume(viewer):
    """A small synthetic FIB-SEM volume with 5 nm voxels, as its sample layers come."""
    from emseg_napari._utils import layer_kwargs

    from emseg.synthetic3d import make_em_volume
    vol = make_em_volume((24, 64, 64), seed=0)
    return viewer.add_image(vol.image, name="vol", **layer_kwargs(5.0, 3, 5.0))


def test_segment_volume_ortho_shows_3d_labels_and_3d_measurements(viewer, volume, tiny_path, qtbot):
    seg = dock(viewer, "Segment")
    seg.select_model(tiny_path)
    seg.image.set_layer(volume)
    assert seg.volume_button.isEnabled() and seg.z_spacing.value() == pytest.approx(5.0)
    seg.objects.setChecked(True)
    seg.object_classes.setText("")
    seg.combine.setCurrentText("vote")
    fractions = []
    seg.progress.bar.valueChanged.connect(fractions.append)
    seg.volume_button.click()
    assert seg.running and not seg.volume_button.isEnabled()
    wait(qtbot, seg)
    result = viewer.layers["vol [tiny]"]
    assert result.data.shape == (24, 64, 64) and tuple(result.scale) == pytest.approx((5.0, 5.0, 5.0))
    assert viewer.dims.ndisplay == 3
    assert "whole volume (ortho-plane)" in seg.last_message and seg.progress.bar.value() == 1000
    assert len(set(fractions)) > 3  # the bar moved while the planes were segmented
    objects = viewer.layers[seg.last_objects_layer.name]
    assert {"volume_nm3", "surface_area_nm2", "equivalent_diameter_3d_nm", "bbox_z0"} <= set(objects.features.columns)
    headers = [seg.measurements.table.horizontalHeaderItem(c).text()
               for c in range(seg.measurements.table.columnCount())]
    assert "volume_nm3" in headers and "n_slices" in headers


def test_segment_volume_needs_a_volume_and_its_spacing_and_can_be_cancelled(viewer, volume, tiny_path, qtbot):
    seg = dock(viewer, "Segment")
    seg.select_model(tiny_path)
    flat = viewer.add_image(np.zeros((40, 40), np.uint8), name="flat")
    seg.image.set_layer(flat)
    assert not seg.volume_button.isEnabled()
    assert not seg.run(ortho=True) and "2D image" in seg.last_message
    seg.image.set_layer(volume)
    seg.z_spacing.setValue(0.0)
    assert volume.metadata["emseg_z_spacing_nm"] is None
    assert not seg.run(ortho=True) and "slice spacing" in seg.last_message
    seg.z_spacing.setValue(60.0)  # ssTEM-like sections: refused in one line
    assert tuple(volume.scale)[0] == pytest.approx(60.0)
    assert not seg.run(ortho=True) and "12.0x anisotropic" in seg.last_message
    seg.z_spacing.setValue(5.0)
    seg.tta.setChecked(True)
    before = [layer.name for layer in viewer.layers]
    assert seg.run(ortho=True)
    seg.progress.button.click()
    wait(qtbot, seg)
    assert "cancelled" in seg.last_message and [layer.name for layer in viewer.layers] == before


def test_volume_sample_opens_with_its_voxel_size(viewer):
    image, truth = viewer.open_sample("emseg", "synthetic_fibsem")
    assert image.data.shape[0] > 1 and tuple(image.scale) == pytest.approx((5.0, 5.0, 5.0))
    assert image.metadata["emseg_z_spacing_nm"] == 5.0 and list(truth.features["class"]) == list(CLASSES)
