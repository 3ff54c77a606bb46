"""``emseg predict``: pages one by one here (:mod:`emseg.infer.runner`), ``--planes ortho`` for volumes
(:mod:`emseg.infer.volume_run`), ``--scheduler`` on a dask cluster (:mod:`emseg.infer.distributed`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from emseg.cli.common import (
    TqdmProgress,
    add_tiling,
    check_tiling,
    finish_predict,
    input_failure,
    integer,
    make_predictor,
    measure_output,
    model_file,
    pixel_size,
    prepare_output_folder,
)
from emseg.errors import EmsegError, InputError
from emseg.infer.distributed import connect, predict_files
from emseg.infer.volume import COMBINE, DEFAULT_MEMORY_MB
from emseg.infer.volume_run import predict_volume_file, predict_volume_files_distributed
from emseg.io.read import voxel_size_arg

log = logging.getLogger("emseg")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("predict", help="segment images and stacks into masks",
                       description="Segment TIFF stacks, microscope files (DM3/DM4, EMD, SER, MRC, hspy) and "
                                   "PNGs into one mask TIFF per input, with an overlay PNG preview.")
    p.add_argument("model", help="model file or folder ('default' for the bundled model)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="output folder")
    add_tiling(p.add_argument_group("tiling and device"))
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
    add_volume_arguments(p.add_argument_group("volumes (3D stacks)"))
    add_cluster_arguments(p.add_argument_group("cluster (dask.distributed)"))
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
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    from emseg.infer.runner import check_outputs, predict_file
    from emseg.io.read import expand_inputs
    from emseg.model.modelfile import load_model

    paths, errors = expand_inputs(args.inputs)
    paths, clashes = check_outputs(paths, args.output, args.format)
    errors += clashes
    for error in errors:
        log.error("%s", error)
    if not paths:
        log.error("no input images to segment")
        return 1
    prepare_output_folder(args.output)
    model = load_model(model_file(args.model))
    check_tiling(args, model.card)
    if args.planes == "ortho":
        return cmd_predict_ortho(args, paths, model, failed=len(errors))
    if args.voxel_size:
        args.pixel_size = args.pixel_size or args.voxel_size[2]
    if args.scheduler:
        return cmd_predict_distributed(args, paths, model, failed=len(errors))
    predictor = make_predictor(args, model, batch_size=args.batch_size)
    log.info("model %s (%s, classes %s) on %s, tile %d, overlap %d%s", model.path, model.card.encoder,
             ", ".join(model.classes), predictor.device, predictor.tile, predictor.overlap,
             ", TTA" if args.tta else "")
    failed = len(errors)
    tables = []
    for path in paths:
        progress = TqdmProgress(path.name, disable=args.quiet)
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
                tables.append(measure_output(args, path, result.outputs.mask, model.classes))
        except Exception as exc:  # noqa: BLE001 - one input's failure, whatever it is, must not stop the others
            failed += 1
            log.error("%s", input_failure(path, exc), exc_info=args.verbose)
        finally:
            progress.close()
    return finish_predict(args, tables, failed)


def add_volume_arguments(group: argparse._ArgumentGroup) -> None:
    """Add ``--planes``, ``--combine``, ``--voxel-size`` and ``--slab-memory`` to ``emseg predict``."""
    group.add_argument("--planes", choices=("xy", "ortho"), default="xy",
                       help="xy: segment every page on its own (default); ortho: also every xz and yz plane of "
                            "a 3D stack, combined into one 3D result (FIB-SEM/SBF-SEM; needs the voxel size)")
    group.add_argument("--combine", choices=COMBINE, default="mean",
                       help="with --planes ortho: mean of the three directions' probabilities (default), or vote: "
                            "the class two of the three directions agree on")
    group.add_argument("--voxel-size", type=voxel_size_arg, default=None, metavar="Z,Y,X",
                       help="voxel size in nm (e.g. 8,5,5), overriding the files' page spacing and pixel size")
    group.add_argument("--slab-memory", type=float, default=DEFAULT_MEMORY_MB, metavar="MB",
                       help=f"with --planes ortho: memory for one slab of pages and its class sums "
                            f"(default {DEFAULT_MEMORY_MB}); larger slabs recompute less context")


def cmd_predict_ortho(args: argparse.Namespace, paths: list[Path], model, failed: int = 0) -> int:
    """What ``emseg predict --planes ortho`` does: every input, here or on a cluster; logs; exit code."""
    from tqdm.auto import tqdm

    if args.pixel_size and args.voxel_size and abs(args.pixel_size / args.voxel_size[2] - 1) > 0.02:
        voxel = ",".join(f"{v:g}" for v in args.voxel_size)
        raise InputError(f"--pixel-size {args.pixel_size:g} and --voxel-size {voxel} disagree; "
                         "give only --voxel-size Z,Y,X")
    options = dict(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, tta=args.tta, device=args.device)
    common = dict(pixel_size_nm=args.pixel_size, voxel_size_nm=args.voxel_size, combine=args.combine,
                  memory_mb=args.slab_memory, probabilities=args.probabilities, overlay=not args.no_overlay,
                  overwrite=args.overwrite, fmt=args.format)
    bars: dict[Path, object] = {}

    def progress_for(path: Path):
        def progress(done: float, total: float, text: str) -> None:
            bar = bars.get(path)
            if bar is None:
                bar = bars[path] = tqdm(total=total, unit="MP", desc=f"{path.name} (ortho)", disable=args.quiet,
                                        leave=False, dynamic_ncols=True,
                                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} MP "
                                                   "[{elapsed}<{remaining}{postfix}]")
            bar.set_postfix_str(text, refresh=False)
            bar.update(min(done, bar.total) - bar.n)
        return progress

    def outcomes():
        if args.scheduler:
            client = connect(args.scheduler, args.workers)
            try:
                yield from predict_volume_files_distributed(client, model, paths, args.output, options=options,
                                                            progress_for=progress_for, **common)
            finally:
                cluster = getattr(client, "cluster", None)
                client.close()
                if cluster is not None and args.scheduler == "local":
                    cluster.close()
            return
        predictor = model.predictor(**options)
        log.info("model %s (%s, classes %s) on %s, tile %d, overlap %d, ortho-plane (%s)", model.path,
                 model.card.encoder, ", ".join(model.classes), predictor.device, predictor.tile, predictor.overlap,
                 args.combine)
        for path in paths:
            try:
                yield path, predict_volume_file(predictor, path, args.output, progress=progress_for(path), **common)
            except EmsegError as exc:
                yield path, exc

    tables = []
    for path, outcome in outcomes():
        if finished(path, outcome, bars, verbose=args.verbose):
            failed += 1
            continue
        if outcome.status == "written":
            log.info("%s -> %s (%d pages, ortho-plane, %.1f s, %.2f MP/s)", path, outcome.outputs.mask, outcome.pages,
                     outcome.seconds, outcome.megapixels / max(outcome.seconds, 1e-9))
        if args.instances or args.measure:
            tables.append(measure_output(args, path, outcome.outputs.mask, model.classes))
    return finish_predict(args, tables, failed)


def add_cluster_arguments(group: argparse._ArgumentGroup) -> None:
    """Add ``--scheduler`` and ``--workers`` to the ``emseg predict`` parser (an argument group)."""
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run on a dask.distributed cluster: its scheduler address (tcp://host:8786), "
                            "a scheduler JSON file, or 'local' to start CPU worker processes here (for GPUs, start "
                            "one single-threaded worker per GPU, e.g. dask-cuda's LocalCUDACluster, and pass its "
                            "address). Inputs must be readable by the workers at the same paths")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="with --scheduler local: worker processes (default: one per 2 CPU cores)")


def finished(path: Path, outcome, bars: dict, *, verbose: bool = False) -> bool:
    """Close the progress bar of an input that is done and log its error, if it failed; True when it did."""
    bar = bars.pop(path, None)
    if bar is not None:
        bar.close()
    if isinstance(outcome, BaseException):
        log.error("%s", outcome, exc_info=verbose)
        return True
    return False


def cmd_predict_distributed(args: argparse.Namespace, paths: list[Path], model, failed: int = 0) -> int:
    """What ``emseg predict`` does with ``--scheduler``: predict ``paths`` on the cluster, log, exit code.

    ``failed`` counts inputs that already failed (e.g. patterns that matched nothing).
    """
    from tqdm.auto import tqdm
    fmt = getattr(args, "format", None) or "tif"
    client = connect(args.scheduler, args.workers)
    bars: dict[Path, Any] = {}

    def progress(path: Path, page: int, pages: int) -> None:
        bar = bars.get(path)
        if bar is None:
            bar = bars[path] = tqdm(total=pages, unit="page", desc=path.name, disable=args.quiet, leave=False,
                                    dynamic_ncols=True)
        bar.update(1)

    try:
        workers = client.scheduler_info()["workers"]
        log.info("model %s (%s, classes %s) on dask cluster %s: %d worker(s), %d thread(s)", model.path,
                 model.card.encoder, ", ".join(model.classes), client.scheduler.address, len(workers),
                 sum(w.get("nthreads", 1) for w in workers.values()))
        for path, outcome in predict_files(
                client, model, paths, args.output, tile=args.tile, overlap=args.overlap,
                batch_size=args.batch_size, tta=args.tta, device=args.device, pixel_size_nm=args.pixel_size,
                probabilities=args.probabilities, overlay=not args.no_overlay, overwrite=args.overwrite,
                fmt=fmt, progress=progress, follow_label_offset=getattr(args, "follow_label_offset", None)):
            if finished(path, outcome, bars, verbose=args.verbose):
                failed += 1
            elif outcome.status == "written":
                log.info("%s -> %s (%d page%s, %.1f s, %.2f MP/s)", path, outcome.outputs.mask, outcome.pages,
                         "" if outcome.pages == 1 else "s", outcome.seconds,
                         outcome.megapixels / max(outcome.seconds, 1e-9))
    finally:
        for bar in bars.values():
            bar.close()
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and args.scheduler == "local":
            cluster.close()
    if failed:
        log.error("%d input%s failed; see the messages above", failed, "" if failed == 1 else "s")
    return 1 if failed else 0
