"""Does `emseg pretrain` make two annotated slices enough? Pretraining on unlabelled images, then fine-tuning.

    python benchmarks/bench_pretrain.py pretrain membranes [--minutes 20] [--objective masked|contrastive]
        [--batch-size B]
    python benchmarks/bench_pretrain.py finetune membranes [--minutes 6] [--seeds 0 1] [--sparse] [--arms ...]
    python benchmarks/bench_pretrain.py scaling membranes --series LABEL 0=random 20=masked ... [--ceiling TAG]
    python benchmarks/bench_pretrain.py arms --panel membranes LABEL=TAG ... [--panel mito ...] [--plot PNG]
    python benchmarks/bench_pretrain.py errors LABEL=MODEL ... --plot PNG [--slice 24]

Data sets (../shared/data; nothing else is ever used):

* membranes: pretrain on ISBI's unlabelled test-volume.tif (30 slices, 4 nm) and EPFL's 27 images
  (5 nm, rescaled to 4 nm); fine-tune on ISBI training slices 0 and 12; evaluate on 24-29.
* mito: pretrain on EPFL's 27 images and ISBI's test volume (rescaled to 5 nm); fine-tune on EPFL
  slices 0 and 11; evaluate on the last 5 (as bench_train_real.py epfl).
* materials: pretrain on NASA's training images (unlabelled); fine-tune on 2 of them; evaluate on val.

Arms of `finetune`, each with the same budget (``--steps``, or ``--minutes`` of training; the defaults of `emseg train`
otherwise): ``random`` (the 2 slices from random weights), ``pretrained`` (the same from the pretrained
model, as `emseg train --init`), ``full`` (all training slices from random weights: the ceiling).
``selftrain`` (self-training, emseg.train.selftrain: half the steps on the 2 slices, then the model's own labels of the
set's unlabelled pages, where it is at least ``--confidence`` sure, beside the 2 slices for the other half;
``--balanced``: the same share of every class's pixels; with ``--pretrained`` given, from the pretrained model).
``--sparse`` fine-tunes on scribbles (horizontal strokes, as bench_train_real.py draws them) instead of the
dense masks of the 2 slices. One compute thread (``--threads``). Results: runs/bench/pretrain/*.json and a
Markdown table on stdout. ``scaling`` tables (and plots) the fine-tuned IoU against the pretraining length, from the
results of ``finetune --tag`` runs (one tag a length, 0 minutes for random weights; ``--series`` again for another
line), and the share of the gap to ``--ceiling`` (a ``full`` arm's tag) that each closes. ``arms`` sets arms side by side
(one ``--panel`` a data set, its first arm the reference): each seed's IoU, the mean and the difference to the first.
``errors`` draws where membrane models (``finetune --keep-models`` saves them) are wrong on a held-out ISBI slice.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train_real import DATA, RUNS, evaluate_arrays, load, parse_settings, scribbles_from  # noqa: E402

OUT = RUNS / "pretrain"
SETS = {  # data set -> (bench_train_real name, the 2 fine-tuning slices, model pixel size nm)
    "membranes": ("isbi", (0, 12), 4.0),
    "mito": ("epfl", (0, 11), 5.0),
    "materials": ("nasa", (0, 1), None),
}
TITLES = {"membranes": "ISBI membranes", "mito": "EPFL mitochondria", "materials": "NASA superalloy"}


def machine() -> str:
    import albumentations
    import cv2
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    # the augmentation's libraries too: OpenCV 4 and 5 make crops that differ in the fifth digit, and a 2-slice
    # ISBI run moved by 0.027 IoU between them (docs/training.md, sixth attempt)
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
            f"albumentations {albumentations.__version__}, OpenCV {cv2.__version__}")


def unlabelled(name: str):
    """The unlabelled pages of a data set's pretraining, as (arrays, pixel sizes) of each source."""
    isbi_test = tifffile.imread(DATA / "isbi2012" / "test-volume.tif")
    epfl = tifffile.imread(DATA / "epfl_mito" / "train-volume.tif")
    if name == "membranes":
        return [(isbi_test, 4.0, "isbi test-volume"), (epfl, 5.0, "epfl train-volume")]
    if name == "mito":
        return [(epfl, 5.0, "epfl train-volume"), (isbi_test, 4.0, "isbi test-volume")]
    train_images = load("nasa")[0]
    return [(train_images, None, "nasa train images")]


def pages_of(name: str, target_nm: float | None, crop: int):
    from emseg.train.data import rescale_items
    from emseg.train.pretrain import unlabelled_from_arrays
    items = []
    for stack, nm, source in unlabelled(name):  # every page (the data sets hold less than the pixel budget)
        items += unlabelled_from_arrays(stack, tile=crop, pixel_size_nm=nm, name=source,
                                        max_pixels=2**40)
    return rescale_items(items, target_nm)


def cmd_pretrain(args) -> int:
    from emseg.train.pretrain import PretrainConfig, pretrain
    _, _, nm = SETS[args.data]
    batch = {"batch_size": args.batch_size} if args.batch_size else {}
    config = PretrainConfig(time_limit_minutes=args.minutes, seed=args.seed, device=args.device, pixel_size_nm=nm,
                            objective=args.objective, name=f"pretrained on {args.data}", **batch)
    pages = pages_of(args.data, nm, config.crop_size)
    tag = (f"{args.data}_{args.minutes:g}min{'_' + args.objective if args.objective != 'restoration' else ''}"
           f"{f'_b{args.batch_size}' if args.batch_size else ''}")
    out = OUT / tag
    start = time.perf_counter()
    result = pretrain(pages, config, out, resume=args.resume)
    last = result.history[-1]
    report = {"set": args.data, "objective": args.objective, "minutes": args.minutes, "steps": last["step"],
              "batch_size": config.batch_size,
              "pages": len(pages), "megapixels": round(sum(p.image.size for p in pages) / 1e6, 1),
              "val_loss": last["val_loss"],
              "copy_loss": last["copy_loss"], "seconds": round(time.perf_counter() - start, 1),
              "model": str(result.model_path), "machine": machine()}
    (OUT / f"pretrain_{tag}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def finetune_arm(arm: str, args, pretrained_path: Path | None) -> dict:
    from emseg.model.modelfile import load_model
    from emseg.train.loop import TrainConfig, annotations_from_arrays, train
    data, slices, nm = SETS[args.data]
    train_img, train_msk, val_img, val_msk, classes, _ = load(data)
    if arm == "full":
        images, masks, sparse = train_img, train_msk, False
    else:
        images, masks = train_img[list(slices)], train_msk[list(slices)]
        sparse = args.sparse
        if sparse:
            masks = scribbles_from(np.asarray(masks))  # binary masks: strokes of membrane (2) and not (1)
    from_file = arm == "pretrained" or (arm == "selftrain" and args.pretrained)  # self-training from a given start
    base = load_model(pretrained_path) if from_file else None
    items = annotations_from_arrays(images, masks, sparse=sparse, pixel_size_nm=nm, name=data,
                                    norm=base.card.normalization if base else None)
    budget = dict(steps=args.steps, time_limit_minutes=None) if args.steps else dict(time_limit_minutes=args.minutes)
    start, extra = time.perf_counter(), {}
    if arm == "selftrain":
        if sparse:
            raise SystemExit("selftrain: dense masks only")
        result, extra = selftrain_arm(args, classes, items, nm, budget, base)
    else:
        config = TrainConfig(classes=classes, pixel_size_nm=nm, sparse=sparse, seed=args.seed_now, device=args.device,
                             name=f"bench pretrain {arm}", **{**budget, **args.settings})
        result = train(items, config, None, base=base)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        summary = evaluate_arrays(result.model, val_img, val_msk, Path(tmp), nm)
    if args.keep_models:
        result.model.save(OUT / "models" / f"{args.data}_{args.tag or 'untagged'}_{arm}_s{args.seed_now}.safetensors")
    return {"arm": arm, "objective": base.card.pretrained.get("objective") if base else None,
            "seed": args.seed_now, "sparse": sparse and arm != "full", "steps": result.history[-1]["step"],
            "settings": args.changes, "seconds": round(seconds, 1), "metrics": summary, **extra}


def selftrain_pool(name: str) -> list:
    """The raw pages a ``selftrain`` arm labels with its own predictions: the set's unlabelled pages, never the
    held-out ones (ISBI's test volume; EPFL's and NASA's other training pages, their masks unused)."""
    from emseg.train.selftrain import RawPage
    data, slices, nm = SETS[name]
    if name == "membranes":
        pages = tifffile.imread(DATA / "isbi2012" / "test-volume.tif")
        return [RawPage(page, nm, f"isbi test-volume[{i}]") for i, page in enumerate(pages)]
    return [RawPage(page, nm, f"{data}[{i}]") for i, page in enumerate(load(data)[0]) if i not in slices]


def selftrain_arm(args, classes, items, nm, budget, base=None) -> tuple:
    """Self-training (emseg.train.selftrain): the teacher's share of the steps on the 2 slices, then its labels of
    the set's unlabelled pages beside the 2 slices for the rest, from the teacher's weights. (The control of the
    docs, the same two runs without pseudo-labels, and the runs of its table: commit 3373b39, where the slices were
    repeated rather than weighted.)"""
    from emseg.train.loop import TrainConfig
    from emseg.train.selftrain import self_train
    config = TrainConfig(classes=classes, pixel_size_nm=nm, seed=args.seed_now, device=args.device,
                         name="bench selftrain", **{**budget, **args.settings})
    result = self_train(items, selftrain_pool(args.data), config, base=base, confidence=args.confidence,
                        balanced=args.balanced, teacher_share=args.teacher_share)
    return result, result.model.card.training["self_training"]


def cmd_finetune(args) -> int:
    args.settings = parse_settings(args.changes)
    pretrained = Path(args.pretrained) if args.pretrained else OUT / f"{args.data}_20min" / "model.safetensors"
    if "pretrained" in args.arms and not pretrained.exists():
        raise SystemExit(f"{pretrained}: no pretrained model; run `bench_pretrain.py pretrain {args.data}` first "
                         "or give --pretrained")
    rows = []
    tag = f"{args.data}{'_sparse' if args.sparse else ''}{'_' + args.tag if args.tag else ''}"
    path = OUT / f"finetune_{tag}.json"
    done = json.loads(path.read_text())["rows"] if path.exists() and not args.fresh else []
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    for arm in args.arms:
        for seed in ([0] if arm == "full" and not args.full_seeds else args.seeds):
            if any(r["arm"] == arm and r["seed"] == seed and r["budget"] == budget
                   and r.get("settings", []) == args.changes for r in done):
                continue
            args.seed_now = seed
            row = finetune_arm(arm, args, pretrained)
            row["budget"] = budget
            done.append(row)
            print(json.dumps(row))
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"set": args.data, "pretrained": str(pretrained), "machine": machine(),
                                        "rows": done}, indent=1))
    rows = [r for r in done if r["budget"] == budget]
    print(table(rows))
    return 0


def _ious(data: str, tag: str) -> dict[int, float]:
    """Each seed's mean IoU in the fine-tuning results of a tag (finetune_SET_TAG.json, or one file a seed:
    finetune_SET_TAG_sN.json)."""
    paths = [OUT / f"finetune_{data}_{tag}.json", *sorted(OUT.glob(f"finetune_{data}_{tag}_s[0-9]*.json"))]
    found = {}
    for path in paths:
        if path.exists() and (path.stem == f"finetune_{data}_{tag}" or path.stem.rpartition("_s")[2].isdigit()):
            found.update({r["seed"]: r["metrics"]["mean_iou"] for r in json.loads(path.read_text())["rows"]})
    return found


def _results(data: str, tag: str, command: str) -> dict:
    """A tag's fine-tuning results: ``tag``, each seed's IoU (``iou``) and their ``mean``; none is an error of
    ``command``."""
    iou = _ious(data, tag)
    if not iou:
        raise SystemExit(f"{command}: no results for tag {tag!r} (runs/bench/pretrain/finetune_{data}_{tag}[_sN].json)")
    return {"tag": tag, "iou": iou, "mean": float(np.mean(list(iou.values())))}


def scaling(data: str, points: list[tuple[float, str]], ceiling: str | None) -> list[dict]:
    """Per pretraining length (0: random weights), each seed's fine-tuned IoU, their mean and the share of the gap
    between random weights and the ceiling (all training slices) that it closes."""
    rows = [{"minutes": minutes, **_results(data, tag, "scaling")} for minutes, tag in points]
    top = _ious(data, ceiling) if ceiling else {}
    start = next((r["mean"] for r in rows if r["minutes"] == 0), None)
    for row in rows:
        row["ceiling"] = float(np.mean(list(top.values()))) if top else None
        row["share"] = ((row["mean"] - start) / (row["ceiling"] - start)
                        if top and start is not None and row["ceiling"] != start else None)
    return rows


def _points(specs: list[str]) -> list[tuple[float, str]]:
    points = []
    for spec in specs:
        minutes, _, tag = spec.partition("=")
        try:
            points.append((float(minutes), tag))
        except ValueError:
            tag = ""
        if not tag:
            raise SystemExit(f"scaling: {spec!r} is not MINUTES=TAG (e.g. 0=random 20=masked)")
    return points


def cmd_scaling(args) -> int:
    series = [(label, scaling(args.data, _points(specs), args.ceiling)) for label, *specs in args.series]
    print("| series | pretraining (min) | results | seeds | IoU per seed | mean | share of the gap closed |\n"
          "|---|---|---|---|---|---|---|")
    for label, rows in series:
        for r in rows:
            share = "" if r["share"] is None else f"{100 * r['share']:.0f} %"
            print(f"| {label} | {r['minutes']:g} | {r['tag']} | {', '.join(map(str, r['iou']))} | "
                  f"{' / '.join(f'{v:.3f}' for v in r['iou'].values())} | {r['mean']:.3f} | {share} |")
    if args.plot:
        print(f"wrote {plot_scaling(series, args.data, Path(args.plot))}")
    return 0


def plot_scaling(series: list[tuple[str, list[dict]]], data: str, path: Path) -> Path:
    """Fine-tuned IoU against pretraining minutes, a line a series: each seed (circles), the means (line), the
    ceiling and the issue's goal (half the gap between random weights and the ceiling closed)."""
    from emseg.analysis.reports import _figure, save_png

    plt, (fig, ax) = _figure(figsize=(6.4, 4.0))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, rows), colour in zip(series, colours):
        for r in rows:
            ax.scatter([r["minutes"]] * len(r["iou"]), list(r["iou"].values()), s=26, facecolors="none",
                       edgecolors=colour, alpha=0.7, zorder=2)
        ax.plot([r["minutes"] for r in rows], [r["mean"] for r in rows], "o-", color=colour, ms=6, zorder=3,
                label=f"{label} (mean; circles: seeds)")
    rows = series[0][1]
    ceiling, start = rows[0]["ceiling"], next((r["mean"] for r in rows if r["minutes"] == 0), None)
    if ceiling is not None:
        ax.axhline(ceiling, color="0.2", ls="--", lw=1, label="all training slices (ceiling)")
        if start is not None:
            ax.axhline((start + ceiling) / 2, color="tab:red", ls=":", lw=1.2, label="goal: half the gap closed")
    ax.set(xlabel="pretraining (CPU-minutes, one thread; 0: random weights)", ylabel="foreground IoU, 2 slices",
           title=f"{data}: fine-tuned on two slices after pretraining")
    ax.set_xticks(sorted({r["minutes"] for _, rows in series for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return save_png(plt, fig, path)


def arms(data: str, specs: list[str]) -> list[dict]:
    """The fine-tuning results of each ``LABEL=TAG`` of a data set: each seed's IoU, their mean, and the difference of
    the means to the first arm's (the reference, e.g. random weights)."""
    if data not in SETS:
        raise SystemExit(f"arms: {data!r} is not a data set ({', '.join(SETS)}): a --panel starts with one")
    if not specs:
        raise SystemExit(f"arms: the panel of {data} names no arms (LABEL=TAG after the data set)")
    rows = []
    for spec in specs:
        label, _, tag = spec.rpartition("=")
        if not label or not tag:
            raise SystemExit(f"arms: {spec!r} is not LABEL=TAG (e.g. 'random weights=random_amd')")
        rows.append({"label": label, **_results(data, tag, "arms")})
    for row in rows:
        row["diff"] = row["mean"] - rows[0]["mean"]
    return rows


def cmd_arms(args) -> int:
    panels = [(data, arms(data, specs)) for data, *specs in args.panel]
    print("| set | arm | results | seeds | IoU per seed | mean | difference to the first |\n"
          "|---|---|---|---|---|---|---|")
    for data, rows in panels:
        for r in rows:
            print(f"| {data} | {r['label']} | {r['tag']} | {', '.join(map(str, r['iou']))} | "
                  f"{' / '.join(f'{v:.3f}' for v in r['iou'].values())} | {r['mean']:.3f} | {r['diff']:+.3f} |")
    if args.plot:
        print(f"wrote {plot_arms(panels, Path(args.plot))}")
    return 0


MIN_SPAN = 0.08  # the narrowest IoU axis of an `arms` panel


def plot_arms(panels: list[tuple[str, list[dict]]], path: Path) -> Path:
    """One panel a data set, one row an arm from the top: each seed's IoU (circles) and the mean (a dot, blue when
    above the first arm's, red when below; its value beside it), with the first arm's mean as a dashed line. Panels
    whose arms have the same labels share them, written once at the left; no axis spans less than MIN_SPAN."""
    from emseg.analysis.reports import _figure, save_png

    labels = [[r["label"] for r in rows] for _, rows in panels]
    shared = all(ls == labels[0] for ls in labels)
    plt, (fig, axes) = _figure(1, len(panels), figsize=(3.4 * len(panels) + 2.6, 1.1 + 0.45 * max(map(len, labels))),
                               squeeze=False, sharey=shared)
    for i, (ax, (data, rows)) in enumerate(zip(axes[0], panels)):
        ys = range(len(rows) - 1, -1, -1)
        for y, r in zip(ys, rows):
            ax.scatter(list(r["iou"].values()), [y] * len(r["iou"]), s=24, facecolors="none", edgecolors="0.4",
                       zorder=2)
            colour = "0.2" if r is rows[0] else "tab:blue" if r["diff"] > 0 else "tab:red"
            ax.plot(r["mean"], y, "o", color=colour, ms=7, zorder=3)
            ax.annotate(f"{r['mean']:.3f}", (r["mean"], y), xytext=(0, 6), textcoords="offset points",
                        ha="center", fontsize=7, color=colour)
        ax.axvline(rows[0]["mean"], color="0.2", ls="--", lw=0.9, zorder=1)
        if i == 0 or not shared:
            ax.set_yticks(list(ys), [r["label"] for r in rows])
        ax.set_ylim(-0.6, len(rows) - 0.3)
        ax.margins(x=0.1)
        low, high = ax.get_xlim()
        if high - low < MIN_SPAN:  # differences of a few thousandths are not drawn as wide as real ones
            middle = (low + high) / 2
            ax.set_xlim(middle - MIN_SPAN / 2, middle + MIN_SPAN / 2)
        ax.set_title(TITLES[data], fontsize=10)
        ax.set_xlabel("foreground IoU (circles: seeds)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_png(plt, fig, path)


def cmd_errors(args) -> int:
    """Where a membrane model is wrong on one held-out ISBI slice: the page, its annotation, the prediction, and the
    errors (membrane missed: blue; membrane drawn where there is none: red), one column a model."""
    from emseg.analysis.reports import _figure, save_png
    from emseg.model.modelfile import load_model
    _, _, val_img, val_msk, _, nm = load("isbi")
    page, truth = val_img[args.slice - 24], val_msk[args.slice - 24] > 0
    window = (slice(args.top, args.top + args.size), slice(args.left, args.left + args.size))
    shown = []
    for spec in args.models:
        label, _, path = spec.rpartition("=")
        probs = load_model(path).predictor(device="cpu").predict_page(page, pixel_size_nm=nm)
        shown.append((label or Path(path).stem, probs.argmax(0) == 1))
    plt, (fig, axes) = _figure(len(shown), 3, figsize=(9, 3.4 * len(shown)), squeeze=False)
    for row, (label, membrane) in zip(axes, shown):
        errors = np.zeros((*truth.shape, 3), np.float32) + 1
        errors[truth & ~membrane] = (0.12, 0.47, 0.71)  # missed
        errors[membrane & ~truth] = (0.84, 0.15, 0.16)  # drawn where there is none
        iou = (truth & membrane).sum() / (truth | membrane).sum()
        for ax, picture, title in zip(row, (page, membrane, errors), (f"{label}: ISBI slice {args.slice}",
                                      f"membrane drawn (slice IoU {iou:.3f})",
                                      "missed (blue), drawn where none (red)")):
            ax.imshow(picture[window], cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    print(save_png(plt, fig, Path(args.plot)))
    return 0


def table(rows: list[dict]) -> str:
    out = ["| arm | settings | seed | steps | pixel error | mean IoU (no bg) | adapted Rand |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["arm"], r.get("settings", []), r["seed"])):
        m = r["metrics"]
        arm = r["arm"] + (f" ({r['objective']})" if r.get("objective") else "")
        out.append(f"| {arm}{' (scribbles)' if r.get('sparse') else ''} | {' '.join(r.get('settings', []))} | "
                   f"{r['seed']} | {r['steps']} | "
                   f"{m.get('pixel_error', float('nan')):.4f} | {m.get('mean_iou', float('nan')):.4f} | "
                   f"{m.get('adapted_rand_error', float('nan')):.4f} |")
    return "\n".join(out)


def main() -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("data", metavar="set", choices=SETS)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--objective", default="restoration", choices=["restoration", "masked", "contrastive"],
                   help="the self-supervised objective (results in SET_MINUTESmin_OBJECTIVE/ unless restoration)")
    p.add_argument("--batch-size", type=int, help="crops a step (default: PretrainConfig's, 8; the folder's name "
                   "ends in _bN when given)")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("finetune")
    p.add_argument("data", metavar="set", choices=SETS)
    p.add_argument("--minutes", type=float, default=6.0, help="training time of each arm (without --steps)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of each arm instead of a time limit "
                   "(the same budget whatever else runs on the machine)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=["random", "pretrained", "full"],
                   choices=["random", "pretrained", "full", "selftrain"])
    p.add_argument("--full-seeds", action="store_true", help="run the full arm with every seed (default: seed 0)")
    p.add_argument("--sparse", action="store_true")
    p.add_argument("--confidence", type=float, default=0.9,
                   help="selftrain: pixels whose top probability is below this stay unannotated")
    p.add_argument("--balanced", action="store_true",
                   help="selftrain: the same share of every class's pixels labelled (class-balanced)")
    p.add_argument("--teacher-share", type=float, default=0.5, help="selftrain: the teacher's share of the steps")
    p.add_argument("--pretrained", help="the pretrained model (default: runs/bench/pretrain/SET_20min)")
    p.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig field of every arm (e.g. lr=3e-4, freeze_encoder=true); rows keep them")
    p.add_argument("--tag", help="results in finetune_SET_TAG.json (runs that go side by side need their own file)")
    p.add_argument("--fresh", action="store_true", help="ignore earlier rows of the results file")
    p.add_argument("--keep-models", action="store_true", help="save each arm's model in runs/bench/pretrain/models/")
    p.set_defaults(func=cmd_finetune)
    for q in sub.choices.values():
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--device", default="cpu", help="cpu (the default: the CPU tables), auto, cuda")
    p = sub.add_parser("scaling", help="fine-tuned IoU against pretraining length: a table (and --plot PNG)")
    p.add_argument("data", metavar="set", choices=SETS)
    p.add_argument("--series", nargs="+", action="append", required=True, metavar="LABEL MINUTES=TAG",
                   help="a label, then the fine-tuning results of each pretraining length, 0 for random weights "
                        "(e.g. --series 'whole U-Net' 0=random 20=masked 40=masked40); repeat for another line")
    p.add_argument("--ceiling", metavar="TAG", help="the results of all training slices (the gap's top)")
    p.add_argument("--plot", metavar="PNG")
    p.set_defaults(func=cmd_scaling)
    p = sub.add_parser("arms", help="fine-tuned IoU of arms side by side, a panel a data set: a table (and --plot PNG)")
    p.add_argument("--panel", nargs="+", action="append", required=True, metavar="SET LABEL=TAG",
                   help="a data set, then its arms' fine-tuning results, the reference first (e.g. --panel mito "
                        "'random weights=random_amd' contrastive=contrastive); repeat for another panel")
    p.add_argument("--plot", metavar="PNG")
    p.set_defaults(func=cmd_arms)
    p = sub.add_parser("errors", help="where membrane models are wrong on a held-out ISBI slice (a picture)")
    p.add_argument("models", nargs="+", metavar="LABEL=MODEL", help="model files, each with a label")
    p.add_argument("--plot", required=True, metavar="PNG")
    p.add_argument("--slice", type=int, default=24, choices=range(24, 30))
    p.add_argument("--top", type=int, default=128)
    p.add_argument("--left", type=int, default=128)
    p.add_argument("--size", type=int, default=256)
    p.set_defaults(func=cmd_errors, threads=2)
    args = parser.parse_args()
    if args.func in (cmd_scaling, cmd_arms):  # read earlier results only: no data, no torch
        return args.func(args)
    import torch
    torch.set_num_threads(args.threads)
    if not DATA.exists():
        print(f"skipped: {DATA} not found (the shared data)")
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
