"""Scale robustness on ISBI 2012 (issue #24 goal 2): a model trained at 4 nm/px applied to resampled pages.

    python benchmarks/bench_scale.py train [--minutes 20] [--tag NAME] [--augment P=S] [--set KEY=VALUE]
    python benchmarks/bench_scale.py train --zoom 0.15 --tag isbi_zoom15 --set steps=808 --minutes 30
    python benchmarks/bench_scale.py eval  [--model PATH] [--tag NAME] [--factors 0.7,0.8,...]

`train` trains the default recipe (`emseg train`'s defaults, as benchmarks/bench_train_real.py does) on
ISBI slices 0-23 with a time limit and one compute thread; the model is saved as
$EMSEG_BENCH_RUNS/scale/NAME/model.safetensors (default NAME: isbi).

`--zoom Z` sets the affine augmentation's scale range to +-Z (default 0.10, emseg.train.augment.AFFINE_SCALE;
applied to half of the crops, with the +-15 degree rotation unchanged): a study of scale augmentation,
not an option of `emseg train`.

`eval` resamples slices 24-29 by each factor f (0.7 ... 1.4; f > 1: more pixels, a pixel of 4/f nm):
images with an anti-aliased resize (skimage.transform.resize, anti_aliasing when shrinking, bilinear),
membrane masks resampled as floats (the same bilinear resize of 0/1) and thresholded at 0.5, so that a
membrane keeps its width in nm rather than in pixels. Each factor is evaluated with the code of
`emseg evaluate` (evaluate_arrays of bench_train_real):
  on      the true pixel size (4/f nm) is given: emseg rescales each page to the model's 4 nm and the
          probabilities back (pixel-size matching)
  off     no pixel size (None): the page is segmented as it is
and, to tell the losses apart:
  native_grid   the matching-on membrane probabilities resized back onto the native 512 x 512 grid and
                scored against the native annotation (what is lost on the way: the image's resampling
                and emseg's rescaling to 4 nm and back, not the labels')
  label_ceiling the native page's own prediction (no resampling at all) resized like the labels onto the
                resampled grid and scored against the resampled labels: what a perfectly scale-invariant
                model would score there, so the loss that the resampling of labels and probabilities
                alone causes
Results: $EMSEG_BENCH_RUNS/scale/NAME.json and NAME.md (a Markdown table). Skips when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_real import DATA, RUNS, _machine, evaluate_arrays, load, parse_settings, train_on  # noqa: E402

SCALE = RUNS / "scale"
FACTORS = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4)
MODEL_NM = 4.0


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def resampled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def resample_image(page: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear, anti-aliased when shrinking (a Gaussian of sigma (1/f - 1)/2, skimage's default), uint8."""
    from skimage.transform import resize
    shrinking = shape[0] < page.shape[0]
    out = resize(page.astype(np.float32), shape, order=1, mode="reflect", anti_aliasing=shrinking,
                 preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resample_float(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float plane (a 0/1 mask, a probability) resized like the images."""
    from skimage.transform import resize
    shrinking = shape[0] < plane.shape[0]
    return resize(plane.astype(np.float32), shape, order=1, mode="reflect", anti_aliasing=shrinking,
                  preserve_range=True)


def resample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """0/255 membrane mask -> resampled 0/255 mask: the 0/1 mask resized as a float, thresholded at 0.5."""
    return np.where(resample_float(mask > 0, shape) >= 0.5, 255, 0).astype(np.uint8)


def iou_error(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Membrane IoU and pixel error of boolean stacks."""
    inter = np.logical_and(pred, target).sum()
    union = np.logical_or(pred, target).sum()
    return float(inter / max(union, 1)), float(np.mean(pred != target))


def membrane_probability(predictor, page: np.ndarray, pixel_nm: float | None) -> np.ndarray:
    return predictor.predict_page(page, pixel_size_nm=pixel_nm)[1]


def evaluate_factors(model, images, masks, factors, tmp: Path, extras: bool = True) -> dict:
    """Per factor: IoU and pixel error with matching on and off (evaluate_arrays), and the controls."""
    predictor = model.predictor(device="auto")
    native_probs = [membrane_probability(predictor, p, None) for p in images] if extras else None
    rows = {}
    for f in factors:
        t0 = time.perf_counter()
        shape = resampled_shape(images.shape[1:], f)
        if f == 1.0:
            imgs, msks = images, masks
        else:
            imgs = np.stack([resample_image(p, shape) for p in images])
            msks = np.stack([resample_mask(m, shape) for m in masks])
        pixel_nm = MODEL_NM / f
        row = {"pixel_nm": round(pixel_nm, 4), "shape": list(shape),
               "membrane_fraction": float((msks > 0).mean())}
        for key, given in (("on", pixel_nm), ("off", None)):
            m = evaluate_arrays(model, imgs, msks, tmp, given)
            row[key] = {"iou": m["iou"]["membrane"], "pixel_error": m["pixel_error"],
                        "rand_error": m["adapted_rand_error"]}
        if extras:
            back = [resample_float(membrane_probability(predictor, p, pixel_nm), images.shape[1:]) >= 0.5
                    for p in imgs]
            iou, err = iou_error(np.stack(back), masks > 0)
            row["native_grid"] = {"iou": iou, "pixel_error": err}
            moved = [resample_float(p, shape) >= 0.5 for p in native_probs]
            iou, err = iou_error(np.stack(moved), msks > 0)
            row["label_ceiling"] = {"iou": iou, "pixel_error": err}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows[f"{f:.1f}"] = row
        logging.info("factor %.1f: %s", f, json.dumps(row))
    return rows


def table(rows: dict) -> str:
    native = rows.get("1.0", {}).get("on", {}).get("iou")
    lines = ["| factor | pixel (nm) | shape | IoU on | IoU off | on - native | pixel error on | pixel error off "
             "| on, back on the native grid | label ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        diff = f"{r['on']['iou'] - native:+.3f}" if native is not None else "-"
        ng = f"{r['native_grid']['iou']:.3f}" if "native_grid" in r else "-"
        lc = f"{r['label_ceiling']['iou']:.3f}" if "label_ceiling" in r else "-"
        lines.append(f"| {key} | {r['pixel_nm']:.2f} | {r['shape'][0]} | {r['on']['iou']:.3f} | {r['off']['iou']:.3f} "
                     f"| {diff} | {r['on']['pixel_error']:.4f} | {r['off']['pixel_error']:.4f} | {ng} | {lc} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train", "eval"])
    parser.add_argument("--minutes", type=float, default=20.0, help="train: time limit")
    parser.add_argument("--tag", default="isbi", help="name of the run and of its results")
    parser.add_argument("--model", type=Path, help="eval: the model (default: the one `train --tag` saved)")
    parser.add_argument("--factors", default=",".join(str(f) for f in FACTORS))
    parser.add_argument("--no-extras", action="store_true", help="eval: only matching on and off")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--augment", action="append", default=[], metavar="PART=STRENGTH")
    parser.add_argument("--zoom", type=float, help="train: the affine's scale range +-ZOOM (default 0.10)")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: the shared data folder {DATA} is absent")
        return 0
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = {"command": args.command, "tag": args.tag, "machine": f"{_machine()}, {cpu_name()}",
              "threads": torch.get_num_threads()}
    img, msk, vimg, vmsk, classes, px = load("isbi")
    if args.command == "train":
        settings = parse_settings(args.set)
        if args.zoom is not None:
            import emseg.train.augment as augment
            import emseg.train.augment_device as augment_device
            augment.AFFINE_SCALE = augment_device.AFFINE_SCALE = args.zoom
            report["zoom"] = args.zoom
        if args.augment:
            from emseg.cli.train import _augment_config
            settings["augment"] = _augment_config(argparse.Namespace(augment_preset=None, augment=args.augment), {})
        result, seconds = train_on(f"scale/{args.tag}", img, msk, classes, px, args.minutes, **settings)
        report.update(minutes=args.minutes, train_seconds=round(seconds), steps=result.model.card.training["steps"],
                      model=str(SCALE / args.tag / "model.safetensors"),
                      settings={k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in settings.items()})
        out = SCALE / f"{args.tag}_train.json"
    else:
        from emseg.model.modelfile import load_model
        path = args.model or SCALE / args.tag / "model.safetensors"
        if not path.exists():
            raise SystemExit(f"{path}: no model; run `bench_scale.py train` first or give --model")
        model = load_model(path)
        factors = [float(f) for f in args.factors.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            rows = evaluate_factors(model, vimg, vmsk, factors, Path(tmp), extras=not args.no_extras)
        report.update(model=str(path), rows=rows)
        (SCALE / f"{args.tag}.md").parent.mkdir(parents=True, exist_ok=True)
        (SCALE / f"{args.tag}.md").write_text(table(rows))
        print(table(rows))
        out = SCALE / f"{args.tag}.json"
    text = json.dumps(report, indent=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
