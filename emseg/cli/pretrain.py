"""``emseg pretrain``: learn from unlabelled images (:mod:`emseg.train.pretrain`), for ``train --init``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
from pathlib import Path

from emseg.cli.common import device, number, pixel_size
from emseg.cli.train import _encoder, _option_type, _prepare_run_folder

log = logging.getLogger("emseg")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "pretrain", help="pretrain a U-Net on your own unlabelled images (for train --init)",
        description="Self-supervised pretraining: the U-Net learns to restore corrupted crops of your raw, "
                    "unlabelled images (intensity curves, shuffled pixels, painted-over boxes, noise), as a start "
                    "for a model trained on few annotated images (`emseg train --init OUTDIR/model.safetensors`). "
                    "An option to try, not a recommended step: on two EPFL slices the contrastive objective gained "
                    "about 0.1 mitochondrion IoU (restoration and masked patches nothing); on two annotated ISBI "
                    "slices the best start tried (masked patches and contrastive terms at once) gained 0.007 "
                    "IoU over random weights (five seeds); on NASA none helped; pretraining longer than the "
                    "default did worse (docs/training.md, \"Pretraining\"). Writes OUTDIR/model.safetensors (a "
                    "pretrained model: no classes, it cannot segment by itself), curves.png, restorations.png "
                    "(inputs and restorations; features.png, the encoder's features as colours, for the "
                    "contrastive objective), log.json and a resumable checkpoint.")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="unlabelled images: stacks, folders or files in any format emseg reads")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="run folder")
    p.add_argument("--encoder", type=_encoder, help="encoder from `emseg models` (default vgg11_bn_slim)")
    p.add_argument("--objective", choices=["restoration", "masked", "contrastive"],
                   help="restoration (default): undo intensity curves, shuffled pixels, painted-over boxes and noise; "
                        "masked: fill in 60%% of 16-pixel patches hidden under the mean grey, scored on them alone; "
                        "contrastive: the encoder alone learns to give two differently corrupted, turned views of "
                        "the same place the same features (dense VICReg; writes features.png)")
    p.add_argument("--time-limit", type=_option_type("time_limit_minutes"), dest="time_limit_minutes", metavar="MIN",
                   help="minutes to pretrain (default 20; as many steps as fit). The best length measured was 20 "
                        "CPU-minutes, about 4000 steps: on a GPU, --steps 4000 repeats it")
    p.add_argument("--steps", type=_option_type("steps"), help="optimiser steps (with --time-limit: at most this many)")
    p.add_argument("--tile-size", type=_option_type("tile_size"), help="crop side in pixels, multiple of 32 (default 128)")
    p.add_argument("--batch-size", type=_option_type("batch_size"), help="crops per step (default 8)")
    p.add_argument("--lr", type=_option_type("lr"), help="peak learning rate of AdamW (default 0.001)")
    p.add_argument("--val-every", type=_option_type("val_every"),
                   help="measure the restoration of fixed crops and checkpoint every N steps (default 100)")
    p.add_argument("--pixel-size", type=pixel_size, default=None, metavar="NM",
                   help="pixel size of the images in nm/px, overriding the files' own; images of other pixel "
                        "sizes are rescaled to the first one's")
    p.add_argument("--max-megapixels", type=number(0.0, above=True), default=None, metavar="MP",
                   help="hold at most this many megapixels of pages (taken evenly from the inputs; default 67)")
    p.add_argument("--seed", type=_option_type("seed"), help="random seed (default 0)")
    p.add_argument("--device", type=device, help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--name", help="model name written into the model card")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUTDIR/checkpoint (without it, a folder that holds a "
                        "checkpoint is refused)")
    p.set_defaults(func=cmd_pretrain)
    return p


def pretrain_config(args):
    """The PretrainConfig of the flags (defaults where a flag is not given)."""
    from emseg.train.pretrain import PretrainConfig
    values = {name: getattr(args, name) for name in ("encoder", "objective", "time_limit_minutes", "steps", "tile_size",
                                                     "batch_size", "lr", "val_every", "seed", "device", "name")
              if getattr(args, name, None) is not None}
    if args.steps is not None and args.time_limit_minutes is None:
        values["time_limit_minutes"] = None  # --steps alone: exactly that many
    if args.max_megapixels is not None:
        values["max_pixels"] = int(args.max_megapixels * 1e6)
    return PretrainConfig(**values)


def cmd_pretrain(args) -> int:
    from emseg.cli.train import _progress_bar
    from emseg.train.pretrain import load_unlabelled, pretrain

    config = pretrain_config(args)
    _prepare_run_folder(args.output, args.resume)
    pages = load_unlabelled(args.images, tile=config.crop_size, pixel_size_nm=args.pixel_size,
                            max_pixels=config.max_pixels)
    config = dataclasses.replace(config, pixel_size_nm=pages[0].pixel_size_nm)  # load_unlabelled's common size
    planned = (f"as many steps as fit in {config.time_limit_minutes:g} min" if config.fills_time
               else f"{config.steps} steps")
    log.info("pretraining %s on %d unlabelled page(s) (%.1f megapixels, %s); %s of %d crops of %d px",
             config.encoder, len(pages), sum(it.image.size for it in pages) / 1e6,
             f"{config.pixel_size_nm:g} nm/px" if config.pixel_size_nm else "pixel size unknown", planned,
             config.batch_size, config.tile_size)
    from emseg.train.loop import DEFAULT_STEPS
    bar, update = _progress_bar(DEFAULT_STEPS if config.fills_time else config.steps, args.quiet, desc="pretraining")
    try:
        result = pretrain(pages, config, args.output, progress=update, stop=threading.Event(), resume=args.resume)
    finally:
        bar.close()
    last = result.history[-1] if result.history else {}
    from emseg.train.pretrain import REFERENCE
    log.info("pretrained model written to %s (validation %s loss %s; %s: %s); train from it with: emseg train "
             "--init %s --images ... --masks ...", result.model_path, config.objective,
             f"{last['val_loss']:.4f}" if last else "-", REFERENCE[config.objective],
             f"{last['copy_loss']:.4f}" if last else "-", result.model_path)
    return 0
