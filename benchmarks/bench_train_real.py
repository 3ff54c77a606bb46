"""Train and evaluate emseg with its default settings on real EM data (../shared/data).

    python benchmarks/bench_train_real.py isbi  [--minutes 30]   # membranes, slices 0-23 / 24-29
    python benchmarks/bench_train_real.py epfl  [--minutes 30]   # mitochondria, last 5 slices held out
    python benchmarks/bench_train_real.py nasa  [--minutes 30]   # superalloy precipitates, train / val
    python benchmarks/bench_train_real.py finetune [--minutes 5] # ISBI model -> 2 EPFL slices

    --tta             also evaluate with test-time augmentation
    --set KEY=VALUE   change a training setting (a TrainConfig field), e.g. --set border_weight=0
    --tag NAME        name of the run (default: the data set), for runs/bench/NAME.json

Each run trains with `emseg.training.train` and the defaults of `emseg train` (only the classes,
the held-out data and the time limit are set), then evaluates the held-out slices with the same code
as `emseg evaluate` and prints the metrics as JSON and a Markdown row for docs/training.md.
Skips with a message when ../shared/data is absent.
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
DATA = ROOT.parent / "shared" / "data"
RUNS = ROOT / "runs" / "bench"


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
                _pngs(base / "val" / "masks"), ("matrix", "secondary", "tertiary"), None)
    raise SystemExit(f"unknown data set {name}")


def evaluate_arrays(model, images: np.ndarray, masks: np.ndarray, tmp: Path, tta: bool = False) -> dict:
    """Evaluate exactly as `emseg evaluate` does, on arrays written to temporary TIFFs."""
    from emseg.evaluate import evaluate
    tifffile.imwrite(tmp / "val_img.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp / "val_msk.tif", masks, photometric="minisblack")
    predictor = model.predictor(tta=tta, device="auto")
    return evaluate(predictor, [(tmp / "val_img.tif", tmp / "val_msk.tif")])["summary"]


def membrane_study(model, images: np.ndarray, masks: np.ndarray, tta: bool = False) -> dict:
    """Sensitivity of the ISBI metrics to the membrane threshold, and the Rand error without border
    thinning (predicted membrane pixels scored as one more region), on the held-out slices."""
    from emseg.metrics import adapted_rand_error
    predictor = model.predictor(tta=tta, device="auto")
    probs = [predictor.predict_page(page)[1] for page in images]
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


def parse_settings(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings to TrainConfig keyword arguments (numbers parsed)."""
    from emseg.training import TrainConfig
    fields = TrainConfig.__dataclass_fields__
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"--set {pair}: {key!r} is not a training setting ({', '.join(fields)})")
        default = fields[key].default
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            out[key] = type(default)(value)
        else:  # str, or None for optional numbers (time_limit_minutes, pixel_size_nm)
            try:
                out[key] = value if isinstance(default, str) else float(value)
            except ValueError:
                out[key] = value
    return out


def train_on(name, images, masks, classes, pixel_nm, minutes, *, base=None, sparse=False, steps=None, **settings):
    from emseg.card import Normalization
    from emseg.training import TrainConfig, annotations_from_arrays, train
    norm = base.card.normalization if base else Normalization()
    items = annotations_from_arrays(images, masks, sparse=sparse, pixel_size_nm=pixel_nm, name=name, norm=norm)
    config = TrainConfig(classes=classes, pixel_size_nm=pixel_nm, time_limit_minutes=minutes, sparse=sparse,
                         steps=steps or TrainConfig.steps, name=f"bench {name}", **settings)
    start = time.perf_counter()
    result = train(items, config, RUNS / name, base=base)
    return result, time.perf_counter() - start


def scribbles_from(masks: np.ndarray, every: int = 16, width: int = 3) -> np.ndarray:
    """Sparse labels (0 = not annotated, class + 1) along horizontal lines, like quick strokes."""
    sparse = np.zeros_like(masks, dtype=np.uint8)
    for r in range(0, masks.shape[1], every):
        sparse[:, r:r + width] = (masks[:, r:r + width] > 0).astype(np.uint8) + 1
    return sparse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["isbi", "epfl", "nasa", "finetune"])
    parser.add_argument("--minutes", type=float, default=30.0, help="training time limit")
    parser.add_argument("--tta", action="store_true", help="also evaluate with test-time augmentation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a training setting (a TrainConfig field); repeatable")
    parser.add_argument("--tag", help="name of the run (default: the data set)")
    parser.add_argument("--base", type=Path, default=RUNS / "isbi" / "model.safetensors",
                        help="finetune: the ISBI-trained model to start from")
    args = parser.parse_args()
    settings = parse_settings(args.set)
    tag = args.tag or args.dataset
    if not DATA.exists():
        print(f"skipped: the shared data folder {DATA} is absent")
        return 0
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = {"dataset": args.dataset, "machine": _machine(), "minutes": args.minutes, "settings": settings}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dataset == "finetune":
            from emseg.modelfile import load_model
            base_path = args.base
            if not base_path.exists():
                print(f"skipped: run the isbi benchmark first ({base_path} is missing)")
                return 0
            img, msk, vimg, vmsk, classes, px = load("epfl")
            two, two_masks = img[:2], (msk[:2] > 0).astype(np.uint8)
            base = load_model(base_path)
            rows = {}
            rows["ISBI model, no fine-tuning"] = evaluate_arrays(base, vimg, vmsk, tmp)
            scratch, _ = train_on("epfl2-scratch", two, two_masks, classes, px, args.minutes)
            rows["from scratch, 2 slices, dense"] = evaluate_arrays(scratch.model, vimg, vmsk, tmp)
            # `emseg finetune`'s defaults: 500 steps at lr 3e-4
            dense, _ = train_on("epfl2-ft-dense", two, two_masks, classes, px, args.minutes, base=base,
                                steps=500, lr=3e-4)
            rows["fine-tuned, 2 slices, dense"] = evaluate_arrays(dense.model, vimg, vmsk, tmp)
            scrib, _ = train_on("epfl2-ft-scribbles", two, scribbles_from(two_masks), classes, px, args.minutes,
                                base=base, sparse=True, steps=500, lr=3e-4)
            rows["fine-tuned, 2 slices, scribbles"] = evaluate_arrays(scrib.model, vimg, vmsk, tmp)
            # the ISBI model's foreground class is still called membrane: take the second class, whatever its name
            report["results"] = {k: {"iou_mitochondrion": list(v["iou"].values())[1], "pixel_error": v["pixel_error"]}
                                 for k, v in rows.items()}
        else:
            img, msk, vimg, vmsk, classes, px = load(args.dataset)
            result, seconds = train_on(tag, img, msk, classes, px, args.minutes, **settings)
            report["train_seconds"] = round(seconds)
            report["steps"] = result.model.card.training["steps"]
            report["encoder"] = result.model.card.encoder
            report["metrics"] = evaluate_arrays(result.model, vimg, vmsk, tmp)
            if args.tta:
                report["metrics_tta"] = evaluate_arrays(result.model, vimg, vmsk, tmp, tta=True)
            if args.dataset == "isbi":
                report["membrane_threshold_study"] = membrane_study(result.model, vimg, vmsk)
    text = json.dumps(report, indent=1)
    print(text)
    out = RUNS / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
