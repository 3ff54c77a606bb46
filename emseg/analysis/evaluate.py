"""Evaluate a model on annotated images: per-class IoU and Dice, pixel error, adapted Rand error.

The images go through the same tiled inference as ``emseg predict`` (normalisation, pixel-size
rescaling, blending), so the figures describe what users get. The adapted Rand error (ISBI 2012)
is computed on dense masks only: on the cells between membranes when a class is named
``membrane``, otherwise on the connected objects of each non-background class.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from emseg.analysis.metrics import IGNORE, adapted_rand_error, boundary_class_of, confusion, scores
from emseg.errors import InputError
from emseg.infer.preprocess import check_rescale
from emseg.io.read import open_image
from emseg.io.write import atomic_output
from emseg.train.data import mask_to_target

log = logging.getLogger(__name__)


def evaluate(predictor, pairs: Sequence[tuple[Path, Path]], *, sparse: bool = False,
             pixel_size_nm: float | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Metrics over all pages of all pairs, plus one row per page."""
    card = predictor.card
    n = card.num_classes
    total = np.zeros((n, n), np.int64)
    boundary = boundary_class_of(card.classes)
    rows, rand_errors = [], []
    pages_total, annotated = 0, not sparse
    for image_path, mask_path in pairs:
        with open_image(image_path) as img:
            pages_total += len(img)
        if not annotated:  # scribbles: look for one before the inference
            with open_image(mask_path) as msk:
                annotated = any(msk.page(i).any() for i in range(len(msk)))
    if not annotated:
        _nothing_to_evaluate(pairs, sparse)
    done = 0
    for image_path, mask_path in pairs:
        with open_image(image_path, pixel_size_nm=pixel_size_nm) as img, open_image(mask_path) as msk:
            if img.shape != msk.shape:
                raise InputError(f"{mask_path}: mask shape {msk.shape} differs from image {image_path} {img.shape}")
            check_rescale(str(image_path), img.shape[1:], img.pixel_size_nm, card.pixel_size_nm, channels=n + 1)
            for i in range(len(img)):
                target = mask_to_target(msk.page(i), sparse=sparse, name=f"{mask_path} page {i + 1}", num_classes=n)
                pred = predictor.predict_page(img.page(i), pixel_size_nm=img.pixel_size_nm).argmax(0)
                matrix = confusion(target, pred, n)
                total += matrix
                page_scores = scores(matrix, card.classes)
                row = {"image": image_path.name, "page": i + 1, "pixel_error": page_scores["pixel_error"],
                       **{f"iou_{k}": v for k, v in page_scores["iou"].items()},
                       **{f"dice_{k}": v for k, v in page_scores["dice"].items()}}
                if not (target == IGNORE).any():
                    row["adapted_rand_error"] = adapted_rand_error(target, pred, boundary)
                    rand_errors.append(row["adapted_rand_error"])
                rows.append(row)
                done += 1
                if progress:
                    progress(done, pages_total)
    if not total.any():
        _nothing_to_evaluate(pairs, sparse)
    summary = scores(total, card.classes)
    summary["adapted_rand_error"] = float(np.mean(rand_errors)) if rand_errors else None
    summary["pages"] = len(rows)
    return {"summary": summary, "pages": rows, "classes": list(card.classes)}


def _nothing_to_evaluate(pairs, sparse: bool):
    masks = ", ".join(str(m) for _, m in pairs)
    raise InputError(f"{masks}: no pixel is annotated, so there is nothing to evaluate"
                     + ("; with --sparse, 0 means not annotated and classes are 1..N" if sparse else "")
                     + "; give masks that mark some pixels with their class")


def write_results(results: dict, outdir: Path) -> tuple[Path, Path]:
    """``metrics.json`` (everything) and ``metrics.csv`` (one row per page, then the total)."""
    outdir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = outdir / "metrics.json", outdir / "metrics.csv"
    with atomic_output(json_path) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=2))
    s = results["summary"]
    total = {"image": "ALL", "page": "", "pixel_error": s["pixel_error"],
             "adapted_rand_error": s["adapted_rand_error"],
             **{f"iou_{k}": v for k, v in s["iou"].items()}, **{f"dice_{k}": v for k, v in s["dice"].items()}}
    rows = results["pages"] + [total]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_output(csv_path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return json_path, csv_path


def format_summary(results: dict) -> str:
    """A small text table of the summary for the terminal."""
    s = results["summary"]
    lines = [f"{'class':<16} {'IoU':>7} {'Dice':>7}"]
    for name in results["classes"]:
        iou, dice = s["iou"][name], s["dice"][name]
        lines.append(f"{name:<16} {iou if iou is not None else float('nan'):>7.4f} "
                     f"{dice if dice is not None else float('nan'):>7.4f}")
    lines.append(f"{'mean (no bg)':<16} {s['mean_iou'] or float('nan'):>7.4f} {s['mean_dice'] or float('nan'):>7.4f}")
    lines.append(f"pixel error          {s['pixel_error']:.4f}")
    are = s["adapted_rand_error"]
    lines.append(f"adapted Rand error   {are:.4f}" if are is not None else "adapted Rand error   - (needs dense masks)")
    lines.append(f"pages                {s['pages']}")
    return "\n".join(lines)
