"""The ``emseg`` command: one parser built in one place, one function per subcommand.

Exit codes: 0 success; 1 some inputs failed (each reported on one line); 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EmsegError

log = logging.getLogger("emseg")


# ---------------------------------------------------------------- parser

def _batch_size(text: str) -> int | str:
    """--batch-size: a positive integer or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def _add_tiling(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--tile", type=int, default=None, metavar="PX",
                       help="tile side in pixels, a multiple of 32 (default: the model card's)")
    group.add_argument("--overlap", type=int, default=None, metavar="PX",
                       help="overlap between tiles in pixels (default: the model card's)")
    group.add_argument("--batch-size", type=_batch_size, default=4, metavar="N",
                       help="tiles per forward pass, or 'auto': from free GPU memory on CUDA, 4 elsewhere (default 4)")
    group.add_argument("--device", default="auto",
                       help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default auto)")
    group.add_argument("--tta", action="store_true", help="test-time augmentation over 8 flips/rotations (8x slower)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``emseg`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="emseg", description="U-Net segmentation for electron microscopy.",
        epilog="Run `emseg COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"emseg {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("predict", help="segment images and stacks into masks",
                       description="Segment TIFF stacks, microscope files (DM3/DM4, EMD, SER, MRC, hspy) and "
                                   "PNGs into one mask TIFF per input, with an overlay PNG preview.")
    p.add_argument("model", help="model file or folder ('default' for the bundled model)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="output folder")
    _add_tiling(p.add_argument_group("tiling and device"))
    g = p.add_argument_group("outputs")
    g.add_argument("--probabilities", action="store_true", help="also write per-class probabilities (NAME_probs.tif)")
    g.add_argument("--no-overlay", action="store_true", help="do not write the NAME_overlay.png preview")
    g.add_argument("--overwrite", action="store_true", help="redo inputs whose mask already exists")
    g.add_argument("--pixel-size", type=float, default=None, metavar="NM",
                   help="input pixel size in nm/px, overriding the files' own (or supplying a missing one)")
    g.add_argument("--format", choices=("tif", "zarr"), default="tif",
                   help="masks/probabilities as TIFF (default) or OME-Zarr folders (NAME_mask.zarr), written page by page")
    from .volume_run import add_arguments as _add_volume_arguments
    _add_volume_arguments(p.add_argument_group("volumes (3D stacks)"))
    from .distributed import add_arguments as _add_cluster_arguments
    _add_cluster_arguments(p.add_argument_group("cluster (dask.distributed)"))
    g = p.add_argument_group("objects and measurements")
    g.add_argument("--instances", action="store_true",
                   help="also write NAME_instances.tif: one label per connected object")
    g.add_argument("--measure", action="store_true",
                   help="also measure every object (NAME_objects.csv, NAME_measure.png, summary.csv); "
                        "sizes in nm when the pixel size is known")
    g.add_argument("--objects", metavar="A,B", help="only these classes (by name); default: every class but 0")
    g.add_argument("--split", action="store_true", help="split touching objects (distance transform + watershed)")
    g.add_argument("--min-size", type=int, default=0, metavar="PX", help="drop objects smaller than this (pixels)")
    g.add_argument("--3d", dest="three_d", action="store_true",
                   help="connect objects across slices and measure them in 3D (volume, surface; the default "
                        "with --planes ortho)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="list the encoders with parameters and GFLOPs per megapixel")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="print each block's output shape for an encoder's U-Net")
    p.add_argument("encoder", help="encoder name (see `emseg models`)")
    p.add_argument("--size", type=int, default=512, help="input side in pixels (default 512)")
    p.add_argument("--classes", type=int, default=2, help="output classes (default 2)")
    p.add_argument("--depth", type=int, default=3, help="nesting depth of the table (default 3)")
    p.set_defaults(func=cmd_summary)

    from . import cli_train, export, measure
    cli_train.add_parsers(sub)
    measure.add_parser(sub)
    export.add_parser(sub)
    return parser


# ---------------------------------------------------------------- helpers

def _model_path(spec: str) -> Path:
    from .modelfile import default_model_path
    return default_model_path() if spec == "default" else Path(spec)


class _TqdmProgress:
    """Turns the core's page/tile callbacks into a megapixel progress bar for one file."""

    def __init__(self, name: str, disable: bool):
        from tqdm.auto import tqdm
        self._tqdm = tqdm
        self.name, self.disable = name, disable
        self.bar = None
        self._last = (0, 0)

    def __call__(self, page: int, pages: int, done: int, total: int, page_mp: float) -> None:
        if self.bar is None:
            self.bar = self._tqdm(total=pages * page_mp, unit="MP", desc=self.name, disable=self.disable,
                                  dynamic_ncols=True, leave=False,
                                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MP "
                                             "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
        position = min(self.bar.total, page * page_mp + page_mp * done / total)
        self.bar.set_postfix_str(f"page {page + 1}/{pages}", refresh=False)
        self.bar.update(position - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- commands

def cmd_predict(args: argparse.Namespace) -> int:
    from .io import expand_inputs
    from .modelfile import load_model
    from .runner import check_outputs, predict_file

    paths, errors = expand_inputs(args.inputs)
    for error in errors:
        log.error("%s", error)
    if not paths:
        log.error("no input images to segment")
        return 1
    check_outputs(paths, args.output, args.format)
    model = load_model(_model_path(args.model))
    if args.planes == "ortho":
        from .volume_run import cmd_predict_ortho
        return cmd_predict_ortho(args, paths, model, failed=len(errors))
    if args.voxel_size:
        args.pixel_size = args.pixel_size or args.voxel_size[2]
    if args.scheduler:
        from .distributed import cmd_predict_distributed
        return cmd_predict_distributed(args, paths, model, failed=len(errors))
    predictor = model.predictor(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                                tta=args.tta, device=args.device)
    log.info("model %s (%s, classes %s) on %s, tile %d, overlap %d%s", model.path, model.card.encoder,
             ", ".join(model.classes), predictor.device, predictor.tile, predictor.overlap,
             ", TTA" if args.tta else "")
    failed = len(errors)
    tables = []
    for path in paths:
        progress = _TqdmProgress(path.name, disable=args.quiet)
        try:
            result = predict_file(predictor, path, args.output, pixel_size_nm=args.pixel_size,
                                  probabilities=args.probabilities, overlay=not args.no_overlay,
                                  overwrite=args.overwrite, progress=progress, fmt=args.format,
                                  voxel_size_nm=args.voxel_size)
        except EmsegError as exc:
            failed += 1
            log.error("%s", exc, exc_info=args.verbose)
            continue
        finally:
            progress.close()
        if result.status == "written":
            log.info("%s -> %s (%d page%s, %.1f s, %.2f MP/s)", path, result.outputs.mask, result.pages,
                     "" if result.pages == 1 else "s", result.seconds, result.megapixels / max(result.seconds, 1e-9))
        if args.instances or args.measure:
            tables.append(_measure_output(args, path, result.outputs.mask, model.classes))
    return _finish_predict(args, tables, failed)


def _finish_predict(args: argparse.Namespace, tables: list, failed: int) -> int:
    """The end of a predict run: the object summary (with --measure), the count of failures, the exit code."""
    if args.measure and tables:
        from .measure import summarize, write_csv
        log.info("object summary: %s", write_csv(args.output / "summary.csv", summarize(tables)))
    if failed:
        log.error("%d input%s failed; see the messages above", failed, "" if failed == 1 else "s")
    return 1 if failed else 0


def _measure_output(args: argparse.Namespace, image: Path, mask: Path, classes):
    """Instances (and measurements) of one written mask, next to it."""
    from .measure import measure_file
    return measure_file(mask, args.output, image_path=image, class_names=classes, pixel_size_nm=args.pixel_size,
                        instance_options={"split": args.split, "min_size_px": args.min_size,
                                          "three_d": args.three_d or args.planes == "ortho"},
                        voxel_size_nm=args.voxel_size,
                        plot=args.measure, write_labels=True,
                        object_classes=[c.strip() for c in args.objects.split(",")] if args.objects else None)


def cmd_models(args: argparse.Namespace) -> int:
    from .models import DEFAULT_ENCODER
    from .summary import cost_table
    rows = cost_table()
    print(f"{'encoder':<16} {'family':<9} {'params':>9} {'GFLOP/MP':>9}  description")
    for row in rows:
        mark = "  (default for new models)" if row.name == DEFAULT_ENCODER else ""
        print(f"{row.name:<16} {row.family:<9} {row.parameters / 1e6:>8.2f}M {row.gflops_per_mp:>9.1f}  "
              f"{row.description}{mark}")
    print("\nU-Net with 1 input channel and 2 classes; FLOPs counted by torch.utils.flop_counter "
          "(a multiply-add counts 2) on a 256x256 input.")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from .summary import layer_summary
    print(layer_summary(args.encoder, size=args.size, classes=args.classes, depth=args.depth))
    return 0


# ---------------------------------------------------------------- entry point

class _Formatter(logging.Formatter):
    """``emseg: message``, with the level named for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"emseg: {record.levelname.lower()}: {text}"
        return f"emseg: {text}"


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler.set_name("emseg-cli")
    logger = logging.getLogger("emseg")
    logger.handlers[:] = [h for h in logger.handlers if h.get_name() != "emseg-cli"] + [handler]
    logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the ``emseg`` command; returns the exit code."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except EmsegError as exc:
        log.error("%s", exc, exc_info=args.verbose)
        return 1
    except ValueError as exc:  # option values the core rejects (tile size, device, encoder name)
        if args.verbose:
            raise
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished outputs are kept, unfinished ones were removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
