"""What the subcommands share: argparse types of their options, the model and predictor an option set
names, output folder checks, the progress bar of one input and the one line for an input that failed."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from emseg.errors import EmsegError

log = logging.getLogger("emseg")


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
    from emseg.io.tiff import MAX_PIXEL_SIZE_NM, MIN_PIXEL_SIZE_NM
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


def batch_size_arg(text: str) -> int | str:
    """--batch-size: a positive integer or 'auto'."""
    if text == "auto":
        return text
    try:
        return integer(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def add_tiling(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--tile", type=integer(32, 32), default=None, metavar="PX",
                       help="tile side in pixels, a multiple of 32 (default: the model card's)")
    group.add_argument("--overlap", type=integer(0), default=None, metavar="PX",
                       help="overlap between tiles in pixels, smaller than the tile (default: the model card's)")
    group.add_argument("--batch-size", type=batch_size_arg, default=4, metavar="N",
                       help="tiles per forward pass, or 'auto': from free GPU memory on CUDA, 4 elsewhere (default 4)")
    group.add_argument("--device", type=device, default="auto",
                       help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default auto)")
    group.add_argument("--tta", action="store_true", help="test-time augmentation over 8 flips/rotations (8x slower)")
    group.add_argument("--compile", action="store_true",
                       help="run the network through torch.compile (worth it on a GPU for long runs; the first "
                            "tiles wait for the compiler; falls back to plain PyTorch if compiling fails)")


def model_file(spec: str) -> Path:
    from emseg.model.modelfile import default_model_path
    return default_model_path() if spec == "default" else Path(spec)


def check_tiling(args: argparse.Namespace, card) -> tuple[int, int]:
    """--tile and --overlap, or the model card's, checked against each other with the options named."""
    tile = args.tile or card.tile_size
    overlap = card.overlap if args.overlap is None else args.overlap
    if overlap >= tile:
        given = [f"--tile {args.tile}" if args.tile else f"the model's tile {tile}",
                 f"--overlap {args.overlap}" if args.overlap is not None else f"the model's overlap {overlap}"]
        raise EmsegError(f"{given[1]} must be smaller than {given[0]}; give a larger --tile or a smaller --overlap")
    return tile, overlap


def make_predictor(args: argparse.Namespace, model, **options):
    """The predictor of ``predict`` and ``evaluate`` (see :func:`check_tiling`)."""
    tile, overlap = check_tiling(args, model.card)
    return model.predictor(tile=tile, overlap=overlap, tta=args.tta, device=args.device,
                           compile=getattr(args, "compile", False),
                           follow_label_offset=getattr(args, "follow_label_offset", None), **options)


def prepare_output_folder(folder: Path) -> None:
    """Refuse an output folder that cannot be written (one line, before any work) and remove the
    temporary files that killed runs left in it."""
    from emseg.io.write import check_output_folder, remove_stale_partials
    check_output_folder(folder, "-o")
    remove_stale_partials(folder)


class TqdmProgress:
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


def finish_predict(args: argparse.Namespace, tables: list, failed: int) -> int:
    """The end of a predict run: the object summary (with --measure), the count of failures, the exit code."""
    if args.measure and tables:
        from emseg.analysis.measure import write_summary
        log.info("object summary: %s", write_summary(args.output / "summary.csv", tables))
    if failed:
        log.error("%d input%s failed; see the messages above", failed, "" if failed == 1 else "s")
    return 1 if failed else 0


def measure_output(args: argparse.Namespace, image: Path, mask: Path, classes):
    """Instances (and measurements) of one written mask, next to it."""
    from emseg.analysis.measure import measure_file
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
