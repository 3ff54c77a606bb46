"""``emseg measure``: objects and their sizes from masks (:mod:`emseg.analysis.measure`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from emseg.analysis.measure import measure_file, write_summary
from emseg.analysis.objects import mask_files, match_images
from emseg.cli.common import input_failure, integer, number, pixel_size, prepare_output_folder
from emseg.errors import EmsegError
from emseg.io.read import voxel_size_arg

log = logging.getLogger("emseg")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``measure`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "measure", help="count and measure objects in masks (sizes in nm)",
        description="Turn class masks into objects and measure them: NAME_objects.csv (one row per object), "
                    "summary.csv (per input and class), NAME_measure.png (size histogram, outlines) and "
                    "NAME_instances.tif (object labels). Sizes are in nm when the pixel size is known, else px.")
    p.add_argument("masks", nargs="+", metavar="MASKS", help="mask files, folders (NAME_mask.* files) or glob patterns")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="output folder")
    p.add_argument("--images", nargs="+", metavar="IMAGES",
                   help="matching images: one per mask in the same order, or a folder (NAME.* for NAME_mask.tif)")
    p.add_argument("--classes", metavar="A,B,C", help="class names from class 0 when the masks do not store them")
    p.add_argument("--pixel-size", type=pixel_size, metavar="NM", help="pixel size in nm/px, overriding the files'")
    p.add_argument("--voxel-size", type=voxel_size_arg, metavar="Z,Y,X",
                   help="voxel size in nm for --3d (volumes in nm³), overriding the files' (default: from the mask or image)")
    g = p.add_argument_group("objects")
    g.add_argument("--objects", metavar="A,B", help="only these classes (by name); default: every class but 0")
    g.add_argument("--split", action="store_true", help="split touching objects (distance transform + watershed)")
    g.add_argument("--split-depth", type=number(0.0, above=True), default=2.0, metavar="PX",
                   help="neck depth in px needed to split two objects (default 2; larger splits less)")
    g.add_argument("--min-size", type=integer(0), default=0, metavar="PX",
                   help="drop objects smaller than this many pixels")
    g.add_argument("--fill-holes", action="store_true", help="fill background holes inside objects")
    g.add_argument("--3d", dest="three_d", action="store_true",
                   help="connect objects across the slices of a stack and measure them in 3D (volume, surface area, "
                        "equivalent diameter, bounding box)")
    g.add_argument("--include-border", action="store_true",
                   help="count and size objects touching the image border too (default: excluded)")
    g = p.add_argument_group("outputs")
    g.add_argument("--no-plot", action="store_true", help="do not write NAME_measure.png")
    g.add_argument("--no-instances", action="store_true", help="do not write NAME_instances.tif")
    p.set_defaults(func=run_cli)
    return p


def _names(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def run_cli(args: argparse.Namespace) -> int:
    """Run ``emseg measure``; returns 0, or 1 when some inputs failed."""
    masks, errors = mask_files(args.masks)
    for error in errors:
        log.error("%s", error)
    if not masks:
        log.error("no masks to measure")
        return 1
    try:
        images = match_images(masks, args.images)
        prepare_output_folder(args.output)
    except EmsegError as exc:
        log.error("%s", exc)
        return 1
    options = dict(split=args.split, split_depth_px=args.split_depth, min_size_px=args.min_size,
                   fill_holes=args.fill_holes, three_d=args.three_d)
    names = [c.strip() for c in args.classes.split(",")] if args.classes else None
    tables, failed = [], len(errors)
    for mask, image in zip(masks, images):
        try:
            table = measure_file(mask, args.output, image_path=image, class_names=names, pixel_size_nm=args.pixel_size,
                                 instance_options=options, exclude_border=not args.include_border,
                                 plot=not args.no_plot, write_labels=not args.no_instances,
                                 object_classes=_names(args.objects), voxel_size_nm=args.voxel_size)
        except Exception as exc:  # noqa: BLE001 - one mask's failure must not stop the others
            failed += 1
            log.error("%s", input_failure(mask, exc), exc_info=getattr(args, "verbose", False))
            continue
        tables.append(table)
        log.info("%s: %d objects (%s)", mask, len(table), "nm" if table.pixel_size_nm else "px, no pixel size")
    if tables:
        write_summary(args.output / "summary.csv", tables, exclude_border=not args.include_border)
        log.info("summary of %d input(s) -> %s", len(tables), args.output / "summary.csv")
    return 1 if failed else 0
