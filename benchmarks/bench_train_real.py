"""Train and evaluate emseg with its default settings on real EM data (../shared/data).

    python benchmarks/bench_train_real.py isbi  [--minutes 30]   # membranes, slices 0-23 / 24-29
    python benchmarks/bench_train_real.py epfl  [--minutes 30]   # mitochondria, last 5 slices held out
    python benchmarks/bench_train_real.py nasa  [--minutes 30]   # superalloy precipitates, train / val
    python benchmarks/bench_train_real.py finetune [--minutes 5] # ISBI model -> 2 EPFL slices
    python benchmarks/bench_train_real.py isbi-fit [--minutes 20] # how closely the network can draw the
                                                                 # membranes of the slices it is trained on
    python benchmarks/bench_train_real.py isbi-errors --base M   # where M's errors on 24-29 lie, whether
                                                                 # the annotation is offset against the
                                                                 # images, whether its batch-norm statistics
                                                                 # hold it back, and docs/img/isbi_errors.png

    --tta             also evaluate with test-time augmentation
    --set KEY=VALUE   change a training setting (a TrainConfig field), e.g. --set border_weight=0
    --augment P=S     augmentation part strength as in `emseg train --augment`, e.g. elastic=0
    --widths W1,..,W5 train a VGG-11-BN U-Net of these encoder widths (decoder: 8x, 4x, 2x, 1x, 1x W1)
    --convs C1,..,C5  with --widths: 3x3 convolutions per encoder block (VGG-13: 2,2,2,2,2)
    --decoder D1,..,D5 with --widths: the decoder's widths
    --val-on-heldout  validate (choose the best weights) on the held-out slices, train on all of the
                      training slices (default: hold out the right-hand 20 % strip of every training slice)
    --tag NAME        name of the run (default: the data set), for runs/bench/NAME.json
    --fit-slices N    isbi-fit: train on ISBI slices 0..N-1 (default 2)

Each run trains with `emseg.train.loop.train` and the defaults of `emseg train` (only the classes,
the held-out data and the time limit are set), then evaluates the held-out slices with the same code
as `emseg evaluate` and prints the metrics as JSON and a Markdown row for docs/training.md.
Skips with a message when ../shared/data is absent. The environment variables EMSEG_BENCH_DATA (a folder
laid out as ../shared/data) and EMSEG_BENCH_RUNS (default runs/bench) move the data and the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]
# EMSEG_BENCH_DATA and EMSEG_BENCH_RUNS move the data and the results (benchmarks/gpu_check.sh uses them)
DATA = Path(os.environ.get("EMSEG_BENCH_DATA", ROOT.parent / "shared" / "data"))
RUNS = Path(os.environ.get("EMSEG_BENCH_RUNS", ROOT / "runs" / "bench"))


def _machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def _pngs(folder: Path) -> np.ndarray:
    from PIL import Image
    return np.stack([np.array(Image.open(p).convert("L")) for p in sorted(folder.glob("*.png"))])


def load(name: str):
    """(train images, train masks, val images, val masks, classes, pixel size nm) as arrays."""
    if name == "isbi":
        img = tifffile.imread(DATA / "isbi2012" / "train-volume.tif")
        msk = tifffile.imread(DATA / "isbi2012" / "train-membranes.tif")
        return img[:24], msk[:24], img[24:], msk[24:], ("background", "membrane"), 4.0
    if name == "epfl":
        img = tifffile.imread(DATA / "epfl_mito" / "train-volume.tif")
        msk = tifffile.imread(DATA / "epfl_mito" / "train-mito.tif")
        return img[:-5], msk[:-5], img[-5:], msk[-5:], ("background", "mitochondrion"), 5.0
    if name == "nasa":
        base = DATA / "nasa_super"
        return (_pngs(base / "train" / "images"), _pngs(base / "train" / "masks"), _pngs(base / "val" / "images"),
                _pngs(base / "val" / "masks"), ("matrix", "tertiary", "secondary"), None)
    raise SystemExit(f"unknown data set {name}")


def evaluate_arrays(model, images: np.ndarray, masks: np.ndarray, tmp: Path, pixel_nm: float | None,
                    tta: bool = False) -> dict:
    """Evaluate exactly as `emseg evaluate --pixel-size PIXEL_NM` does, on arrays written to temporary TIFFs.

    The pixel size matters when the model was trained at another one (a fine-tuned model keeps its base's):
    the pages are then rescaled to the model's pixel size and the predictions back."""
    from emseg.analysis.evaluate import evaluate
    tifffile.imwrite(tmp / "val_img.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp / "val_msk.tif", masks, photometric="minisblack")
    predictor = model.predictor(tta=tta, device="auto")
    return evaluate(predictor, [(tmp / "val_img.tif", tmp / "val_msk.tif")], pixel_size_nm=pixel_nm)["summary"]


def membrane_probs(model, images: np.ndarray) -> np.ndarray:
    """The model's membrane (second class) probability on every held-out slice."""
    predictor = model.predictor(device="auto")
    return np.stack([predictor.predict_page(page)[1] for page in images])


def edge_distance(target: np.ndarray) -> np.ndarray:
    """Distance (px) of each pixel of a 2D membrane mask to the nearest pixel on the other side of an edge."""
    from scipy import ndimage as ndi
    return np.where(target, ndi.distance_transform_edt(target), ndi.distance_transform_edt(~target))


def membrane_study(probs: np.ndarray, masks: np.ndarray) -> dict:
    """Sensitivity of the ISBI metrics to the membrane threshold, and the Rand error without border
    thinning (predicted membrane pixels scored as one more region), on the held-out slices."""
    from emseg.analysis.metrics import adapted_rand_error
    target = (masks > 0).astype(np.uint8)
    sweep = {}
    for threshold in (0.3, 0.4, 0.5, 0.6):
        pred = [(p >= threshold).astype(np.uint8) for p in probs]
        inter = sum(int(((p == 1) & (t == 1)).sum()) for p, t in zip(pred, target))
        union = sum(int(((p == 1) | (t == 1)).sum()) for p, t in zip(pred, target))
        sweep[f"{threshold:.1f}"] = {
            "pixel_error": float(np.mean([(p != t).mean() for p, t in zip(pred, target)])),
            "iou_membrane": inter / union,
            "adapted_rand_error": float(np.mean([adapted_rand_error(t, p, 1) for p, t in zip(pred, target)])),
            "adapted_rand_error_unthinned": float(np.mean([adapted_rand_error(t, p, 1, thin=False)
                                                           for p, t in zip(pred, target)]))}
    return sweep


def error_by_edge_distance(probs: np.ndarray, masks: np.ndarray) -> dict:
    """Where the pixel errors (argmax) lie: by distance (px) to the nearest annotated membrane edge.

    For each band, the share of all pixels, the error rate inside it and its part of the pixel
    error; errors on pixels that touch an edge are one-pixel disagreements on a membrane's width.
    """
    target = masks > 0
    pred = probs >= 0.5
    dist = np.stack([edge_distance(t) for t in target])
    wrong = pred != target
    bands = {"1 (touching an edge)": (0, 1), "2": (1, 2), "3": (2, 3), "4-5": (3, 5), ">5": (5, np.inf)}
    out = {"false_membrane": float((pred & ~target).mean()), "missed_membrane": float((~pred & target).mean())}
    for name, (lo, hi) in bands.items():
        band = (dist > lo + 0.01) & (dist <= hi + 0.01)
        out[name] = {"pixels": float(band.mean()), "error_rate": float(wrong[band].mean()),
                     "pixel_error_part": float((wrong & band).mean())}
    return out


def offset_study(model, images: np.ndarray, masks: np.ndarray, train_images: np.ndarray,
                 train_masks: np.ndarray) -> dict:
    """Is the annotation offset against the images? (docs/training.md, "Annotation offset")

    The model's pixel error on its training slices (overfitting or not), the pixel error with its
    predictions moved one pixel each way, the shift at which the image's darkness correlates best
    with the membrane mask, and the offset `emseg.infer.alignment` measures on these slices with what
    following it would score (optimistic: measured on the slices it is scored on)."""
    from scipy import ndimage as ndi

    from emseg.infer.alignment import estimate_offset, shift_probabilities
    target = masks > 0
    probs = membrane_probs(model, images)
    pred = probs >= 0.5
    inner = (slice(None), slice(2, -2), slice(2, -2))
    moves = {f"{dy:+d},{dx:+d}": float((np.roll(pred, (dy, dx), axis=(1, 2))[inner] != target[inner]).mean())
             for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))}
    train_pred = membrane_probs(model, train_images) >= 0.5
    dark = -np.stack([ndi.gaussian_filter(x.astype(np.float32), 1.0) for x in images])
    dark = (dark - dark.mean(axis=(1, 2), keepdims=True)) / dark.std(axis=(1, 2), keepdims=True)
    centred = target - target.mean(axis=(1, 2), keepdims=True)

    def corr(dy, dx):
        return float((np.roll(centred, (dy, dx), axis=(1, 2)) * dark)[:, 4:-4, 4:-4].mean())
    peak = []
    for axis_moves in (((-1, 0), (0, 0), (1, 0)), ((0, -1), (0, 0), (0, 1))):
        left, mid, right = (corr(*m) for m in axis_moves)
        peak.append((left - right) / (2 * (left - 2 * mid + right)))
    pairs = [(np.stack([1 - p, p]), t.astype(np.int64)) for p, t in zip(probs, target)]
    offset = estimate_offset(pairs)
    moved = np.stack([shift_probabilities(pp, offset)[1] for pp, _ in pairs]) >= 0.5
    return {
        "pixel_error_training_slices": float((train_pred != (train_masks > 0)).mean()),
        "pixel_error_test_slices": float((pred != target).mean()),
        "pixel_error_predictions_moved_px (rows,cols)": moves,
        "mask_best_aligned_with_image_darkness_when_moved_px": [round(v, 3) for v in peak],
        "offset_measured_on_test_slices": [round(v, 3) for v in offset],
        "with_that_offset": {"pixel_error": float((moved != target).mean()),
                             "iou_membrane": float((moved & target).sum() / (moved | target).sum())},
    }


def annotation_against_itself(masks: np.ndarray) -> dict:
    """Pixel error and membrane IoU of the annotation changed by one pixel, against itself: the scale
    of a one-pixel disagreement on where membrane edges lie."""
    from scipy import ndimage as ndi
    target = masks > 0
    cross = ndi.generate_binary_structure(2, 1)
    changes = {"eroded 1 px": lambda t: ndi.binary_erosion(t, cross),
               "dilated 1 px": lambda t: ndi.binary_dilation(t, cross),
               "shifted 1 px sideways": lambda t: np.roll(t, 1, axis=1)}
    out = {}
    for name, change in changes.items():
        moved = np.stack([change(t) for t in target])
        out[name] = {"pixel_error": float((moved != target).mean()),
                     "iou_membrane": float((moved & target).sum() / (moved | target).sum())}
    return out


def batchnorm_study(model, images: np.ndarray, masks: np.ndarray, train_images: np.ndarray, tmp: Path) -> dict:
    """Are the batch-norm statistics gathered in training (augmented 256 px crops) what holds the model
    back? The metrics on the held-out slices with them, and again with the statistics recomputed on the
    whole, unaugmented training slices ("precise BN": every slice weighted alike). Changes a copy only."""
    import copy

    from emseg.infer.preprocess import normalize_page
    keys = ("pixel_error", "mean_iou", "adapted_rand_error")
    out = {"trained": {k: evaluate_arrays(model, images, masks, tmp, 4.0)[k] for k in keys}}
    recomputed = copy.deepcopy(model)
    norms = [m for m in recomputed.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the slices
        m.train()
    with torch.no_grad():
        for page in train_images:
            x = np.ascontiguousarray(normalize_page(page, recomputed.card.normalization), dtype=np.float32)
            recomputed.net(torch.from_numpy(x)[None, None])
    recomputed.net.eval()
    out["recomputed_on_training_slices"] = {k: evaluate_arrays(recomputed, images, masks, tmp, 4.0)[k] for k in keys}
    return out


def errors_figure(image: np.ndarray, mask: np.ndarray, prob: np.ndarray, path: Path, crop: int = 256) -> Path:
    """PNG of one held-out slice: image, annotation, prediction and where the two disagree.

    Disagreements on pixels touching an annotated membrane edge (one-pixel width differences) are drawn
    pale, the others (missed or invented membrane pieces) saturated.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    target = mask > 0
    pred = prob >= 0.5
    edge = edge_distance(target) <= 1.01
    colours = {"false membrane, at an edge": ((pred & ~target & edge), (1.0, 0.75, 0.6)),
               "false membrane, away from edges": ((pred & ~target & ~edge), (0.85, 0.0, 0.0)),
               "missed membrane, at an edge": ((~pred & target & edge), (0.6, 0.8, 1.0)),
               "missed membrane, away from edges": ((~pred & target & ~edge), (0.0, 0.2, 0.9))}
    errors = np.ones((*target.shape, 3))
    for where, colour in colours.values():
        errors[where] = colour
    view = (slice(0, crop), slice(0, crop))
    fig, axes = plt.subplots(1, 4, figsize=(16, 5.2), constrained_layout=True)
    panels = [(image, "image (ISBI 2012 slice 24)"), (target, "annotated membranes"),
              (pred, f"prediction (pixel error {np.mean(pred != target):.3f} on the slice)"),
              (errors, "disagreements")]
    for ax, (data, title) in zip(axes, panels):
        ax.imshow(data[view], cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    fig.legend(handles=[Patch(color=c, label=f"{name} ({w.mean():.3f} of the slice)")
                        for name, (w, c) in colours.items()], loc="outside lower center", ncol=2, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path


def finetune_figure(models: dict, image: np.ndarray, mask: np.ndarray, pixel_nm: float, path: Path) -> Path:
    """One held-out EPFL slice: the image, its annotation, and for each model where it agrees and errs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    target = mask > 0
    fig, axes = plt.subplots(1, len(models) + 2, figsize=(3.6 * (len(models) + 2), 3.4))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("held-out slice")
    axes[1].imshow(target, cmap="gray")
    axes[1].set_title("annotation\n(right: green found, red false, blue missed)", fontsize=9)
    for ax, (name, model) in zip(axes[2:], models.items()):
        pred = model.predictor(device="auto").predict_page(image, pixel_size_nm=pixel_nm).argmax(0) > 0
        rgb = np.zeros(target.shape + (3,), np.float32)
        rgb[pred & target] = (0.2, 0.8, 0.2)
        rgb[pred & ~target] = (0.9, 0.2, 0.2)
        rgb[~pred & target] = (0.2, 0.4, 1.0)
        ax.imshow(rgb)
        ax.set_title(f"{name}\nIoU {(pred & target).sum() / max((pred | target).sum(), 1):.3f} on this slice", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def parse_settings(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings to TrainConfig keyword arguments (numbers and booleans parsed; augment by preset)."""
    from emseg.train.loop import TrainConfig
    fields = TrainConfig.__dataclass_fields__
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {pair}: {key!r} is not a training setting ({', '.join(fields)})")
        default = fields[key].default
        if key == "augment":  # a preset of `emseg train --augment-preset`, or "flips" (flips and rotations only)
            from emseg.train.augment import PRESETS, AugmentConfig
            flips = AugmentConfig(elastic=0.0, affine=0.0, intensity=0.0, noise=0.0, blur=0.0)
            if value not in (*PRESETS, "flips"):
                raise SystemExit(f"--set {pair}: augment is one of {', '.join(PRESETS)}, flips")
            out[key] = flips if value == "flips" else PRESETS[value]
        elif key == "base_share" and value == "auto":
            out[key] = value
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            out[key] = type(default)(value)
        elif default is None and value.lower() in ("true", "false"):  # freeze_bn
            out[key] = value.lower() == "true"
        else:  # str, or None for optional numbers (steps, time_limit_minutes, pixel_size_nm)
            try:
                number = int if str(fields[key].type).startswith("int") else float
                out[key] = value if isinstance(default, str) else number(value)
            except ValueError:
                out[key] = value
    return out


def train_on(name, images, masks, classes, pixel_nm, minutes, *, base=None, sparse=False, steps=None, val=None,
             **settings):
    """Train with `emseg train`'s code; ``val``: (images, masks) held out for validation, else strips."""
    from emseg.model.card import Normalization
    from emseg.train.data import rescale_items
    from emseg.train.loop import TrainConfig, annotations_from_arrays, is_new_task, train
    norm = base.card.normalization if base else Normalization()
    items = annotations_from_arrays(images, masks, sparse=sparse, pixel_size_nm=pixel_nm, name=name, norm=norm)
    val_items = None if val is None else annotations_from_arrays(*val, sparse=False, pixel_size_nm=pixel_nm,
                                                                 name=f"{name} held out", norm=norm)
    if base is not None and base.card.pixel_size_nm and not is_new_task(base, classes, settings.get("head", "auto")):
        # as `emseg finetune` does: the pages at the base's pixel size, unless the classes change
        items = rescale_items(items, base.card.pixel_size_nm)
        val_items = None if val_items is None else rescale_items(val_items, base.card.pixel_size_nm)
    config = TrainConfig(classes=classes, pixel_size_nm=pixel_nm, time_limit_minutes=minutes, sparse=sparse,
                         steps=steps, name=f"bench {name}", **settings)
    start = time.perf_counter()
    result = train(items, config, RUNS / name, base=base, val_data=val_items)
    return result, time.perf_counter() - start


def fit_study(minutes: float, n_slices: int, tmp: Path, **settings) -> dict:
    """How closely can the network draw the membranes of the slices it is trained on? Trained on ISBI slices
    0..n-1, whole, with no augmentation at all and the annotation itself as the target (no border weights),
    validated on slices 24-25 only to keep the weights (no early stop), then scored on the slices it was
    trained on and on slices 24-29. An error on the trained slices far below the test slices' says that the
    network can place the annotation's edges on slices it has seen often enough (by learning or memorising:
    a few slices cannot tell); near it, that it cannot, even there."""
    from emseg.train.augment import PRESETS
    img, msk, vimg, vmsk, classes, px = load("isbi")
    settings = {"augment": PRESETS["none"], "border_weight": 0.0, "patience": 10_000, "ema_decay": 0.0,
                **settings}
    result, seconds = train_on(f"isbi_fit{n_slices}", img[:n_slices], msk[:n_slices], classes, px, minutes,
                               val=(vimg[:2], vmsk[:2]), **settings)
    model = result.model
    out = {"trained_on": f"slices 0-{n_slices - 1}", "train_seconds": round(seconds),
           "steps": model.card.training["steps"], "label_offset": model.card.training.get("label_offset"),
           "settings": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in settings.items()}}
    for name, (images, masks) in {"trained slices": (img[:n_slices], msk[:n_slices]),
                                  "test slices 24-29": (vimg, vmsk)}.items():
        m = evaluate_arrays(model, images, masks, tmp, px)
        out[name] = {"pixel_error": m["pixel_error"], "iou_membrane": m["iou"]["membrane"]}
    return out


def scribbles_from(masks: np.ndarray, every: int = 16, width: int = 3) -> np.ndarray:
    """Sparse labels (0 = not annotated, class + 1) along horizontal lines, like quick strokes."""
    classes = (masks > 0) if masks.max() == 255 else masks  # a 0/255 mask, or class indices
    sparse = np.zeros_like(masks, dtype=np.uint8)
    for r in range(0, masks.shape[1], every):
        sparse[:, r:r + width] = classes[:, r:r + width].astype(np.uint8) + 1
    return sparse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["isbi", "epfl", "nasa", "finetune", "isbi-errors", "isbi-fit"])
    parser.add_argument("--minutes", type=float, default=30.0, help="training time limit")
    parser.add_argument("--tta", action="store_true", help="also evaluate with test-time augmentation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a training setting (a TrainConfig field); repeatable")
    parser.add_argument("--augment", action="append", default=[], metavar="PART=STRENGTH",
                        help="augmentation strength, as `emseg train --augment` (repeatable)")
    parser.add_argument("--widths", help="width study: VGG-11-BN encoder widths, e.g. 24,48,96,192,192")
    parser.add_argument("--convs", default="1,1,2,2,2", help="with --widths: convolutions per encoder block")
    parser.add_argument("--decoder", help="with --widths: decoder widths (default 8x, 4x, 2x, 1x, 1x the first)")
    parser.add_argument("--val-on-heldout", action="store_true",
                        help="validate on the held-out slices (ISBI: 24-29, the issue's split) and train on all of "
                             "the training slices, instead of holding out a strip of every training slice")
    parser.add_argument("--tag", help="name of the run (default: the data set)")
    parser.add_argument("--fit-slices", type=int, default=2, help="isbi-fit: train on ISBI slices 0..N-1")
    parser.add_argument("--base", type=Path, default=RUNS / "isbi" / "model.safetensors",
                        help="finetune: the ISBI-trained model to start from; isbi-errors: the model to study")
    args = parser.parse_args()
    settings = parse_settings(args.set)
    if args.augment:
        from emseg.cli.train import _augment_config
        settings["augment"] = _augment_config(argparse.Namespace(augment_preset=None, augment=args.augment), {})
    if args.widths:
        from emseg.model.networks import register_narrow_vgg
        w = tuple(int(v) for v in args.widths.split(","))
        d = tuple(int(v) for v in args.decoder.split(",")) if args.decoder else None
        settings["encoder"] = register_narrow_vgg(w, d, tuple(int(v) for v in args.convs.split(",")))
    tag = args.tag or args.dataset
    if not DATA.exists():
        print(f"skipped: the shared data folder {DATA} is absent")
        return 0
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = {"dataset": args.dataset, "machine": _machine(), "minutes": args.minutes,
              "settings": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in settings.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dataset == "isbi-fit":
            report["fit_study"] = fit_study(args.minutes, args.fit_slices, tmp, **settings)
        elif args.dataset == "isbi-errors":
            from emseg.model.modelfile import load_model
            model = load_model(args.base)
            timg, tmsk, vimg, vmsk, _, _ = load("isbi")
            report["model"] = str(args.base)
            report["offset_study"] = offset_study(model, vimg, vmsk, timg, tmsk)
            probs = membrane_probs(model, vimg)
            report["error_by_edge_distance"] = error_by_edge_distance(probs, vmsk)
            report["annotation_against_itself"] = annotation_against_itself(vmsk)
            report["batchnorm_study"] = batchnorm_study(model, vimg, vmsk, timg, tmp)
            if tag == "isbi-errors":  # the docs figure; a study of another model (--tag) leaves it alone
                report["figure"] = str(errors_figure(vimg[0], vmsk[0], probs[0], ROOT / "docs" / "img" / "isbi_errors.png"))
        elif args.dataset == "finetune":
            from emseg.model.modelfile import load_model
            base_path = args.base
            if not base_path.exists():
                print(f"skipped: run the isbi benchmark first ({base_path} is missing)")
                return 0
            img, msk, vimg, vmsk, classes, px = load("epfl")
            two, two_masks = img[:2], (msk[:2] > 0).astype(np.uint8)
            base = load_model(base_path)
            rows = {}
            rows["ISBI model, no fine-tuning"] = evaluate_arrays(base, vimg, vmsk, tmp, px)
            scratch, _ = train_on(f"{tag}-scratch", two, two_masks, classes, px, args.minutes, **settings)
            rows["from scratch, 2 slices, dense"] = evaluate_arrays(scratch.model, vimg, vmsk, tmp, px)
            # `emseg finetune`'s defaults: 500 steps at lr 3e-4
            dense, _ = train_on(f"{tag}-dense", two, two_masks, classes, px, args.minutes, base=base,
                                **{"steps": 500, "lr": 3e-4, **settings})
            rows["fine-tuned, 2 slices, dense"] = evaluate_arrays(dense.model, vimg, vmsk, tmp, px)
            scrib, _ = train_on(f"{tag}-scribbles", two, scribbles_from(two_masks), classes, px, args.minutes,
                                base=base, sparse=True, **{"steps": 500, "lr": 3e-4, **settings})
            rows["fine-tuned, 2 slices, scribbles"] = evaluate_arrays(scrib.model, vimg, vmsk, tmp, px)
            # the ISBI model's foreground class is still called membrane: take the second class, whatever its name
            report["results"] = {k: {"iou_mitochondrion": list(v["iou"].values())[1], "pixel_error": v["pixel_error"]}
                                 for k, v in rows.items()}
            for key, run in (("from scratch, 2 slices, dense", scratch), ("fine-tuned, 2 slices, dense", dense),
                             ("fine-tuned, 2 slices, scribbles", scrib)):
                report["results"][key]["steps"] = run.model.card.training["steps"]
                report["results"][key]["label_offset"] = run.model.card.training.get("label_offset")
            if tag == "finetune":  # the docs figure; other runs (--tag) leave it alone
                report["figure"] = str(finetune_figure(
                    {"from scratch (2 slices)": scratch.model, "ISBI model fine-tuned (2 slices)": dense.model,
                     "fine-tuned on scribbles": scrib.model}, vimg[2], vmsk[2], px,
                    ROOT / "docs" / "img" / "finetune_epfl.png"))
        else:
            from emseg.model.summary import measure_cost
            img, msk, vimg, vmsk, classes, px = load(args.dataset)
            result, seconds = train_on(tag, img, msk, classes, px, args.minutes,
                                       val=(vimg, vmsk) if args.val_on_heldout else None, **settings)
            report["validation"] = "held-out slices" if args.val_on_heldout else "strips of the training slices"
            report["train_seconds"] = round(seconds)
            report["steps"] = result.model.card.training["steps"]
            report["encoder"] = result.model.card.encoder
            report["parameters"] = sum(p.numel() for p in result.model.net.parameters())
            report["gflops_per_megapixel"] = round(measure_cost(result.model.card.encoder).gflops_per_mp, 1)
            report["label_offset"] = result.model.card.training.get("label_offset")
            report["metrics"] = evaluate_arrays(result.model, vimg, vmsk, tmp, px)
            if args.tta:
                report["metrics_tta"] = evaluate_arrays(result.model, vimg, vmsk, tmp, px, tta=True)
            if args.dataset == "isbi":
                probs = membrane_probs(result.model, vimg)
                report["membrane_threshold_study"] = membrane_study(probs, vmsk)
                report["error_by_edge_distance"] = error_by_edge_distance(probs, vmsk)
    text = json.dumps(report, indent=1)
    print(text)
    out = RUNS / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
