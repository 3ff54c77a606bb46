"""Precipitate counts and sizes on NASA Super1 (val): a model's prediction vs the ground truth.

Trains nothing. For each of the 4 validation pairs in ``../shared/data/nasa_super/val``
(``images/NAME.png``, ``masks/NAME.png``; classes 0 matrix, 1 tertiary, 2 secondary precipitates),
objects are found in the ground-truth mask and in the model's predicted mask with the same
options (connected components by default) and measured with :mod:`emseg.analysis.measure`. Printed per
class, pooled over the images: object count and median equivalent diameter of the ground truth,
of the prediction, and the relative error ``(prediction - truth) / truth``; also the area fraction.

Objects touching the image border are excluded from counts and diameters (``--include-border`` to
keep them), as in ``emseg measure``. The images carry no pixel size, so diameters are in px
(relative errors do not depend on it; ``--pixel-size`` reports nm).

Usage::

    python benchmarks/bench_objects_nasa.py [--model MODEL] [--split] [--include-border] [--csv OUT.csv]

Without a model file (``--model``, default ``emseg.default_model_path()``) only the ground-truth
figures are printed; without the data set the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emseg.analysis.measure import measure_objects, summarize  # noqa: E402
from emseg.analysis.objects import find_instances, read_pages  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nasa_super" / "val"
CLASSES = ("matrix", "tertiary", "secondary")


def load_pairs(root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, image, mask)`` for every ``images/NAME.png`` with a ``masks/NAME.png``."""
    pairs = []
    for image_path in sorted((root / "images").glob("*.png")):
        mask_path = root / "masks" / image_path.name
        if mask_path.exists():
            pairs.append((image_path.stem, read_pages(image_path)[0], read_pages(mask_path)[0]))
    return pairs


def per_class(masks: list[tuple[str, np.ndarray, np.ndarray]], args) -> dict[str, dict]:
    """Pooled summary row per class name (count, area fraction, median diameter) of some masks."""
    options = dict(split=args.split, split_depth_px=args.split_depth, min_size_px=args.min_size)
    tables = [measure_objects(find_instances(mask, class_ids=(1, 2), **options), image=image,
                              pixel_size_nm=args.pixel_size, class_names=CLASSES, name=name)
              for name, image, mask in masks]
    rows = summarize(tables, exclude_border=not args.include_border)
    pooled = [r for r in rows if r["input"] == "ALL"] if len(tables) > 1 else rows
    return {r["class"]: r for r in pooled}


def _median_key(row: dict) -> str:
    return next(k for k in row if k.startswith("diameter_median_"))


def report(truth: dict[str, dict], pred: dict[str, dict] | None) -> list[dict]:
    """Rows of the comparison table (prediction columns empty without a prediction)."""
    out = []
    for name in CLASSES[1:]:
        t = truth[name]
        key = _median_key(t)
        row = {"class": name, "gt_count": t["count"], "gt_n_border": t["n_border"],
               "gt_area_fraction": round(t["area_fraction"], 4), f"gt_{key}": round(float(t[key]), 2)}
        if pred is not None:
            p = pred[name]
            row.update({"pred_count": p["count"], "pred_area_fraction": round(p["area_fraction"], 4),
                        f"pred_{key}": round(float(p[key]), 2),
                        "count_rel_error": round((p["count"] - t["count"]) / t["count"], 4),
                        "median_diameter_rel_error": round((p[key] - t[key]) / t[key], 4)})
        out.append(row)
    return out


def print_table(rows: list[dict]) -> None:
    """Print rows as a Markdown table."""
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (0 also when skipped for missing data or model)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model file (default: emseg's default model)")
    parser.add_argument("--data", type=Path, default=DATA, help=f"val folder (default {DATA})")
    parser.add_argument("--split", action="store_true", help="split touching objects (both masks)")
    parser.add_argument("--split-depth", type=float, default=2.0, help="split neck depth in px (default 2)")
    parser.add_argument("--min-size", type=int, default=0, help="drop objects under this many pixels (default 0)")
    parser.add_argument("--include-border", action="store_true", help="keep objects touching the border")
    parser.add_argument("--pixel-size", type=float, help="pixel size in nm/px, to report diameters in nm")
    parser.add_argument("--device", default="auto", help="inference device (default auto)")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    args = parser.parse_args(argv)

    if not (args.data / "images").is_dir() or not (args.data / "masks").is_dir():
        print(f"SKIP: data set {args.data} is absent (NASA Super1 val, images/ and masks/ PNG pairs)")
        return 0
    pairs = load_pairs(args.data)
    truth = per_class(pairs, args)
    from emseg.model.modelfile import default_model_path, load_model
    model_path = args.model or default_model_path()
    pred = None
    if not Path(model_path).exists():
        print(f"SKIP prediction: model file {model_path} not found; ground-truth figures only\n")
    else:
        model = load_model(model_path)
        if model.card.num_classes != len(CLASSES):
            print(f"model {model_path} has classes {list(model.classes)}; this benchmark needs 3 "
                  f"({', '.join(CLASSES)}). Pass a model trained on nasa_super with --model")
            return 2
        predictor_options = dict(device=args.device)
        predicted = [(name, image, model.predict(image, **predictor_options)) for name, image, _ in pairs]
        pred = per_class(predicted, args)
        print(f"model {model_path} ({model.card.encoder}, classes {list(model.classes)})\n")
    rows = report(truth, pred)
    border = "included" if args.include_border else "excluded"
    print(f"NASA Super1 val, {len(pairs)} images; objects by connected components"
          f"{' + watershed split' if args.split else ''}; border-touching objects {border}\n")
    print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
