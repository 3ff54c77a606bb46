"""The training-side commands: ``train``, ``finetune``, ``evaluate`` and ``augment-preview``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .card import DECODER_UPSAMPLING
from .errors import InputError

if TYPE_CHECKING:
    from .training import TrainConfig

log = logging.getLogger("emseg")


# ---------------------------------------------------------------- parsers

def _add_data(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("annotated data")
    g.add_argument("--images", nargs="+", required=required, metavar="PATH",
                   help="a TIFF stack, a folder, or image files (any format emseg reads)")
    g.add_argument("--masks", nargs="+", required=required, metavar="PATH",
                   help="matching masks: a stack (pages paired), a folder (matched by name, _mask suffix allowed), "
                        "or files in the same order")
    g.add_argument("--sparse", action="store_true",
                   help="masks are scribbles: 0 = not annotated, 1..N = classes (as painted in napari)")
    g.add_argument("--pixel-size", type=float, default=None, metavar="NM",
                   help="pixel size of the images in nm/px, overriding the files' own")


def _add_planes(p: argparse.ArgumentParser) -> None:
    from .io import voxel_size_arg
    g = p.add_argument_group("volume annotations")
    g.add_argument("--planes", choices=("xy", "ortho"), default="xy",
                   help="xy: train on the pages (default); ortho: each image/mask pair is a labelled volume (or a "
                        "volume with a few annotated slices in any direction) and the crops come from its xy, xz "
                        "and yz planes, so the model learns what xz/yz slices look like (for --planes ortho "
                        "prediction)")
    g.add_argument("--voxel-size", type=voxel_size_arg, default=None, metavar="Z,Y,X",
                   help="voxel size in nm, overriding the files' page spacing and pixel size")


def _add_training(p: argparse.ArgumentParser, *, steps: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--config", type=Path, metavar="YAML",
                   help="YAML file with any of these options (and an 'augment:' mapping); flags override it")
    g.add_argument("--classes", help="comma-separated class names, background first (default: from the masks)")
    g.add_argument("--tile-size", type=int, help="training crop side in pixels, multiple of 32 (default 256)")
    g.add_argument("--batch-size", type=int, help="crops per step (default 8)")
    g.add_argument("--steps", type=int, help=f"optimiser steps (default {steps})")
    g.add_argument("--time-limit", type=float, dest="time_limit_minutes", metavar="MIN",
                   help="fit the run (and its learning-rate schedule) into this many minutes; it never runs more than --steps")
    g.add_argument("--val-every", type=int, help="validate and checkpoint every N steps (default 100)")
    g.add_argument("--lr", type=float, help=f"peak learning rate of AdamW (default {lr:g})")
    g.add_argument("--patience", type=int, help="stop after N validations without improvement (default 10)")
    g.add_argument("--border-weight", type=float, metavar="W0",
                   help="weight thin boundaries between regions in the loss, as in the U-Net paper "
                        "(needs dense masks and a class named 'membrane' or 'boundary'; 0 = off)")
    g.add_argument("--no-label-offset", dest="label_offset", action="store_const", const=False,
                   help="do not measure and follow a sub-pixel offset of the annotation against the images "
                        "(by default, from a quarter into the run, the training images are moved onto their "
                        "annotation and the model file keeps the offset for prediction)")
    g.add_argument("--ema-decay", type=float, metavar="D",
                   help="validate and keep a moving average of the weights, whose decay grows to at most D "
                        "(default 0.999; 0 = keep the trained weights themselves)")
    g.add_argument("--val-fraction", type=float,
                   help="hold out this fraction of every page (its right-hand strip) for validation (default 0.2)")
    g.add_argument("--val-images", nargs="+", metavar="PATH", help="held-out validation images instead")
    g.add_argument("--val-masks", nargs="+", metavar="PATH", help="their masks")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", help="auto, cpu, cuda, mps (default auto)")
    g.add_argument("--loader-workers", type=int, metavar="N",
                   help="threads making augmented batches (default 0: 1 on the CPU, up to 8 on a GPU)")
    g.add_argument("--name", help="model name written into the model card")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from OUTDIR/checkpoint")
    a = p.add_argument_group("augmentation")
    a.add_argument("--augment-preset", choices=["em", "light", "none"], help="starting point (default em)")
    a.add_argument("--augment", action="append", default=[], metavar="PART=STRENGTH",
                   help="switch off (0) or strengthen a part, e.g. --augment elastic=2 --augment noise=0; "
                        "parts: flips (0/1), elastic, affine, intensity, noise, blur")


def add_parsers(sub) -> None:
    """Add the training-side subcommands to the ``emseg`` parser."""
    p = sub.add_parser("train", help="train a new model on annotated images",
                       description="Train a U-Net on a few annotated images (dense masks or scribbles). Writes "
                                   "OUTDIR/model.safetensors, log.json, curves.png, validation.png and a resumable "
                                   "checkpoint.")
    _add_data(p)
    _add_planes(p)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="run folder")
    p.add_argument("--encoder", help="encoder from `emseg models` (default vgg11_bn_slim)")
    p.add_argument("--no-full-resolution-skip", dest="full_resolution_skip", action="store_const", const=False,
                   help="build segmentation-models-pytorch's own U-Net decoder, whose last block sees only "
                        "half-resolution features (by default it also takes the encoder's full-resolution "
                        "features, as in the U-Net paper)")
    p.add_argument("--decoder-upsampling", choices=DECODER_UPSAMPLING,
                   help="how the decoder doubles the size of its features at each step (default bilinear; "
                        "nearest is segmentation-models-pytorch's own)")
    _add_training(p, steps=2000, lr=1e-3)
    p.set_defaults(func=cmd_train, finetune=False)

    p = sub.add_parser("finetune", help="fine-tune an existing model on your own annotations",
                       description="Start from BASE_MODEL (never modified), keep its normalisation and pixel size, "
                                   "and train on your annotations; writes a new model in OUTDIR.")
    p.add_argument("base", help="model file or folder to start from ('default' for the bundled model)")
    _add_data(p)
    _add_planes(p)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="run folder")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and head")
    p.add_argument("--freeze-bn", choices=["auto", "yes", "no"], default="auto",
                   help="keep batch-norm statistics fixed (auto: when the batch size is 2 or less)")
    _add_training(p, steps=500, lr=3e-4)
    p.set_defaults(func=cmd_train, finetune=True)

    p = sub.add_parser("evaluate", help="measure a model on annotated images (IoU, Dice, pixel and Rand error)")
    p.add_argument("model", help="model file or folder ('default' for the bundled model)")
    _add_data(p)
    p.add_argument("-o", "--output", type=Path, metavar="OUTDIR", help="write metrics.json and metrics.csv here")
    p.add_argument("--tile", type=int, help="tile side (default: the model card's)")
    p.add_argument("--overlap", type=int, help="tile overlap (default: the model card's)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("augment-preview", help="write a PNG grid of augmented training crops",
                       description="Show what the model will be trained on: random crops with the augmentation "
                                   "applied and their masks overlaid.")
    _add_data(p)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="PNG", help="PNG file to write")
    p.add_argument("-n", type=int, default=8, help="number of samples (default 8)")
    p.add_argument("--tile-size", type=int, default=256, help="crop side (default 256)")
    p.add_argument("--classes", help="comma-separated class names for the legend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, metavar="YAML", help="YAML file with an 'augment:' mapping")
    p.add_argument("--augment-preset", choices=["em", "light", "none"])
    p.add_argument("--augment", action="append", default=[], metavar="PART=STRENGTH")
    p.set_defaults(func=cmd_augment_preview)


# ---------------------------------------------------------------- configuration

def _read_yaml(path: Path | None) -> dict:
    if path is None:
        return {}
    import yaml
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the YAML config ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the YAML config must be a mapping of option: value")
    return data


def _augment_config(args, yaml_data: dict):
    from .augment import PRESETS, AugmentConfig
    preset = args.augment_preset or yaml_data.get("augment_preset", "em")
    base = PRESETS[preset].to_dict()
    base.update(yaml_data.get("augment") or {})
    for item in args.augment:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--augment {item!r}: write PART=STRENGTH, e.g. elastic=2 or noise=0")
        try:
            base[key.strip()] = float(value) if key.strip() != "flips" else bool(float(value))
        except ValueError:
            raise InputError(f"--augment {item!r}: {value!r} is not a number") from None
    try:
        return AugmentConfig.from_dict(base)
    except (TypeError, ValueError) as exc:
        raise InputError(f"augmentation settings: {exc}") from None


def train_config(args) -> "TrainConfig":
    """Merge defaults, the YAML config and the flags into a TrainConfig."""
    from .training import TrainConfig
    yaml_data = _read_yaml(args.config)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(yaml_data) - known - {"augment_preset"})
    if unknown:
        raise InputError(f"{args.config}: unknown option(s) {unknown}; valid: {sorted(known)}")
    values = {k: v for k, v in yaml_data.items() if k in known and k != "augment"}
    if args.finetune:
        values.setdefault("steps", 500)
        values.setdefault("lr", 3e-4)
        if args.freeze_bn != "auto":
            values["freeze_bn"] = args.freeze_bn == "yes"
        values["freeze_encoder"] = args.freeze_encoder or values.get("freeze_encoder", False)
    for name in ("encoder", "tile_size", "batch_size", "steps", "val_every", "lr", "patience", "val_fraction",
                 "seed", "device", "loader_workers", "name", "time_limit_minutes", "border_weight",
                 "label_offset", "ema_decay", "full_resolution_skip", "decoder_upsampling"):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.classes:
        values["classes"] = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    elif "classes" in values:
        values["classes"] = tuple(values["classes"])
    values["sparse"] = args.sparse or bool(values.get("sparse", False))
    values["pixel_size_nm"] = args.pixel_size or values.get("pixel_size_nm")
    values["augment"] = _augment_config(args, yaml_data)
    return TrainConfig(**values)


# ---------------------------------------------------------------- commands

def _progress_bar(total: int, quiet: bool):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="step", desc="training", disable=quiet, dynamic_ncols=True)
    state = {"metric": None}

    def update(event) -> None:
        if bar.total != event.total_steps:  # a time limit shortened the run
            bar.total = event.total_steps
        bar.update(event.step - bar.n)
        if event.metrics is not None and event.metrics.get("mean_iou") is not None:
            state["metric"] = event.metrics["mean_iou"]
        postfix = f"loss {event.loss:.3f}"
        if state["metric"] is not None:
            postfix += f", val IoU {state['metric']:.3f}"
        bar.set_postfix_str(postfix, refresh=False)
    return bar, update


def cmd_train(args) -> int:
    from .card import Normalization
    from .dataset import load_pairs, pair_inputs
    from .modelfile import load_model
    from .training import train

    config = train_config(args)
    base = None
    if args.finetune:
        from .cli import _model_path
        base = load_model(_model_path(args.base))
    norm = base.card.normalization if base else Normalization()
    target_nm = base.card.pixel_size_nm if base and base.card.pixel_size_nm else config.pixel_size_nm
    num_classes = len(config.classes) if config.classes else (base.card.num_classes if base else None)
    ortho = getattr(args, "planes", "xy") == "ortho"
    val_items = None
    if ortho:  # pages from the xy, xz and yz planes of annotated volumes; x-strip held out (emseg.volume_train)
        from .volume_train import load_volume_pairs
        items, val_items = load_volume_pairs(
            pair_inputs(args.images, args.masks), sparse=config.sparse, norm=norm, pixel_size_nm=args.pixel_size,
            voxel_size_nm=args.voxel_size, target_pixel_size_nm=target_nm, num_classes=num_classes,
            val_fraction=config.val_fraction)  # [] when the held-out strip has no annotation: no leak, a warning
    else:
        items = load_pairs(pair_inputs(args.images, args.masks), sparse=config.sparse, norm=norm,
                           pixel_size_nm=args.pixel_size, target_pixel_size_nm=target_nm, num_classes=num_classes)
    if target_nm is None:
        sizes = {it.pixel_size_nm for it in items}
        if len(sizes) == 1 and None not in sizes:
            config = dataclasses.replace(config, pixel_size_nm=sizes.pop())
    elif base is None:
        config = dataclasses.replace(config, pixel_size_nm=target_nm)
    if args.val_images or args.val_masks:
        if not (args.val_images and args.val_masks):
            raise InputError("give both --val-images and --val-masks, or neither (then --val-fraction is used)")
        if ortho:
            from .volume_train import load_volume_pairs
            val_items = load_volume_pairs(
                pair_inputs(args.val_images, args.val_masks), sparse=config.sparse, norm=norm,
                pixel_size_nm=args.pixel_size, voxel_size_nm=args.voxel_size,
                target_pixel_size_nm=target_nm or config.pixel_size_nm, num_classes=num_classes)[0]
        else:
            val_items = load_pairs(pair_inputs(args.val_images, args.val_masks), sparse=config.sparse, norm=norm,
                                   pixel_size_nm=args.pixel_size,
                                   target_pixel_size_nm=target_nm or config.pixel_size_nm, num_classes=num_classes)
    log.info("%s %s on %d page(s), %d annotated pixels; %d steps of %d crops of %d px",
             "fine-tuning" if base else "training", base.card.encoder if base else config.encoder, len(items),
             sum(it.annotated for it in items), config.steps, config.batch_size, config.tile_size)
    bar, update = _progress_bar(config.steps, args.quiet)
    try:
        result = train(items, config, args.output, base=base, val_data=val_items, progress=update,
                       stop=threading.Event(), resume=args.resume)
    finally:
        bar.close()
    log.info("model written to %s (best validation mean IoU %s); curves in %s", result.model_path,
             f"{result.best_metric:.4f}" if result.best_metric is not None else "-", args.output / "curves.png")
    return 0


def cmd_evaluate(args) -> int:
    from .cli import _model_path
    from .dataset import pair_inputs
    from .evaluate import evaluate, format_summary, write_results
    from .modelfile import load_model
    model = load_model(_model_path(args.model))
    predictor = model.predictor(tile=args.tile, overlap=args.overlap, tta=args.tta, device=args.device)
    pairs = pair_inputs(args.images, args.masks)
    from tqdm.auto import tqdm
    with tqdm(total=None, unit="page", desc="evaluating", disable=args.quiet) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        results = evaluate(predictor, pairs, sparse=args.sparse, pixel_size_nm=args.pixel_size, progress=progress)
    print(format_summary(results))
    if args.output:
        json_path, csv_path = write_results(results, args.output)
        log.info("wrote %s and %s", json_path, csv_path)
    return 0


def cmd_augment_preview(args) -> int:
    from .augment import augment_preview
    from .card import Normalization
    from .dataset import load_pairs, pair_inputs
    from .metrics import IGNORE
    import numpy as np
    config = _augment_config(args, _read_yaml(args.config))
    items = load_pairs(pair_inputs(args.images, args.masks), sparse=args.sparse, norm=Normalization(),
                       pixel_size_nm=args.pixel_size)
    masks = [np.where(it.target == IGNORE, 0, it.target + (1 if args.sparse else 0)).astype(np.uint8) for it in items]
    classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes else None
    path = augment_preview([it.image for it in items], masks, args.output, config=config, n=args.n,
                           crop=args.tile_size, seed=args.seed, class_names=classes)
    log.info("wrote %s", path)
    return 0
