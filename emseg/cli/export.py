"""``emseg export``: a model as TorchScript, ONNX or a bioimage.io package (:mod:`emseg.model.export`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from emseg.errors import EmsegError
from emseg.model.export import FORMATS, INSTALL_HINT, export_model

log = logging.getLogger("emseg")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "export", help="export a model to TorchScript, ONNX or a bioimage.io package",
        description="Export a model so it runs without emseg. TorchScript (.pt) and ONNX (.onnx) take a normalised "
                    "(N, 1, H, W) float32 tensor, H and W multiples of 32, and return class probabilities; a "
                    "bioimage.io package (.zip, for ilastik, deepImageJ, bioimageio.core) takes raw images and "
                    f"normalises them itself. ONNX and bioimage.io need: {INSTALL_HINT}")
    p.add_argument("model", help="model file or folder ('default' for the bundled model)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="PATH", help="output file")
    p.add_argument("--logits", action="store_true", help="TorchScript/ONNX: output logits instead of probabilities")
    p.add_argument("--sample", type=Path, metavar="IMAGE",
                   help="bioimage.io: image whose centre becomes the test tensor and cover (default: synthetic EM)")
    p.add_argument("--author", action="append", default=[], metavar="NAME", help="bioimage.io: author (repeatable)")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``emseg export``; returns 0 on success, 1 on an error explained in the log."""
    from emseg.io.write import check_output_file, remove_stale_partials
    from emseg.model.modelfile import default_model_path
    model_path = default_model_path() if args.model == "default" else Path(args.model)
    options: dict = {}
    try:
        check_output_file(args.output, "-o", inputs=[model_path] + ([args.sample] if args.sample else []))
        remove_stale_partials(Path(args.output).parent)
        if args.format == "bioimageio":
            if args.logits:
                log.warning("--logits is ignored for bioimage.io (its weights give logits, "
                            "its postprocessing a softmax)")
            options["authors"] = args.author
            if args.sample is not None:
                from emseg.io.read import open_image
                with open_image(args.sample) as src:
                    options["sample"] = src.page(len(src) // 2)
        else:
            options["probabilities"] = not args.logits
        out = export_model(model_path, args.format, args.output, **options)
    except EmsegError as exc:
        log.error("%s", exc)
        return 1
    log.info("exported %s -> %s (%s)", model_path, out, args.format)
    return 0
