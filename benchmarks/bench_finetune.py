"""Does fine-tuning pay on every pair of data sets? (issue #24 goals 3 and 4; ../shared/data only)

    python benchmarks/bench_finetune.py base isbi  [--seed 0] [--minutes 12]  # also: epfl, nasa, isbi-late
    python benchmarks/bench_finetune.py arm  PAIR ARM [--steps 200] [--seed 0] [--set KEY=VALUE] [--tag NAME]
    python benchmarks/bench_finetune.py table
    python benchmarks/bench_finetune.py compare TAG_A:TAG_B[=TITLE]... [--pairs PAIR...] [--plot PNG]

`base NAME` trains `emseg train`'s defaults with a time limit (``--minutes``, one compute thread) on a data set's
training slices and evaluates its held-out slices with the code of `emseg evaluate`: the runs of goal 4
(three data sets, two seeds) and the base models of the pairs. ``isbi-late`` is ISBI 12-23 only, the base of
the ``shift`` pair (its fine-tuning slices 0-1 must be unseen).

Pairs (base -> the 2 annotated slices it is fine-tuned on -> where it is evaluated):

* ``isbi-epfl``: ISBI (0-23, seed 0) -> EPFL slices 0 and 11 (mitochondria: another class, a fresh head) -> the
  last 5 EPFL slices
* ``epfl-isbi``: EPFL (seed 0) -> ISBI slices 0 and 1 (membranes) -> ISBI 24-29
* ``isbi-nasa``: ISBI (seed 0) -> NASA training images 0 and 1 (three classes) -> NASA val
* ``shift``: ISBI 12-23 -> ISBI slices 0-1 changed as another microscope would change them (`microscope_shift`:
  1.25x the pixels, a gamma of 1.6 and a contrast squeezed to 40-190 grey levels, Gaussian noise of sigma 8)
  -> ISBI 24-29 changed the same way; no pixel size given, as for a microscope whose calibration is unknown.
* ``shift-epfl``: the same change on EPFL: the EPFL base -> slices 0 and 11 shifted -> the last 5 shifted (the
  base was trained on those two slices unshifted: their appearance is new to it, their content is not).
* ``invert``, ``invert-epfl``: ``shift`` and ``shift-epfl`` with the grey levels then inverted (membranes and
  mitochondria bright, as in a backscattered-electron image): a base that is poor on the new pages.

Arms: ``zero`` (the base as it is), ``zero-adabn`` (the base with its batch-norm statistics recomputed on the 2
slices' images, no training), ``scratch`` / ``scratch-scribbles`` (the 2 slices from random weights,
`emseg train`'s defaults), ``dense`` / ``scribbles`` (`emseg finetune`'s defaults from the base; scribbles are
horizontal strokes, as bench_train_real.py draws them; for the base's own classes the result is blended with the
base as `finetune` does, ``base_share=auto``, and every share it chose from is scored on the test slices too).
Every training arm runs ``--steps`` steps; ``--set``
changes a TrainConfig field (the study of goal 3: lr, ema_decay, freeze_encoder, freeze_bn, ...).
Results: $EMSEG_BENCH_RUNS/finetune/PAIR/TAG.json; `table` prints the Markdown tables of docs/training.md.
`compare A:B` pairs the runs ``A_sSEED`` and ``B_sSEED`` of each pair by seed and prints their foreground IoU, the
mean difference A - B with a 95 % interval (Student's t over the seeds' differences) and how many seeds A led;
``--plot`` draws each comparison as a panel (e.g. ``compare s500_dense:s500_scratch fdec_scrib:am_scratchscrib``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import machine  # noqa: E402
from bench_scale import resample_image, resample_mask, resampled_shape  # noqa: E402
from bench_train_real import DATA, RUNS, evaluate_arrays, load, parse_settings, scribbles_from, train_on  # noqa: E402

OUT = RUNS / "finetune"
BASES = {"isbi": ("isbi", None), "epfl": ("epfl", None), "nasa": ("nasa", None), "isbi-late": ("isbi", slice(12, 24))}
PAIRS = {  # pair -> (base, target data set, the 2 fine-tuning slices)
    "isbi-epfl": ("isbi", "epfl", (0, 11)),
    "epfl-isbi": ("epfl", "isbi", (0, 1)),
    "isbi-nasa": ("isbi", "nasa", (0, 1)),
    "shift": ("isbi-late", "isbi", (0, 1)),
    "shift-epfl": ("epfl", "epfl", (0, 11)),
    "invert": ("isbi-late", "isbi", (0, 1)),
    "invert-epfl": ("epfl", "epfl", (0, 11)),
}
ARMS = ("zero", "zero-adabn", "scratch", "scratch-scribbles", "dense", "scribbles")


def reestimate_batchnorm(model, pages: np.ndarray, pixel_nm: float | None, tile: int = 256) -> None:
    """AdaBN: batch-norm statistics of ``model`` recomputed (a plain mean over batches) on tiles of ``pages``
    at the model's pixel size, the weights untouched. How much of a domain shift is in those statistics?"""
    import torch

    from emseg.infer.preprocess import normalize_page
    from emseg.train.data import Annotated, rescale_items
    items = [Annotated(normalize_page(p, model.card.normalization), np.zeros(p.shape, np.uint8), f"p{i}", pixel_nm)
             for i, p in enumerate(pages)]  # the network's input: the card's normalisation, mean/std step included
    items = rescale_items(items, model.card.pixel_size_nm) if pixel_nm else items
    tiles = [torch.from_numpy(np.ascontiguousarray(it.image[r:r + tile, c:c + tile]))
             for it in items for r in range(0, it.image.shape[0] - tile + 1, tile // 2)
             for c in range(0, it.image.shape[1] - tile + 1, tile // 2)]
    bns = [m for m in model.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.net.train()
    with torch.no_grad():
        for i in range(0, len(tiles), 8):
            model.net(torch.stack(tiles[i:i + 8])[:, None].float())
    model.net.eval()


def microscope_shift(images: np.ndarray, masks: np.ndarray, seed: int = 7,
                     invert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pages as another microscope might record them: 1.25x the pixels (images bilinear, masks as
    bench_scale.py resamples them), a gamma of 1.6, the grey levels squeezed into 40-190, noise of sigma 8;
    ``invert``: then the grey levels inverted, as a backscattered-electron image shows stained membranes bright."""
    rng = np.random.default_rng(seed)
    shape = resampled_shape(images.shape[1:], 1.25)
    imgs = np.stack([resample_image(p, shape) for p in images]).astype(np.float32) / 255.0
    imgs = 40 + 150 * imgs ** 1.6 + rng.normal(0, 8, imgs.shape)
    msks = np.stack([resample_mask(m, shape) for m in masks])
    imgs = np.clip(np.rint(imgs), 0, 255).astype(np.uint8)
    return 255 - imgs if invert else imgs, msks


def binary(masks: np.ndarray) -> np.ndarray:
    return masks if masks.max() <= 2 else (masks > 0).astype(np.uint8)


def target_data(pair: str):
    """(2 training slices, their masks, evaluation images, masks, classes, pixel size) of a pair."""
    _, name, picks = PAIRS[pair]
    img, msk, vimg, vmsk, classes, px = load(name)
    two, two_masks = img[list(picks)], msk[list(picks)]
    if name != "nasa":
        two_masks, vmsk = binary(two_masks), binary(vmsk)
    if pair.startswith(("shift", "invert")):
        invert = pair.startswith("invert")
        two, two_masks = microscope_shift(two, two_masks, invert=invert)
        vimg, vmsk = microscope_shift(vimg, vmsk, seed=8, invert=invert)
        two_masks, vmsk, px = binary(two_masks), binary(vmsk), None
    return two, two_masks, vimg, vmsk, classes, px


def scores(metrics: dict, classes) -> dict:
    ious = metrics["iou"]
    fg = list(ious.values())[1:]  # the foreground classes, whatever a base model calls them
    return {"iou_foreground": round(float(np.mean([v for v in fg if v is not None])), 4),
            "iou": {c: round(v, 4) if v is not None else None for c, v in zip(classes, ious.values())},
            "pixel_error": round(metrics["pixel_error"], 4)}


def cmd_base(args) -> dict:
    name, picks = BASES[args.name]
    img, msk, vimg, vmsk, classes, px = load(name)
    if picks is not None:
        img, msk = img[picks], msk[picks]
    settings = parse_settings(args.set)
    result, seconds = train_on(f"finetune/bases/{args.tag or args.name + '_s%d' % args.seed}", img, msk, classes, px,
                               args.minutes, seed=args.seed, **settings)
    with tempfile.TemporaryDirectory() as tmp:
        m = evaluate_arrays(result.model, vimg, vmsk, Path(tmp), px)
    return {"base": args.name, "tag": args.tag, "seed": args.seed, "minutes": args.minutes,
            "settings": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in settings.items()},
            "train_seconds": round(seconds),
            "steps": result.model.card.training["steps"], "slices": len(img), **scores(m, classes)}


def cmd_arm(args) -> dict:
    from emseg.model.modelfile import load_model
    base_name = PAIRS[args.pair][0]
    two, two_masks, vimg, vmsk, classes, px = target_data(args.pair)
    settings = parse_settings(args.set)
    tag = args.tag or f"{args.arm}_s{args.seed}"
    row = {"pair": args.pair, "arm": args.arm, "seed": args.seed, "tag": tag,
           "settings": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in settings.items()}}
    base = None
    if args.arm in ("zero", "zero-adabn", "dense", "scribbles"):
        path = OUT / "bases" / (args.base_tag or f"{base_name}_s0") / "model.safetensors"
        if not path.exists():
            raise SystemExit(f"run `bench_finetune.py base {base_name}` first ({path} is missing)")
        base = load_model(path)
        row["base"] = str(path)
        if args.native_scale and px:  # the base relabelled to the data's pixel size: the pages are not rescaled
            from emseg.model.modelfile import Model
            base = Model(base.net, base.card.updated(pixel_size_nm=px), base.path)
            row["native_scale"] = True
    if args.arm.startswith("zero"):
        if base.card.num_classes != len(classes):
            row["note"] = f"the base has {base.card.num_classes} classes, the data {len(classes)}: no zero-shot score"
            return row
        model = base
        if args.arm == "zero-adabn":
            reestimate_batchnorm(model, two, px)
    else:
        sparse = args.arm.endswith("scribbles")
        train_px = px
        if args.base_scale and px and base is not None and base.card.pixel_size_nm:  # as emseg did for any base
            train_px = base.card.pixel_size_nm
            shape = resampled_shape(two.shape[1:], px / train_px)
            two = np.stack([resample_image(p, shape) for p in two])
            two_masks = np.stack([resample_mask(m * 255, shape) // 255 for m in two_masks]).astype(np.uint8)
            row["base_scale"] = True
        masks = scribbles_from(two_masks) if sparse else two_masks
        defaults = {"steps": args.steps}
        if base is not None:  # `emseg finetune`'s defaults: by whether the classes change
            from emseg.train.loop import finetune_base_share, finetune_lr, is_new_task
            defaults["lr"] = finetune_lr(base, classes, settings.get("head", "auto"))
            # --wise scores averages of the plain fine-tuned weights: then none is made in the run
            defaults["base_share"] = 0.0 if args.wise else finetune_base_share(base, classes,
                                                                               settings.get("head", "auto"))
            row["new_task"] = is_new_task(base, classes, settings.get("head", "auto"))
        t0 = time.perf_counter()
        result, _ = train_on(f"finetune/{args.pair}/{tag}", two, masks, classes, train_px, None, base=base,
                             sparse=sparse, seed=args.seed, **{**defaults, **settings})
        model = result.model
        row.update(train_seconds=round(time.perf_counter() - t0), steps=model.card.training["steps"])
    with tempfile.TemporaryDirectory() as tmp:
        m = evaluate_arrays(model, vimg, vmsk, Path(tmp), px)
        row.update(scores(m, classes))
        for share in args.wise if base is not None and not args.arm.startswith("zero") else ():
            mixed = weights_averaged(base, model, share)
            if mixed is not None:
                row[f"wise_{share:g}"] = scores(evaluate_arrays(mixed, vimg, vmsk, Path(tmp), px), classes)
        chose = model.card.training.get("base_share") if base is not None and "steps" in row else None
        if chose and "validation_mean_iou" in chose:  # base_share=auto: what every share it chose from scores here
            row["base_share"] = chose
            tuned = weights_averaged(base, model, 1 / (1 - chose["chosen"]))  # the fine-tuned weights, unaveraged
            row["test_by_share"] = {}
            from emseg.train.loop import BASE_SHARES
            for share in BASE_SHARES:
                mixed = weights_averaged(base, tuned, 1 - share)
                row["test_by_share"][f"{share:g}"] = scores(evaluate_arrays(mixed, vimg, vmsk, Path(tmp), px),
                                                            classes)["iou_foreground"]
    return row


def weights_averaged(base, tuned, share: float):
    """WiSE-FT (Wortsman et al. 2022): ``share`` of the fine-tuned weights and ``1 - share`` of the base's, batch-norm
    statistics included; None where the two differ in shape (a fresh head for other classes)."""
    from emseg.model.modelfile import Model
    from emseg.train.loop import weights_with_base
    a, b = base.net.state_dict(), tuned.net.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return None
    net = copy.deepcopy(tuned.net)
    net.load_state_dict(weights_with_base(b, a, 1 - share))
    return Model(net, tuned.card, None)


def cmd_table(args) -> None:
    for pair in list(PAIRS) + ["bases"]:
        rows = [json.loads(p.read_text()) for p in sorted((OUT / pair).glob("*.json"))]
        if not rows:
            continue
        print(f"\n### {pair}\n")
        print("| run | seed | steps | foreground IoU | pixel error | notes |\n|---|---|---|---|---|---|")
        for r in rows:
            what = r.get("tag") or r.get("base")
            flags = [k for k in ("new_task", "base_scale", "native_scale") if r.get(k)]
            note = r.get("note", "") or ", ".join(flags + [f"{k}={v}" for k, v in r.get("settings", {}).items()])
            print(f"| {what} | {r['seed']} | {r.get('steps', '')} | {r.get('iou_foreground', '')} | "
                  f"{r.get('pixel_error', '')} | {note} |")


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """A against B over the seeds both have: each's IoU, the mean difference A - B and its 95 % interval
    (Student's t over the per-seed differences; none with one seed), and in how many seeds A led."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    from scipy import stats

    diff = np.array([a[s] - b[s] for s in seeds])
    half = (float(stats.t.ppf(0.975, len(seeds) - 1) * diff.std(ddof=1) / np.sqrt(len(seeds)))
            if len(seeds) > 1 else None)
    return {"seeds": seeds, "a": [a[s] for s in seeds], "b": [b[s] for s in seeds], "mean_a": float(np.mean(
        [a[s] for s in seeds])), "mean_b": float(np.mean([b[s] for s in seeds])), "diff": float(diff.mean()),
        "half_width": half, "led": int((diff > 0).sum())}


def _by_seed(pair: str, tag: str) -> dict[int, float]:
    """Each seed's foreground IoU of an arm; a run without one (a base's output of other classes, which records a
    note instead) is left out."""
    found = {}
    for path in (OUT / pair).glob(f"{tag}_s*.json"):
        row = json.loads(path.read_text())
        if row.get("tag") == path.stem and path.stem == f"{tag}_s{row['seed']}" and "iou_foreground" in row:
            found[row["seed"]] = row["iou_foreground"]
    return found


def cmd_compare(args) -> None:
    panels = []
    for spec in args.comparisons:
        spec, _, title = spec.partition("=")
        a, _, b = spec.partition(":")
        if not a or not b:
            raise SystemExit(f"compare: {spec!r} is not TAG_A:TAG_B (e.g. s500_dense:s500_scratch)")
        rows = {pair: c for pair in args.pairs if (c := paired(_by_seed(pair, a), _by_seed(pair, b)))}
        print(f"\n| pair | seeds | {a} | {b} | mean {a} | mean {b} | difference (95 % interval) | {a} ahead |\n"
              "|---|---|---|---|---|---|---|---|")
        for pair, c in rows.items():
            spread = "" if c["half_width"] is None else \
                f" ({c['diff'] - c['half_width']:+.3f} to {c['diff'] + c['half_width']:+.3f})"
            print(f"| {pair} | {', '.join(map(str, c['seeds']))} | {' / '.join(f'{x:.3f}' for x in c['a'])} | "
                  f"{' / '.join(f'{x:.3f}' for x in c['b'])} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | "
                  f"{c['diff']:+.3f}{spread} | {c['led']} of {len(c['seeds'])} |")
        panels.append((title or f"{a} - {b}", rows))
    if args.plot:
        print(f"\nwrote {plot_comparisons(panels, Path(args.plot))}")


def plot_comparisons(panels, path: Path) -> Path:
    """One panel a comparison: per pair, each seed's difference in IoU (dots) and their mean with its 95 % interval
    (an interval wider than the panel, as two seeds give, ends in an arrow at its edge). The panels share one scale,
    set by the largest difference of any seed, so that they can be compared at a glance."""
    from emseg.analysis.reports import _figure, save_png

    plt, (fig, axes) = _figure(1, len(panels), figsize=(5 * len(panels), 0.9 + 0.45 * max(
        len(rows) for _, rows in panels)), squeeze=False)
    lim = 1.35 * max([0.02] + [abs(d) for _, rows in panels for c in rows.values()
                               for d in np.subtract(c["a"], c["b"])])
    for ax, (title, rows) in zip(axes[0], panels):
        items = list(reversed(rows.items()))
        for y, (pair, c) in enumerate(items):
            diffs = np.subtract(c["a"], c["b"])
            ax.scatter(diffs, np.full(len(diffs), y), s=22, facecolors="none", edgecolors="0.4", zorder=2)
            colour = "tab:blue" if c["diff"] > 0 else "tab:red"
            half = c["half_width"] or 0.0
            low, high = max(c["diff"] - half, -lim), min(c["diff"] + half, lim)
            ax.plot([low, high], [y, y], color=colour, lw=1.6, zorder=3)
            ax.plot(c["diff"], y, "o", color=colour, ms=7, zorder=4)
            for end, edge, mark in ((c["diff"] - half, -lim, "<"), (c["diff"] + half, lim, ">")):
                if (end < edge) if mark == "<" else (end > edge):
                    ax.plot(edge, y, mark, color=colour, ms=6, zorder=4, clip_on=False)
        ax.axvline(0, color="0.2", lw=0.8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-0.6, len(items) - 0.4)
        seeds = [len(c["seeds"]) for _, c in items]
        ax.set_yticks(range(len(items)), [f"{p} ({n} seed{'s' * (n > 1)})" for (p, _), n in zip(items, seeds)])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("difference in foreground IoU (> 0: the first ahead)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_png(plt, fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("base")
    p.add_argument("name", choices=list(BASES))
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--tag", help="name of the run (default NAME_sSEED); give one with --set")
    p = sub.add_parser("arm")
    p.add_argument("pair", choices=list(PAIRS))
    p.add_argument("arm", choices=ARMS)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--tag")
    p.add_argument("--base-tag", help="the base run to start from (default BASE_s0; e.g. one made with --set and --tag)")
    p.add_argument("--base-scale", action="store_true",
                   help="fine-tune a new task at the base's pixel size (the pages resampled to it), as emseg did "
                        "before December 2026")
    p.add_argument("--wise", type=float, action="append", default=[],
                   help="also score the fine-tuned weights averaged with the base's (this share fine-tuned; WiSE-FT); "
                        "the run itself then blends nothing (base_share 0)")
    p.add_argument("--native-scale", action="store_true",
                   help="fine-tune at the data's pixel size (the base relabelled to it) instead of the base's")
    sub.add_parser("table")
    p = sub.add_parser("compare", help="arms paired by seed on every pair that has both")
    p.add_argument("comparisons", nargs="+", metavar="TAG_A:TAG_B[=TITLE]",
                   help="two arms' tags without their _sSEED (e.g. s500_dense:s500_scratch), and the plot's title")
    p.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    p.add_argument("--plot", help="also draw the comparisons, one panel each, into this PNG")
    args = parser.parse_args()
    if args.cmd in ("table", "compare"):
        (cmd_table if args.cmd == "table" else cmd_compare)(args)
        return 0
    if not DATA.exists():
        print(f"skipped: the shared data folder {DATA} is absent")
        return 0
    import torch
    torch.set_num_threads(1)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    row = cmd_base(args) if args.cmd == "base" else cmd_arm(args)
    row["machine"] = machine()
    text = json.dumps(row, indent=1)
    print(text)
    out = OUT / ("bases" if args.cmd == "base" else args.pair) / f"{row.get('tag') or args.name + '_s%d' % args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
