"""The napari plugin without a display: manifest, imports, the core's independence from Qt, reader, writer.

The viewer-driven tests are in test_plugin_gui.py.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO, shared_data

MANIFEST = REPO / "plugins" / "emseg_napari" / "napari.yaml"
# npe2/napari build pydantic models with a deprecated option; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pydantic.*")

GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy")


def test_core_imports_no_qt_or_napari():
    """Importing every emseg module loads no Qt binding and no napari (the plugin is a separate layer)."""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        import emseg
        failed = []
        for info in pkgutil.walk_packages(emseg.__path__, "emseg."):
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # a module being written elsewhere must not hide a Qt import
                failed.append(f"{{info.name}}: {{exc!r}}")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in {GUI_MODULES!r})
        print("FAILED", failed)
        print("GUI", bad)
        assert not bad, bad
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "GUI []" in out.stdout


def test_manifest_validates():
    npe2 = pytest.importorskip("npe2", reason='needs the napari extra: pip install "emseg[napari]"')
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "emseg"
    contributions = manifest.contributions
    assert len(contributions.readers) == 1 and len(contributions.writers) == 1
    assert len(contributions.sample_data) == 2 and len(contributions.widgets) == 3
    patterns = contributions.readers[0].filename_patterns
    for suffix in ("dm3", "dm4", "emd", "ser", "mrc", "hspy", "tif", "tiff"):
        assert f"*.{suffix}" in patterns


def test_every_manifest_command_imports():
    npe2 = pytest.importorskip("npe2", reason='needs the napari extra: pip install "emseg[napari]"')
    pytest.importorskip("qtpy", reason='needs the napari extra: pip install "emseg[napari]"')
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert len(manifest.contributions.commands) == 7
    for command in manifest.contributions.commands:
        module, _, attr = command.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), command.python_name


def test_napari_finds_the_installed_plugin():
    npe2 = pytest.importorskip("npe2", reason='needs the napari extra: pip install "emseg[napari]"')
    from importlib.metadata import entry_points
    names = [ep.value for ep in entry_points(group="napari.manifest") if ep.name == "emseg"]
    assert names == ["emseg_napari:napari.yaml"], (
        "emseg is not installed with its napari entry point; run `pip install -e .` in the checkout")
    pm = npe2.PluginManager()
    pm.discover()
    manifest = pm.get_manifest("emseg")
    assert manifest.name == "emseg"
    assert {w.display_name for w in manifest.contributions.widgets} == {"Segment", "Fine-tune", "Pretrain"}


def test_missing_napari_says_what_to_install(monkeypatch):
    from emseg_napari._utils import require_napari
    monkeypatch.setitem(sys.modules, "napari", None)
    with pytest.raises(ImportError, match=r'pip install "emseg\[napari\]"'):
        require_napari()


# -- reader ----------------------------------------------------------------------------------

def _write_tiff(path, array, pixel_size_nm=None, metadata=None):
    from emseg.io.write import TiffStackWriter
    with TiffStackWriter(path, shape=array.shape, dtype=array.dtype, pixel_size_nm=pixel_size_nm,
                         metadata=metadata) as w:
        w.write_page(array)
    return path


def test_get_reader_declines_what_it_cannot_read(tmp_path):
    from emseg_napari._reader import get_reader
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "a.tif").write_bytes(b"")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "missing.dm3")) is None
    assert get_reader(str(tmp_path)) is None
    assert get_reader([str(tmp_path / "a.tif"), str(tmp_path / "a.tif")]) is None
    assert get_reader(str(tmp_path / "a.tif")) is not None


def test_reader_returns_nothing_for_a_broken_file(tmp_path):
    from emseg_napari._reader import get_reader
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage that is not a TIFF")
    reader = get_reader(str(bad))
    assert reader is not None
    assert reader(str(bad)) is None  # a warning notification says why; nothing raises


def test_reader_sets_the_scale_in_nm(tmp_path):
    from emseg_napari._reader import read_em
    stack = np.arange(3 * 40 * 50, dtype=np.uint16).reshape(3, 40, 50)
    path = _write_tiff(tmp_path / "stack.tif", stack, pixel_size_nm=4.5)
    [(data, kwargs, kind)] = read_em(str(path))
    assert kind == "image" and kwargs["name"] == "stack"
    np.testing.assert_array_equal(data, stack)
    assert kwargs["scale"] == pytest.approx((4.5, 4.5, 4.5))
    assert kwargs["units"] == ("nm", "nm", "nm")
    assert kwargs["metadata"]["emseg_pixel_size_nm"] == pytest.approx(4.5)


def test_reader_without_calibration_keeps_pixel_units(tmp_path):
    from emseg_napari._reader import read_em
    path = _write_tiff(tmp_path / "plain.tif", np.zeros((30, 20), np.uint8))
    [(data, kwargs, kind)] = read_em(str(path))
    assert data.shape == (30, 20) and "scale" not in kwargs and kwargs["metadata"]["emseg_pixel_size_nm"] is None


def test_reader_opens_emseg_masks_as_labels(tmp_path):
    pytest.importorskip("napari", reason='needs the napari extra: pip install "emseg[napari]"')
    from emseg_napari._reader import read_em
    mask = np.zeros((32, 32), np.uint8)
    mask[4:9, 4:20] = 2
    path = _write_tiff(tmp_path / "x_mask.tif", mask, 7.0, {"classes": ["background", "membrane", "mito"]})
    [(data, kwargs, kind)] = read_em(str(path))
    assert kind == "labels"
    assert kwargs["features"]["class"] == ["background", "membrane", "mito"]
    assert kwargs["scale"] == pytest.approx((7.0, 7.0))


def test_reader_dm3_has_its_calibration():
    from emseg_napari._reader import read_em
    path = shared_data("em_formats", "Se_implanted_MoS2_STEM.dm3")
    [(data, kwargs, kind)] = read_em(str(path))
    assert kind == "image" and data.shape == (1024, 1024)
    assert kwargs["scale"][-1] == pytest.approx(0.0127, rel=0.02)
    assert kwargs["units"][-1] == "nm"


def test_reader_emd_has_its_calibration():
    from emseg_napari._reader import read_em
    path = shared_data("em_formats", "Au_nanoparticle_HAADF.emd")
    [(data, kwargs, kind)] = read_em(str(path))
    assert kind == "image" and data.shape == (2048, 2048)
    assert kwargs["scale"][-1] == pytest.approx(0.0075, rel=0.05)


# -- writer ----------------------------------------------------------------------------------

def test_writer_round_trip_with_scale_and_classes(tmp_path):
    pytest.importorskip("napari", reason='needs the napari extra: pip install "emseg[napari]"')
    from emseg_napari._reader import read_em
    from emseg_napari._writer import write_labels
    labels = np.zeros((2, 24, 30), np.int32)
    labels[0, 3:8, 5:9] = 1
    labels[1, 10:20, 2:4] = 300
    meta = {"emseg_pixel_size_nm": 3.0, "emseg_classes": [f"c{i}" for i in range(301)]}
    [written] = write_labels(str(tmp_path / "out.tiff"), labels, {"metadata": meta, "scale": (3.0,) * 3})
    [(data, kwargs, kind)] = read_em(written)
    assert kind == "labels" and data.dtype == np.uint16
    np.testing.assert_array_equal(data, labels)
    assert kwargs["scale"] == pytest.approx((3.0, 3.0, 3.0))


def test_writer_takes_the_scale_from_units(tmp_path):
    pytest.importorskip("napari", reason='needs the napari extra: pip install "emseg[napari]"')
    import pint
    from emseg_napari._writer import write_labels

    from emseg.io.read import open_image
    um = pint.get_application_registry().Unit("µm")
    [written] = write_labels(str(tmp_path / "out.tif"), np.ones((8, 8), np.uint8),
                             {"scale": (0.01, 0.01), "units": (um, um)})
    with open_image(written) as src:
        assert src.pixel_size_nm == pytest.approx(10.0)


def test_writer_refuses_negative_labels(tmp_path):
    from emseg_napari._writer import write_labels
    with pytest.raises(ValueError, match="negative"):
        write_labels(str(tmp_path / "out.tif"), -np.ones((4, 4), np.int32), {})
    assert not (tmp_path / "out.tif").exists()


# -- messages and helpers ---------------------------------------------------------------------

def test_out_of_memory_message_says_what_to_do():
    import torch
    from emseg_napari._utils import describe_error

    from emseg.errors import ModelFileError
    text = describe_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "Segmenting")
    assert "tile size" in text and "cpu" in text
    assert describe_error(ModelFileError("m.safetensors: not an emseg model file")).startswith("m.safetensors")


def test_sample_data_has_image_and_ground_truth():
    pytest.importorskip("napari", reason='needs the napari extra: pip install "emseg[napari]"')
    from emseg_napari._sample import make_sample_data
    (image, image_kwargs, image_kind), (masks, mask_kwargs, mask_kind) = make_sample_data()
    assert (image_kind, mask_kind) == ("image", "labels")
    assert image.shape == masks.shape == (8, 512, 512) and image.dtype == np.uint8
    assert image_kwargs["scale"] == pytest.approx((6.0,) * 3)
    assert mask_kwargs["features"]["class"] == ["background", "membrane", "mitochondrion"]
    assert set(np.unique(masks)) <= {0, 1, 2}


def test_finetune_job_refuses_bad_annotations():
    from emseg_napari._jobs import check_annotations

    from emseg.errors import InputError
    classes = ("background", "membrane")
    with pytest.raises(InputError, match="nothing is painted"):
        check_annotations(np.zeros((8, 8), np.uint8), classes, sparse=True, name="s")
    with pytest.raises(InputError, match="label 3 is painted"):
        check_annotations(np.full((8, 8), 3, np.uint8), classes, sparse=True, name="s")
    check_annotations(np.full((8, 8), 2, np.uint8), classes, sparse=True, name="s")
    check_annotations(np.ones((8, 8), np.uint8), classes, sparse=False, name="s")


def test_pretrain_job_saves_a_run_folder_and_stops_when_asked(tmp_path):
    import threading

    from emseg_napari._jobs import PretrainRequest, pretrain_layer

    from emseg.model.modelfile import load_card
    from emseg.synthetic import make_em_stack
    stack = make_em_stack(pages=2, height=96, width=96, seed=4)[0]
    request = PretrainRequest(image=stack, out_dir=tmp_path / "pre", encoder="vgg11_bn_micro", minutes=None,
                              steps=3, tile_size=64, batch_size=2, device="cpu", pixel_size_nm=5.0, val_every=3,
                              layer_name="stack")
    events = []
    result = pretrain_layer(request, progress=events.append)
    assert [e.step for e in events] == [1, 2, 3] and events[-1].metrics["copy_loss"] > 0
    assert result.path == tmp_path / "pre" / "model.safetensors" and result.steps_done == 3 and not result.stopped
    assert result.restorations == tmp_path / "pre" / "restorations.png" and result.restorations.is_file()
    card = load_card(result.path)
    assert card.is_pretrained and card.pixel_size_nm == 5.0 and card.pretrained["sources"] == ["stack"]
    stop = threading.Event()
    stop.set()  # Stop before the first step: nothing learnt, no model claimed
    request.out_dir = tmp_path / "stopped"
    stopped = pretrain_layer(request, stop=stop)
    assert stopped.path is None and stopped.steps_done == 0 and stopped.stopped


def test_absurd_rescaling_is_refused():
    from emseg_napari._utils import scale_mismatch
    assert scale_mismatch(5.0, 6.0) is None and scale_mismatch(None, 6.0) is None
    assert scale_mismatch(30.0, 6.0) is None
    assert "finer" in scale_mismatch(0.0127, 6.0)
    assert "coarser" in scale_mismatch(100.0, 6.0)


def test_measure_segmentation_gives_napari_features_in_nm():
    """Discs of known size on slices 1 and 3 of a stack: one features row per label (row 0 the
    background), diameters in nm within a pixel, slices named as in the stack."""
    from emseg_napari._jobs import ObjectOptions, measure_segmentation
    from skimage.draw import disk
    labels = np.zeros((2, 80, 120), np.uint8)
    for page, (r, c, rad, cls) in enumerate([(30, 30, 10, 2), (40, 80, 15, 1)]):
        labels[(page, *disk((r, c), rad))] = cls
    labels[1][disk((20, 25), 6)] = 2
    image = np.full(labels.shape, 50.0, np.float32)
    image[labels > 0] = 200.0
    result = measure_segmentation(labels, image, ("background", "membrane", "mitochondrion"), 2.0,
                                  ObjectOptions(), pages=[1, 3])
    features = result.features
    assert len(features) == result.instances.count + 1 == 4
    assert list(features["label"]) == [0, 1, 2, 3]  # row k describes label k
    assert features.loc[0, "class"] == "background" and np.isnan(features.loc[0, "area_nm2"])
    rows = features.iloc[1:].set_index("label")
    assert sorted(rows["slice"]) == [1, 3, 3]
    big = rows[rows["class"] == "membrane"].iloc[0]
    assert big["equivalent_diameter_nm"] == pytest.approx(30 * 2.0, abs=2.0)
    assert big["mean_intensity"] == pytest.approx(200.0)
    assert not rows["touches_border"].any()
    by_class = {row["class"]: row for row in result.summary}
    assert by_class["mitochondrion"]["count"] == 2 and by_class["membrane"]["count"] == 1
    assert "diameter_median_nm" in by_class["membrane"]
    only = measure_segmentation(labels, image, ("background", "membrane", "mitochondrion"), 2.0,
                                ObjectOptions(classes=("mitochondrion",)))
    assert list(only.features["class"].iloc[1:]) == ["mitochondrion"] * 2
    assert [row["class"] for row in only.summary] == ["mitochondrion"]


def test_finetune_job_learns_from_the_three_planes_of_a_volume(tmp_path):
    from emseg_napari._jobs import FinetuneRequest, finetune

    from emseg.model.modelfile import load_model
    from emseg.synthetic3d import make_em_volume
    vol = make_em_volume((20, 48, 48), seed=1)
    scribbles = np.zeros_like(vol.mask)
    scribbles[:, 20, :] = vol.mask[:, 20, :] + 1  # one painted xz slice
    scribbles[10] = vol.mask[10] + 1  # and one xy slice
    events = []
    result = finetune(FinetuneRequest(
        image=vol.image, labels=scribbles, classes=("background", "membrane", "mitochondrion"),
        out_path=tmp_path / "m.safetensors", encoder="vgg11_bn_micro", steps=2, batch_size=2, tile_size=32,
        val_every=1, device="cpu", pixel_size_nm=5.0, planes="ortho", voxel_size_nm=(5.0, 5.0, 5.0),
        layer_name="scribbles"), progress=events.append)
    assert result.path is not None and result.steps_done == 2
    training = load_model(result.path).card.training
    assert training["sources"] == ["scribbles xy", "scribbles xz", "scribbles yz"]
    assert training["validation_pages"] > 0


def test_finetune_job_self_trains_on_the_slices_not_painted(tmp_path):
    from emseg_napari._jobs import FinetuneRequest, finetune

    from emseg.errors import InputError
    from emseg.model.modelfile import load_model
    from emseg.synthetic import make_em_stack
    image, mask = make_em_stack(pages=4, height=96, width=96, seed=2)[:2]
    labels = np.zeros_like(mask, dtype=np.uint8)
    labels[1] = mask[1] + 1  # one slice painted completely; the three others are for the model to label
    request = FinetuneRequest(image=image, labels=labels, classes=("background", "membrane", "mitochondrion"),
                              out_path=tmp_path / "m.safetensors", encoder="vgg11_bn_micro", steps=4, batch_size=2,
                              tile_size=64, val_every=2, device="cpu", layer_name="scribbles", self_train=True)
    events = []
    result = finetune(request, progress=events.append)
    assert result.path is not None and result.steps_done == 4 and [e.step for e in events] == [1, 2, 3, 4]
    record = load_model(result.path).card.training["self_training"]
    assert record["unlabelled_pages"] == 3 and record["teacher_steps"] == 2
    with pytest.raises(InputError, match="'one page'.*no annotation"):
        finetune(FinetuneRequest(image=image[1], labels=labels[1], classes=request.classes,
                                 out_path=tmp_path / "n.safetensors", encoder="vgg11_bn_micro", steps=2,
                                 device="cpu", layer_name="'one page'", self_train=True))


@pytest.mark.parametrize("layer_nm, saved_nm, rescaled", [(5.0, 6.0, True), (0.0127, 0.0127, False)])
def test_finetune_job_trains_at_the_base_pixel_size_or_relabels_an_absurd_one(tmp_path, tiny_model, caplog,
                                                                               layer_nm, saved_nm, rescaled):
    """A layer a little finer than the base is rescaled to the base's pixel size; one a thousand times finer
    (a calibration error) is not, and the new model takes the layer's pixel size. Neither run is told that its
    pages sit at another pixel size than the model's."""
    from emseg_napari._jobs import FinetuneRequest, finetune

    from emseg.model.modelfile import load_model
    from emseg.synthetic import make_em_stack
    base = tiny_model.save(tmp_path / "base.safetensors", tiny_model.card.updated(pixel_size_nm=6.0))
    image, mask = make_em_stack(pages=1, height=96, width=96, seed=2)
    with caplog.at_level("INFO", logger="emseg"):
        result = finetune(FinetuneRequest(
            image=image[0], labels=mask[0] + 1, classes=tiny_model.classes, out_path=tmp_path / "m.safetensors",
            base_path=base, steps=2, batch_size=2, tile_size=32, val_every=1, device="cpu", pixel_size_nm=layer_nm))
    assert load_model(result.path).card.pixel_size_nm == pytest.approx(saved_nm)
    from emseg.train import FINETUNE_DEFAULTS
    assert load_model(result.path).card.training["config"]["base_share"] == FINETUNE_DEFAULTS["base_share"]
    assert ("rescaled by" in caplog.text) is rescaled
    assert "but the model is for" not in caplog.text
