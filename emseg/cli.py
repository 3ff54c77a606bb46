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
from .errors import EmsegError, OptionError

log = logging.getLogger("emseg")

# OpenMP threads that sleep between torch operations instead of spinning: on a CPU shared with emseg's own
# reader, writer and batch threads, spinning threads stalled every short operation (the pipeline without its
# network: 13 MP/s spinning, 46-51 MP/s passive; a VGG11-BN forward pass 1.3-1.7 s against 0.8 s; see
# docs/performance.md). Set before torch is imported; an OMP_WAIT_POLICY of the user's own is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# ---------------------------------------------------------------- parser

def integer(low: int = 0, multiple: int = 1, high: int | None = None):
    """An argparse type: an integer >= ``low`` (and <= ``high``), a multiple of ``multiple``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or value % multiple or (high is not None and value > high):
            what = f"a multiple of {multiple}" if multiple > 1 else "an integer"
            most = f" and at most {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"expected {what}, at least {low}{most}, got {text!r}")
        return value
    return parse


def number(low: float = 0.0, high: float | None = None, *, above: bool = False):
    """An argparse type: a finite number >= ``low`` (> with ``above``) and <= ``high``."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low)
                and (high is None or value <= high)):
            bound = f"{'above' if above else 'at least'} {low:g}" + (f" and at most {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}")
        return value
    return parse


def pixel_size(text: str) -> float:
    """--pixel-size: nm per pixel within what a microscope can give."""
    from .io_tiff import MAX_PIXEL_SIZE_NM, MIN_PIXEL_SIZE_NM
    return number(MIN_PIXEL_SIZE_NM, MAX_PIXEL_SIZE_NM)(text)


def device(text: str) -> str:
    """--device: auto, or a device torch knows (cpu, cuda, cuda:1, mps)."""
    if text == "auto":
        return text
    import torch
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}") from None
    return text


def _batch_size(text: str) -> int | str:
    """--batch-size: a positive integer or 'auto'."""
    if text == "auto":
        return text
    try:
        return integer(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def _add_tiling(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--tile", type=integer(32, 32), default=None, metavar="PX",
                       help="tile side in pixels, a multiple of 32 (default: the model card's)")
    group.add_argument("--overlap", type=integer(0), default=None, metavar="PX",
                       help="overlap between tiles in pixels, smaller than the tile (default: the model card's)")
    group.add_argument("--batch-size", type=_batch_size, default=4, metavar="N",
                       help="tiles per forward pass, or 'auto': from free GPU memory on CUDA, 4 elsewhere (default 4)")
    group.add_argument("--device", type=device, default="auto",
                       help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default auto)")
    group.add_argument("--tta", action="store_true", help="test-time augmentation over 8 flips/rotations (8x slower)")
    group.add_argument("--compile", action="store_true",
                       help="run the network through torch.compile (worth it on a GPU for long runs; the first "
                            "tiles wait for the compiler; falls back to plain PyTorch if compiling fails)")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the option, what is wrong, where to look)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``emseg`` argument parser."""
    parser = _Parser(
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
    g.add_argument("--overwrite", action="store_true",
                   help="redo inputs whose outputs already exist (by default they are skipped, and an input "
                        "whose outputs are incomplete is completed)")
    g.add_argument("--pixel-size", type=pixel_size, default=None, metavar="NM",
                   help="input pixel size in nm/px, overriding the files' own (or supplying a missing one)")
    offset = g.add_mutually_exclusive_group()
    offset.add_argument("--follow-label-offset", dest="follow_label_offset", action="store_const", const=True,
                        help="move the predictions by the model's annotation offset (its annotators' sub-pixel "
                             "bias), as models trained with --follow-label-offset do by default")
    offset.add_argument("--ignore-label-offset", dest="follow_label_offset", action="store_const", const=False,
                        help="do not, even for a model trained to follow it")
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
    g.add_argument("--min-size", type=integer(0), default=0, metavar="PX",
                   help="drop objects smaller than this (pixels)")
    g.add_argument("--3d", dest="three_d", action="store_true",
                   help="connect objects across slices and measure them in 3D (volume, surface; the default "
                        "with --planes ortho)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="list the encoders with parameters and GFLOPs per megapixel")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="print each block's output shape for an encoder's U-Net")
    p.add_argument("encoder", help="encoder name (see `emseg models`)")
    p.add_argument("--size", type=integer(32, 32), default=512, help="input side in pixels (default 512)")
    p.add_argument("--classes", type=integer(1), default=2, help="output classes (default 2)")
    p.add_argument("--depth", type=integer(0), default=3, help="nesting depth of the table (default 3)")
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


def _tiling(args: argparse.Namespace, card) -> tuple[int, int]:
    """--tile and --overlap, or the model card's, checked against each other with the options named."""
    tile = args.tile or card.tile_size
    overlap = card.overlap if args.overlap is None else args.overlap
    if overlap >= tile:
        given = [f"--tile {args.tile}" if args.tile else f"the model's tile {tile}",
                 f"--overlap {args.overlap}" if args.overlap is not None else f"the model's overlap {overlap}"]
        raise EmsegError(f"{given[1]} must be smaller than {given[0]}; give a larger --tile or a smaller --overlap")
    return tile, overlap


def _predictor(args: argparse.Namespace, model, **options):
    """The predictor of ``predict`` and ``evaluate`` (see :func:`_tiling`)."""
    tile, overlap = _tiling(args, model.card)
    return model.predictor(tile=tile, overlap=overlap, tta=args.tta, device=args.device,
                           compile=getattr(args, "compile", False),
                           follow_label_offset=getattr(args, "follow_label_offset", None), **options)


def _prepare_output_folder(folder: Path) -> None:
    """Refuse an output folder that cannot be written (one line, before any work) and remove the
    temporary files that killed runs left in it."""
    from .io import check_output_folder, remove_stale_partials
    check_output_folder(folder, "-o")
    remove_stale_partials(folder)


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
    paths, clashes = check_outputs(paths, args.output, args.format)
    errors += clashes
    for error in errors:
        log.error("%s", error)
    if not paths:
        log.error("no input images to segment")
        return 1
    _prepare_output_folder(args.output)
    model = load_model(_model_path(args.model))
    _tiling(args, model.card)
    if args.planes == "ortho":
        from .volume_run import cmd_predict_ortho
        return cmd_predict_ortho(args, paths, model, failed=len(errors))
    if args.voxel_size:
        args.pixel_size = args.pixel_size or args.voxel_size[2]
    if args.scheduler:
        from .distributed import cmd_predict_distributed
        return cmd_predict_distributed(args, paths, model, failed=len(errors))
    predictor = _predictor(args, model, batch_size=args.batch_size)
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
            progress.close()
            if result.status == "written":
                log.info("%s -> %s (%d page%s, %.1f s, %.2f MP/s)", path, result.outputs.mask, result.pages,
                         "" if result.pages == 1 else "s", result.seconds,
                         result.megapixels / max(result.seconds, 1e-9))
            if args.instances or args.measure:
                tables.append(_measure_output(args, path, result.outputs.mask, model.classes))
        except Exception as exc:  # noqa: BLE001 - one input's failure, whatever it is, must not stop the others
            failed += 1
            log.error("%s", input_failure(path, exc), exc_info=args.verbose)
        finally:
            progress.close()
    return _finish_predict(args, tables, failed)


def _finish_predict(args: argparse.Namespace, tables: list, failed: int) -> int:
    """The end of a predict run: the object summary (with --measure), the count of failures, the exit code."""
    if args.measure and tables:
        from .measure import write_summary
        log.info("object summary: %s", write_summary(args.output / "summary.csv", tables))
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


def input_failure(path: Path, exc: Exception) -> str:
    """The one line for an input that failed: an EmsegError says it all; anything else is named and
    shown with its type (an emseg bug or a system limit: -v gives the traceback)."""
    if isinstance(exc, EmsegError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"{path}: failed ({type(exc).__name__}: {text[:300]}); the other inputs go on "
            "(-v shows the traceback)")


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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 2:  # a usage error, already printed on one line
            return 2
        raise  # --help, --version
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except OptionError as exc:  # an option value the core rejects: a usage error
        log.error("%s", exc, exc_info=args.verbose)
        return 2
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
