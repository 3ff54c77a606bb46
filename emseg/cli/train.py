"""The training-side commands: ``train``, ``finetune``, ``evaluate`` and ``augment-preview``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from emseg.cli.common import device, integer, number, pixel_size
from emseg.errors import InputError
from emseg.model.card import DECODER_UPSAMPLING, MAX_TILE, TILE_MULTIPLE, check_classes
from emseg.train import FINETUNE_DEFAULTS

if TYPE_CHECKING:
    from emseg.train.loop import TrainConfig

log = logging.getLogger("emseg")


# ---------------------------------------------------------------- parsers

def _flag(value: bool | None):
    """YAML: true or false."""
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value


def _text(value):
    if not isinstance(value, str) or not value.strip():
        raise argparse.ArgumentTypeError(f"expected text, got {value!r}")
    return value


def _encoder(text: str) -> str:
    from emseg.model.networks import encoder_names
    if text not in encoder_names():
        raise argparse.ArgumentTypeError(f"unknown encoder {text!r}; choose one of {', '.join(encoder_names())} "
                                         "(`emseg models` lists them)")
    return text


def _choice(*choices: str):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text
    return parse


def _classes(value) -> tuple[str, ...]:
    """--classes a,b,c or a YAML list of names: at least two distinct names, background first."""
    names = [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value
    try:
        return check_classes(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _base_share(value):
    """auto, or a share of the base's weights from 0 to 0.99."""
    return value if value == "auto" else number(0.0, 0.99)(value)


#: every training option (YAML key, and the flag of the same name): its parser, which takes the flag's
#: text or the YAML value (as text, unless it is one of _YAML_VALUES) and raises
#: argparse.ArgumentTypeError saying what is expected
OPTIONS = {
    "encoder": _encoder,
    "full_resolution_skip": _flag,
    "decoder_upsampling": _choice(*DECODER_UPSAMPLING),
    "classes": _classes,
    "sparse": _flag,
    "tile_size": integer(TILE_MULTIPLE, TILE_MULTIPLE, MAX_TILE),
    "batch_size": integer(1),
    "steps": integer(1),
    "val_every": integer(1),
    "lr": number(0.0, above=True),
    "weight_decay": number(0.0),
    "warmup": number(0.0, 0.99),
    "patience": integer(1),
    "val_fraction": number(0.0, 0.9),
    "dice_weight": number(0.0),
    "border_weight": number(0.0),
    "border_sigma": number(0.0, above=True),
    "label_offset": _flag,
    "ema_decay": number(0.0, 0.9999),
    "seed": integer(0),
    "device": device,
    "loader_workers": integer(0, high=64),
    "freeze_encoder": _flag,
    "freeze_encoder_steps": integer(0),
    "fresh_decoder": _flag,
    "encoder_lr_scale": number(0.0),
    "encoder_keep": number(0.0, 1.0, above=True),
    "encoder_keep_levels": integer(0, high=8),
    "freeze_bn": _flag,
    "base_share": _base_share,
    "head": _choice("auto", "keep", "fresh"),
    "pixel_size_nm": pixel_size,
    "time_limit_minutes": number(0.0, above=True),
    "augment_on": _choice("auto", "cpu", "device"),
    "name": _text,
    "augment_preset": _choice("em", "light", "none"),
}
_YAML_VALUES = (_flag, _text, _classes)


def _option_type(key: str):
    """The argparse type of a training option (see OPTIONS)."""
    return OPTIONS[key]


def _yaml_value(path: Path, key: str, value):
    """A YAML config value checked like its flag; InputError naming the file and the key."""
    parse = OPTIONS[key]
    if value is None and key in ("freeze_bn", "pixel_size_nm", "time_limit_minutes", "classes"):
        return None
    try:
        if parse in _YAML_VALUES:
            return parse(value)
        if isinstance(value, (bool, list, dict)) or value is None:
            raise argparse.ArgumentTypeError(f"expected a single value, got {value!r}")
        return parse(str(value))
    except argparse.ArgumentTypeError as exc:
        raise InputError(f"{path}: {key}: {exc}") from None


def _add_data(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("annotated data")
    g.add_argument("--images", nargs="+", required=required, metavar="PATH",
                   help="a TIFF stack, a folder, or image files (any format emseg reads)")
    g.add_argument("--masks", nargs="+", required=required, metavar="PATH",
                   help="matching masks: a stack (pages paired), a folder (matched by name, _mask suffix allowed), "
                        "or files in the same order")
    g.add_argument("--sparse", action="store_true",
                   help="masks are scribbles: 0 = not annotated, 1..N = classes (as painted in napari)")
    g.add_argument("--pixel-size", type=pixel_size, default=None, metavar="NM",
                   help="pixel size of the images in nm/px, overriding the files' own")


def _add_unlabelled(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unlabelled data (self-training)")
    g.add_argument("--unlabelled", nargs="+", metavar="PATH",
                   help="raw images without masks (stacks, folders, any format emseg reads): the model trains on the "
                        "annotated images for half the run, labels these itself where it is sure, and trains on both "
                        "for the other half. On 2 ISBI slices +0.023 membrane IoU (about half of the gap to 24 "
                        "slices) but a worse Rand error; -0.048 on 2 EPFL slices (mitochondria); level on NASA "
                        "(docs/training.md, \"Tenth attempt\")")
    g.add_argument("--confidence", type=number(0.0, 0.999), default=None, metavar="P",
                   help="with --unlabelled: label a pixel only where the model gives its class at least this "
                        "probability (default 0.9)")


def _add_planes(p: argparse.ArgumentParser) -> None:
    from emseg.io.read import voxel_size_arg
    g = p.add_argument_group("volume annotations")
    g.add_argument("--planes", choices=("xy", "ortho"), default="xy",
                   help="xy: train on the pages (default); ortho: each image/mask pair is a labelled volume (or a "
                        "volume with a few annotated slices in any direction) and the crops come from its xy, xz "
                        "and yz planes, so the model learns what xz/yz slices look like (for --planes ortho "
                        "prediction)")
    g.add_argument("--voxel-size", type=voxel_size_arg, default=None, metavar="Z,Y,X",
                   help="voxel size in nm, overriding the files' page spacing and pixel size")


def _add_training(p: argparse.ArgumentParser, *, steps: int, lr: str) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--config", type=Path, metavar="YAML",
                   help="YAML file with any of these options (and an 'augment:' mapping); flags override it")
    g.add_argument("--classes", type=_classes,
                   help="comma-separated class names, background first (default: from the masks)")
    g.add_argument("--tile-size", type=_option_type("tile_size"),
                   help="training crop side in pixels, multiple of 32 (default 256)")
    g.add_argument("--batch-size", type=_option_type("batch_size"), help="crops per step (default 8)")
    g.add_argument("--steps", type=_option_type("steps"),
                   help=f"optimiser steps (default {steps}; with --time-limit: as many as fit)")
    g.add_argument("--time-limit", type=_option_type("time_limit_minutes"), dest="time_limit_minutes", metavar="MIN",
                   help="fit the run (and its learning-rate schedule) into this many minutes: without --steps "
                        "it makes as many steps as fit (thousands on a GPU), with --steps at most that many")
    g.add_argument("--val-every", type=_option_type("val_every"), help="validate and checkpoint every N steps (default 100)")
    g.add_argument("--lr", type=_option_type("lr"), help=f"peak learning rate of AdamW (default {lr})")
    g.add_argument("--patience", type=_option_type("patience"),
                   help="stop after N validations without improvement (default 10)")
    g.add_argument("--border-weight", type=_option_type("border_weight"), metavar="W0",
                   help="weight thin boundaries between regions in the loss, as in the U-Net paper "
                        "(needs dense masks and a class named 'membrane' or 'boundary'; 0 = off)")
    offset = g.add_mutually_exclusive_group()
    offset.add_argument("--follow-label-offset", dest="label_offset", action="store_const", const=True,
                        help="measure a sub-pixel offset of the annotation against the images and follow it: "
                             "from a quarter into the run the training images are moved onto their annotation, "
                             "and the model's predictions reproduce the annotators' bias (off by default: "
                             "models predict what the image shows)")
    offset.add_argument("--no-label-offset", dest="label_offset", action="store_const", const=False,
                        help=argparse.SUPPRESS)  # the default since December 2026; kept for older scripts
    g.add_argument("--head", type=_option_type("head"),
                   help="starting from a model (finetune, --init): its output head is kept (keep: unless the number "
                        "of classes changes), made afresh (fresh), or made afresh when the class names or their "
                        "number change (auto, the default)")
    g.add_argument("--ema-decay", type=_option_type("ema_decay"), metavar="D",
                   help="validate and keep a moving average of the weights, whose decay grows to at most D "
                        "(default 0.999; 0 = keep the trained weights themselves)")
    g.add_argument("--dice-weight", type=_option_type("dice_weight"), metavar="W",
                   help="add W x the Dice loss to the cross-entropy (default 1; 0 = cross-entropy alone, which "
                        "scored better on EPFL's 22 training slices and far worse on 2 of them, docs/training.md)")
    g.add_argument("--val-fraction", type=_option_type("val_fraction"),
                   help="hold out this fraction of every page (its right-hand strip) for validation (default 0.2)")
    g.add_argument("--val-images", nargs="+", metavar="PATH", help="held-out validation images instead")
    g.add_argument("--val-masks", nargs="+", metavar="PATH", help="their masks")
    g.add_argument("--seed", type=_option_type("seed"), help="random seed (default 0)")
    g.add_argument("--device", type=device, help="auto, cpu, cuda, mps (default auto)")
    g.add_argument("--augment-on", type=_option_type("augment_on"),
                   help="where training batches are cut and augmented: cpu (albumentations, in threads) or the "
                        "training device (batched torch operations); auto (default): the device on a GPU, else "
                        "the CPU")
    g.add_argument("--loader-workers", type=_option_type("loader_workers"), metavar="N",
                   help="threads making augmented batches on the CPU (default 0: 1 on the CPU, up to 8 on a GPU)")
    g.add_argument("--name", help="model name written into the model card")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUTDIR/checkpoint (without it, a folder that holds a "
                        "checkpoint is refused)")
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
    p.add_argument("--encoder", type=_encoder, help="encoder from `emseg models` (default vgg11_bn_slim)")
    p.add_argument("--no-full-resolution-skip", dest="full_resolution_skip", action="store_const", const=False,
                   help="build segmentation-models-pytorch's own U-Net decoder, whose last block sees only "
                        "half-resolution features (by default it also takes the encoder's full-resolution "
                        "features, as in the U-Net paper)")
    p.add_argument("--decoder-upsampling", choices=DECODER_UPSAMPLING,
                   help="how the decoder doubles the size of its features at each step (default nearest, "
                        "segmentation-models-pytorch's own; bilinear was the default of November 2026)")
    p.add_argument("--init", metavar="MODEL",
                   help="start from this model instead of random weights: a model from `emseg pretrain` (its "
                        "encoder and decoder, a fresh head for your classes) or any emseg model; its encoder and "
                        "normalisation are kept, and its pixel size unless it was trained for other classes; the "
                        "training defaults are train's")
    _add_unlabelled(p)
    _add_training(p, steps=2000, lr="1e-3")
    p.set_defaults(func=cmd_train, finetune=False)

    p = sub.add_parser("finetune", help="fine-tune an existing model on your own annotations",
                       description="Start from BASE_MODEL (never modified) and train on your annotations; writes a new "
                                   "model in OUTDIR. For the base's own classes its pixel size and output head are "
                                   "kept and the result is blended with it (--base-share); for other classes only "
                                   "its encoder is kept and the pages keep their own pixel size; from a model of "
                                   "`emseg pretrain`, its encoder and decoder at its pixel size. The base's "
                                   "normalisation is kept in every case.")
    p.add_argument("base", help="model file or folder to start from ('default' for the bundled model)")
    _add_data(p)
    _add_planes(p)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="run folder")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and head")
    p.add_argument("--freeze-bn", choices=["auto", "yes", "no"], default="auto",
                   help="keep batch-norm statistics fixed (auto: when the batch size is 2 or less)")
    p.add_argument("--base-share", type=_option_type("base_share"), metavar="S",
                   help="average the fine-tuned weights with the base model's, S of them the base's (WiSE-FT), when "
                        "the base's classes are kept; auto (the default): the share of 0, 0.25, 0.5 and 0.75 that "
                        "scores best on the validation pages, or 0 where the base alone scores far below the "
                        "fine-tuned weights there; 0: the fine-tuned weights alone")
    _add_unlabelled(p)
    _add_training(p, steps=FINETUNE_DEFAULTS["steps"],
                  lr=f"{FINETUNE_DEFAULTS['lr']:g} for the base's own classes, {FINETUNE_DEFAULTS['new_task_lr']:g} "
                     "for other classes (also trained at the pages' own pixel size) and from a pretrained model")
    p.set_defaults(func=cmd_train, finetune=True)

    p = sub.add_parser("evaluate", help="measure a model on annotated images (IoU, Dice, pixel and Rand error)")
    p.add_argument("model", help="model file or folder ('default' for the bundled model)")
    _add_data(p)
    p.add_argument("-o", "--output", type=Path, metavar="OUTDIR", help="write metrics.json and metrics.csv here")
    p.add_argument("--tile", type=integer(TILE_MULTIPLE, TILE_MULTIPLE), help="tile side (default: the model card's)")
    p.add_argument("--overlap", type=integer(0), help="tile overlap (default: the model card's)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("augment-preview", help="write a PNG grid of augmented training crops",
                       description="Show what the model will be trained on: random crops with the augmentation "
                                   "applied and their masks overlaid.")
    _add_data(p)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="PNG", help="PNG file to write")
    p.add_argument("-n", type=integer(1, high=1024), default=8, help="number of samples (default 8)")
    p.add_argument("--tile-size", type=_option_type("tile_size"), default=256, help="crop side (default 256)")
    p.add_argument("--classes", type=_classes, help="comma-separated class names for the legend")
    p.add_argument("--seed", type=_option_type("seed"), default=0)
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
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        why = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise InputError(f"{path}: cannot read the YAML config{where} ({why}); write plain option: value "
                         "lines (no !!python tags)") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the YAML config must be a mapping of option: value")
    return data


def _augment_config(args, yaml_data: dict):
    from emseg.train.augment import PRESETS, AugmentConfig
    preset = args.augment_preset or (_yaml_value(args.config, "augment_preset", yaml_data["augment_preset"])
                                     if "augment_preset" in yaml_data else "em")
    base = PRESETS[preset].to_dict()
    augment = yaml_data.get("augment") or {}
    if not isinstance(augment, dict):
        raise InputError(f"{args.config}: augment: expected a mapping of PART: STRENGTH (e.g. elastic: 2), "
                         f"got {augment!r}")
    base.update(augment)
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


def train_config(args, base=None) -> "TrainConfig":
    """Merge defaults, the YAML config and the flags into a TrainConfig (``base``: the model finetune starts from,
    whose classes decide its default learning rate)."""
    from emseg.train.loop import TrainConfig
    yaml_data = _read_yaml(args.config)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(yaml_data) - known - {"augment_preset"})
    if unknown:
        raise InputError(f"{args.config}: unknown option(s) {unknown}; valid: {sorted(known)}")
    yaml_data = {k: (v if k == "augment" else _yaml_value(args.config, k, v)) for k, v in yaml_data.items()}
    values = {k: v for k, v in yaml_data.items() if k in known and k != "augment"}
    time_limited = args.time_limit_minutes is not None or yaml_data.get("time_limit_minutes") is not None
    if args.finetune:
        if not time_limited:  # a time limit alone makes as many steps as fit
            values.setdefault("steps", FINETUNE_DEFAULTS["steps"])
        if args.freeze_bn != "auto":
            values["freeze_bn"] = args.freeze_bn == "yes"
        values["freeze_encoder"] = args.freeze_encoder or values.get("freeze_encoder", False)
    for name in ("encoder", "tile_size", "batch_size", "steps", "val_every", "lr", "patience", "val_fraction",
                 "seed", "device", "loader_workers", "augment_on", "name", "time_limit_minutes", "border_weight",
                 "label_offset", "ema_decay", "dice_weight", "full_resolution_skip", "decoder_upsampling", "head",
                 "base_share"):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.classes:
        values["classes"] = args.classes
    if args.finetune:
        from emseg.train.loop import finetune_base_share, finetune_lr
        classes, head = values.get("classes") or (base.classes if base else ()), values.get("head", "auto")
        values.setdefault("lr", finetune_lr(base, classes, head))
        values.setdefault("base_share", finetune_base_share(base, classes, head))
    values["sparse"] = args.sparse or bool(values.get("sparse", False))
    values["pixel_size_nm"] = args.pixel_size or values.get("pixel_size_nm")
    values["augment"] = _augment_config(args, yaml_data)
    return TrainConfig(**values)


# ---------------------------------------------------------------- commands

def _progress_bar(total: int, quiet: bool, desc: str = "training"):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="step", desc=desc, disable=quiet, dynamic_ncols=True)
    state = {"metric": None}

    def update(event) -> None:
        if bar.total != event.total_steps:  # a time limit changed the run's length
            bar.total = event.total_steps
        bar.update(event.step - bar.n)
        if event.metrics is not None and event.metrics.get("mean_iou") is not None:
            state["metric"] = event.metrics["mean_iou"]
        postfix = f"loss {event.loss:.3f}"
        if state["metric"] is not None:
            postfix += f", val IoU {state['metric']:.3f}"
        bar.set_postfix_str(postfix, refresh=False)
    return bar, update


def _classes_from_masks(items, sparse: bool, masks) -> None:
    """Without --classes the classes are 0..the largest value in the masks: refuse masks where some of
    those values never occur (a stray value would make a model with many classes that have nothing to learn)."""
    import numpy as np

    from emseg.analysis.metrics import IGNORE
    present = set()
    for item in items:
        present.update(np.unique(item.target[item.target != IGNORE]).tolist())
    if not present:
        return
    top = max(present)
    missing = sorted(set(range(top + 1)) - present)
    if not missing:
        return
    shift = 1 if sparse else 0
    shown = ", ".join(str(v + shift) for v in missing[:5]) + (f" ... ({len(missing)} values)" if len(missing) > 5 else "")
    raise InputError(f"{', '.join(str(m) for m in masks)}: the masks hold values up to {top + shift} but never "
                     f"{shown}, so the classes cannot be read from them ({top + 1} classes, {len(missing)} with "
                     "nothing to learn); name the classes with --classes (background first), or correct the stray "
                     "values in the masks")


def _prepare_run_folder(out: Path, resume: bool) -> None:
    """Before any work: the run folder can be written, holds no other run's checkpoint (unless resuming),
    and loses the temporary files of killed runs."""
    from emseg.cli.common import prepare_output_folder
    from emseg.train.checkpoint import check_run_folder
    prepare_output_folder(out)
    check_run_folder(out, resume)
    if (out / "checkpoint").is_dir():
        from emseg.io.write import remove_stale_partials
        remove_stale_partials(out / "checkpoint")


def cmd_train(args) -> int:
    from emseg.model.card import Normalization
    from emseg.model.modelfile import load_model
    from emseg.train.checkpoint import checkpoint_classes
    from emseg.train.data import load_pairs, pair_inputs
    from emseg.train.loop import DEFAULT_STEPS, is_new_task, train

    base = None
    start = args.base if args.finetune else getattr(args, "init", None)
    if start:
        from emseg.cli.common import model_file
        base = load_model(model_file(start))
        if getattr(args, "encoder", None) and args.encoder != base.card.encoder:
            raise InputError(f"--encoder {args.encoder} differs from the encoder of {start} "
                             f"({base.card.encoder}); leave --encoder out to train from it")
    config = train_config(args, base)
    _prepare_run_folder(args.output, args.resume)
    norm = base.card.normalization if base else Normalization()
    # the base's pixel size, unless it is given other classes (a new task: the pages' own, as training anew)
    new_task = base is not None and is_new_task(base, config.classes or base.classes, config.head)
    keep_scale = bool(base is not None and base.card.pixel_size_nm and not new_task)
    target_nm = base.card.pixel_size_nm if keep_scale else config.pixel_size_nm
    num_classes = len(config.classes) if config.classes else (base.card.num_classes if base else None)
    ortho = getattr(args, "planes", "xy") == "ortho"
    val_items = None
    if ortho:  # pages from the xy, xz and yz planes of annotated volumes; x-strip held out (emseg.train.volume)
        from emseg.train.volume import load_volume_pairs
        items, val_items = load_volume_pairs(
            pair_inputs(args.images, args.masks), sparse=config.sparse, norm=norm, pixel_size_nm=args.pixel_size,
            voxel_size_nm=args.voxel_size, target_pixel_size_nm=target_nm, num_classes=num_classes,
            val_fraction=config.val_fraction)  # [] when the held-out strip has no annotation: no leak, a warning
    else:
        items = load_pairs(pair_inputs(args.images, args.masks), sparse=config.sparse, norm=norm,
                           pixel_size_nm=args.pixel_size, target_pixel_size_nm=target_nm, num_classes=num_classes)
    if num_classes is None and not (args.resume and checkpoint_classes(args.output / "checkpoint")):
        _classes_from_masks(items, config.sparse, args.masks)
    if target_nm is None:
        sizes = {it.pixel_size_nm for it in items}
        if len(sizes) == 1 and None not in sizes:
            config = dataclasses.replace(config, pixel_size_nm=sizes.pop())
    elif not keep_scale:
        config = dataclasses.replace(config, pixel_size_nm=target_nm)
    if args.val_images or args.val_masks:
        if not (args.val_images and args.val_masks):
            raise InputError("give both --val-images and --val-masks, or neither (then --val-fraction is used)")
        if ortho:
            from emseg.train.volume import load_volume_pairs
            val_items = load_volume_pairs(
                pair_inputs(args.val_images, args.val_masks), sparse=config.sparse, norm=norm,
                pixel_size_nm=args.pixel_size, voxel_size_nm=args.voxel_size,
                target_pixel_size_nm=target_nm or config.pixel_size_nm, num_classes=num_classes)[0]
        else:
            val_items = load_pairs(pair_inputs(args.val_images, args.val_masks), sparse=config.sparse, norm=norm,
                                   pixel_size_nm=args.pixel_size,
                                   target_pixel_size_nm=target_nm or config.pixel_size_nm, num_classes=num_classes)
    planned = (f"as many steps as fit in {config.time_limit_minutes:g} min" if config.fills_time
               else f"{config.steps} steps")
    log.info("%s %s on %d page(s), %d annotated pixels; %s of %d crops of %d px",
             "fine-tuning" if base else "training", base.card.encoder if base else config.encoder, len(items),
             sum(it.annotated for it in items), planned, config.batch_size, config.tile_size)
    pages = _unlabelled_pages(args, ortho)
    bar, update = _progress_bar(DEFAULT_STEPS if config.fills_time else config.steps, args.quiet)
    try:
        if pages:
            from emseg.train.selftrain import CONFIDENCE, self_train
            result = self_train(items, pages, config, args.output, base=base, val_data=val_items,
                                confidence=CONFIDENCE if args.confidence is None else args.confidence,
                                progress=update, stop=threading.Event(), resume=args.resume)
        else:
            result = train(items, config, args.output, base=base, val_data=val_items, progress=update,
                           stop=threading.Event(), resume=args.resume)
    finally:
        bar.close()
    val = (result.model.card.training.get("validation") or {}).get("mean_iou")  # of the weights saved
    log.info("model written to %s (validation mean IoU %s); curves in %s", result.model_path,
             f"{val:.4f}" if val is not None else "-", args.output / "curves.png")
    return 0


def _unlabelled_pages(args, ortho: bool) -> list:
    """The raw pages of --unlabelled (self-training), or [] without it."""
    if not args.unlabelled:
        if args.confidence is not None:
            raise InputError("--confidence is for self-training; give the unlabelled images with --unlabelled")
        return []
    if ortho:
        raise InputError("--unlabelled takes pages (xy); leave out --planes ortho to self-train")
    from emseg.train.selftrain import load_raw_pages
    pages = load_raw_pages(args.unlabelled, pixel_size_nm=args.pixel_size)
    log.info("self-training: %d unlabelled page(s) from %s", len(pages), ", ".join(map(str, args.unlabelled)))
    return pages


def cmd_evaluate(args) -> int:
    from emseg.analysis.evaluate import evaluate, format_summary, write_results
    from emseg.cli.common import make_predictor, model_file, prepare_output_folder
    from emseg.model.modelfile import load_model
    from emseg.train.data import pair_inputs
    if args.output:
        prepare_output_folder(args.output)
    model = load_model(model_file(args.model))
    predictor = make_predictor(args, model)
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
    import numpy as np

    from emseg.analysis.metrics import IGNORE
    from emseg.io.write import check_output_file
    from emseg.model.card import Normalization
    from emseg.train.augment import augment_preview
    from emseg.train.data import load_pairs, pair_inputs
    check_output_file(args.output, "-o", inputs=[*args.images, *args.masks])
    config = _augment_config(args, _read_yaml(args.config))
    items = load_pairs(pair_inputs(args.images, args.masks), sparse=args.sparse, norm=Normalization(),
                       pixel_size_nm=args.pixel_size)
    masks = [np.where(it.target == IGNORE, 0, it.target + (1 if args.sparse else 0)).astype(np.uint8) for it in items]
    classes = args.classes
    path = augment_preview([it.image for it in items], masks, args.output, config=config, n=args.n,
                           crop=args.tile_size, seed=args.seed, class_names=classes)
    log.info("wrote %s", path)
    return 0
