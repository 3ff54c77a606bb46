"""Take the napari plugin's screenshots for the docs: ``docs/img/napari_finetune.png``, ``napari_segment.png``,
``napari_measure.png``, ``napari_volume.png`` and ``napari_pretrain.png``.

Run from the checkout, with the napari extra installed, under a display (headless: Xvfb)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/napari_screenshots.py

It opens the bundled synthetic sample, docks the Fine-tune widget, paints scribbles (strokes
across the ground truth, as a person would), fine-tunes (the bundled default model when it
exists, else a new ``vgg11_bn_micro`` model, which takes a few minutes on a CPU) and shoots the
viewer with the live preview; then docks the Segment widget, segments the stack with the model
just saved and shoots the result. ``--only-volume`` opens the synthetic FIB-SEM volume sample,
segments the whole volume (ortho-plane) with ``--volume-model`` (default: the bundled model) and
shoots the 3D view with the measurements panel. ``--only-pretrain`` pretrains on the synthetic sample in the
Pretrain widget for ``--pretrain-minutes`` and shoots the widget with its restorations picture. Screenshots are napari's own ``viewer.screenshot(canvas_only=False)``.
Fine-tuned models go to a temporary folder, not to ``~/.emseg/models``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img"


def strokes(truth: np.ndarray, *, n: int = 14, width: int = 3, seed: int = 0) -> np.ndarray:
    """Scribbles like a person's: ``n`` straight strokes per page, labelled with the true class + 1."""
    from scipy import ndimage as ndi
    from skimage.draw import line
    rng = np.random.default_rng(seed)
    out = np.zeros(truth.shape, np.uint8)
    for p in range(truth.shape[0]):
        mask = np.zeros(truth.shape[1:], bool)
        h, w = mask.shape
        for _ in range(n):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3) * min(h, w)
            y1 = int(np.clip(y0 + length * np.sin(angle), 0, h - 1))
            x1 = int(np.clip(x0 + length * np.cos(angle), 0, w - 1))
            rr, cc = line(int(y0), int(x0), y1, x1)
            mask[rr, cc] = True
        mask = ndi.binary_dilation(mask, iterations=width // 2)
        out[p][mask] = truth[p][mask] + 1
    return out


def wait(app, widget, timeout: float = 3600) -> None:
    start = time.time()
    while widget.running and time.time() - start < timeout:
        app.processEvents()
        time.sleep(0.05)


def settle(app, seconds: float = 1.0) -> None:
    """Let the GUI catch up, then close notification toasts (they would hide the scale bar)."""
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.02)
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:  # another napari version: the toasts fade by themselves
        return
    for widget in app.allWidgets():
        if isinstance(widget, NapariQtNotification):
            widget.close()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)


def save_shot(viewer, path: Path) -> None:
    """napari's screenshot of the whole window, saved as a 256-colour PNG (about half the size)."""
    from PIL import Image
    rgba = viewer.screenshot(canvas_only=False)
    Image.fromarray(rgba).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps (default: 150 from the default model, 400 for a new one)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNG files")
    parser.add_argument("--size", type=int, nargs=2, default=(1700, 1000), metavar=("W", "H"),
                        help="window size in pixels")
    parser.add_argument("--only-measure", action="store_true",
                        help="only the measurements shot (objects of the default model's segmentation)")
    parser.add_argument("--only-volume", action="store_true",
                        help="only the volume shot (the FIB-SEM sample segmented ortho-plane, in 3D)")
    parser.add_argument("--only-pretrain", action="store_true",
                        help="only the Pretrain widget's shot (self-supervised pretraining on the sample)")
    parser.add_argument("--pretrain-minutes", type=float, default=3.0, help="pretraining time of that shot")
    parser.add_argument("--volume-model", type=Path, default=None,
                        help="model for the volume shot (default: the bundled model)")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ["EMSEG_MODEL_DIR"] = tempfile.mkdtemp(prefix="emseg-screenshot-models-")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "plugins"))

    import napari
    from qtpy.QtWidgets import QApplication

    from emseg.model.modelfile import default_model_path

    viewer = napari.Viewer(title="emseg in napari")
    viewer.window.resize(*args.size)
    app = QApplication.instance()
    if args.only_volume:
        return volume_shot(viewer, app, args.out, args.volume_model or default_model_path())
    image, truth = viewer.open_sample("emseg", "synthetic_tem")
    truth.visible = False
    scale_bar = viewer.canvas.overlays.scale_bar if hasattr(viewer, "canvas") else viewer.scale_bar
    scale_bar.visible = True
    scale_bar.box = True
    viewer.dims.set_point(0, image.scale[0] * 3)
    have_default = default_model_path().exists()

    if args.only_measure:
        return measure_shot(viewer, app, image, args.out)
    if args.only_pretrain:
        return pretrain_shot(viewer, app, image, args.out, args.pretrain_minutes)

    # -- Fine-tune: scribbles, training, live preview --------------------------------------------
    ft_dock, ft = viewer.window.add_plugin_dock_widget("emseg", "Fine-tune")
    if have_default:
        ft.base.refresh(default_model_path())
    else:
        ft.base.combo.setCurrentIndex(0)  # new model
        ft.encoder.setCurrentText("vgg11_bn_micro")
        ft.set_classes(tuple(truth.features["class"]))
    ft.image.set_layer(image)
    scribbles = ft.make_scribble_layer()
    scribbles.data = strokes(np.asarray(truth.data))
    ft.classes.selectRow(1)
    steps = args.steps or (150 if have_default else 400)
    ft.steps.setValue(steps)
    ft.val_every.setValue(max(10, steps // 8))
    ft.tile.setValue(128)
    ft.batch.setValue(4)
    ft.lr.setValue(5e-4 if have_default else 3e-3)
    ft.name.setText("sample-finetuned" if have_default else "sample-micro")
    print(f"fine-tuning {steps} steps ({'from the default model' if have_default else 'a new micro model'})…")
    assert ft.start(), ft.last_message
    wait(app, ft)
    print(ft.last_message)
    if ft.last_model_path is None:
        return 1
    viewer.layers.selection.active = scribbles
    settle(app, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    save_shot(viewer, args.out / "napari_finetune.png")

    # -- Segment: the whole stack with the model just saved ---------------------------------------
    viewer.window.remove_dock_widget(ft_dock)
    for layer in list(viewer.layers):
        if layer.name.endswith(("scribbles", "preview")):
            layer.visible = False
    seg_dock, seg = viewer.window.add_plugin_dock_widget("emseg", "Segment")
    seg.image.set_layer(image)
    print(f"segmenting with {seg.model.path()}…")
    assert seg.run(whole_stack=True), seg.last_message
    wait(app, seg)
    print(seg.last_message)
    viewer.layers.selection.active = viewer.layers[-1]  # the result, so its class colours show
    settle(app, 2)
    save_shot(viewer, args.out / "napari_segment.png")
    viewer.window.remove_dock_widget(seg_dock)
    return measure_shot(viewer, app, image, args.out)


def segment_objects(viewer, app, image, model: Path, *, min_size: int, **run):
    """Dock Segment, segment ``image`` with ``model`` finding objects (``run``: Segment.run's options);
    returns the widget and its objects layer (None when it failed)."""
    _dock, seg = viewer.window.add_plugin_dock_widget("emseg", "Segment")
    seg.select_model(model)
    seg.image.set_layer(image)
    seg.objects.setChecked(True)
    seg.min_size.setValue(min_size)
    print(f"segmenting and measuring objects ({run}) with {model}…")
    assert seg.run(**run), seg.last_message
    wait(app, seg)
    print(seg.last_message)
    return seg, seg.last_objects_layer


def measure_shot(viewer, app, image, out: Path) -> int:
    """Segment with the default model, find and measure objects, and shoot the measurements panel."""
    from emseg.model.modelfile import default_model_path
    for layer in list(viewer.layers):
        if layer is not image:
            layer.visible = False
    seg, objects = segment_objects(viewer, app, image, default_model_path(), min_size=20, whole_stack=True)
    if objects is None:
        return 1
    viewer.layers.selection.active = objects
    panel = seg.measurements
    mito = objects.features[objects.features["class"] == "mitochondrion"]
    panel.go_to(int(mito.sort_values("area_nm2").iloc[-1]["label"]))
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom *= 2.5
    settle(app, 2)
    out.mkdir(parents=True, exist_ok=True)
    save_shot(viewer, out / "napari_measure.png")
    viewer.close()
    return 0


def pretrain_shot(viewer, app, image, out: Path, minutes: float) -> int:
    """The Pretrain widget after pretraining on the sample stack: its readout and restorations picture."""
    _dock, pre = viewer.window.add_plugin_dock_widget("emseg", "Pretrain")
    pre.image.set_layer(image)
    pre.minutes.setValue(minutes)
    print(f"pretraining on the sample for {minutes:g} min…")
    assert pre.start(), pre.last_message
    wait(app, pre)
    print(pre.last_message)
    if pre.last_model_path is None:
        return 1
    settle(app, 2)
    out.mkdir(parents=True, exist_ok=True)
    save_shot(viewer, out / "napari_pretrain.png")
    viewer.close()
    return 0


def volume_shot(viewer, app, out: Path, model: Path) -> int:
    """The synthetic FIB-SEM volume segmented with 'Segment volume (ortho)', its 3D objects in 3D."""
    image, truth = viewer.open_sample("emseg", "synthetic_fibsem")
    truth.visible = False
    _seg, objects = segment_objects(viewer, app, image, model, min_size=200, ortho=True)
    if objects is None:
        return 1
    for layer in viewer.layers:
        layer.visible = layer.name in (image.name, objects.name)
    image.opacity = 0.35
    image.rendering = "attenuated_mip"
    image.attenuation = 0.3
    objects.opacity = 1.0
    viewer.layers.selection.active = objects
    viewer.camera.angles = (-10, 35, 60)
    viewer.camera.zoom *= 1.3
    settle(app, 2)
    out.mkdir(parents=True, exist_ok=True)
    save_shot(viewer, out / "napari_volume.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
