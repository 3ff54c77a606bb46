"""``emseg predict --planes ortho``: ortho-plane segmentation of stacks, file to file, here or on a cluster.

For an input ``NAME.EXT`` (a 3D stack) it writes what ``emseg predict`` writes (see
:mod:`emseg.runner`), from the combined xy, xz and yz planes (:mod:`emseg.volume`):

* ``NAME_mask.tif`` (or ``.zarr``): labels, the input's pages, with the voxel size
  (``voxel_size_nm`` [z, y, x] and, in OME-Zarr, the z scale), ``planes`` and ``combine`` in the metadata;
* ``NAME_probs.tif`` (optional): the mean probabilities ``(pages, classes, H, W)`` float32;
* ``NAME_overlay.png``: orthogonal sections through the middle of the volume (xy top left, yz to
  its right, xz below; z drawn to scale) with the labels over them.

Outputs are written slab by slab, atomically (temporary name, renamed when complete). With
``--scheduler`` every slab is one dask task: a worker reads the slab's pages (with the halo) from
the input path, runs all three directions and returns the slab's labels; the client writes them in
order, holding at most one slab per worker thread.
"""

from __future__ import annotations

import argparse
import collections
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import EmsegError, InputError
from .inference import labels_dtype
from .io import open_image, voxel_size_arg, write_overlay_png
from .io_zarr import stack_writer
from .runner import FileResult, OutputPaths
from .volume import COMBINE, DEFAULT_MEMORY_MB, OrthoPlanes, Slab, SlabResult, check_volume, source_reader

log = logging.getLogger(__name__)

# (megapixels done, megapixels total, text)
VolumeProgress = Callable[[float, float, str], None]


def add_arguments(group: argparse._ArgumentGroup) -> None:
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


# ---------------------------------------------------------------- one input's outputs

def ortho_montage(xy: tuple[np.ndarray, np.ndarray], xz: tuple[np.ndarray, np.ndarray],
                  yz: tuple[np.ndarray, np.ndarray], z_over_x: float) -> tuple[np.ndarray, np.ndarray]:
    """One image and its labels with three sections: xy (H, W) top left, yz (shown H x Z) to its right,
    xz (Z x W) below; the z axis stretched by ``z_over_x`` (nearest) so that it is drawn to scale."""
    (img, lab), (xz_img, xz_lab), (yz_img, yz_lab) = xy, xz, yz
    h, w = img.shape
    depth = xz_img.shape[0]
    rows = np.minimum((np.arange(max(1, round(depth * z_over_x))) / z_over_x).astype(int), depth - 1)
    d = len(rows)
    gap = max(2, (h + w) // 128)
    fill = float(np.percentile(img, 99)) if img.size else 0.0
    image = np.full((h + gap + d, w + gap + d), fill, np.float32)
    labels = np.zeros(image.shape, lab.dtype)
    image[:h, :w], labels[:h, :w] = img, lab
    image[h + gap:, :w], labels[h + gap:, :w] = xz_img[rows], xz_lab[rows]
    image[:h, w + gap:], labels[:h, w + gap:] = yz_img[rows].T, yz_lab[rows].T
    return image, labels


class VolumeOutput:
    """The writers of one input's ortho-plane run and the sections of its overlay."""

    def __init__(self, outputs: OutputPaths, source, voxel: tuple[float, float, float], classes, *,
                 combine: str, probabilities: bool, overlay: bool):
        self.outputs, self.voxel, self.classes = outputs, voxel, tuple(classes)
        pages, h, w = source.shape
        self.middle = pages // 2
        meta = {"classes": list(classes), "planes": "ortho", "combine": combine}
        dtype = labels_dtype(len(classes))
        common = dict(pixel_size_nm=source.pixel_size_nm, z_spacing_nm=voxel[0], metadata=meta)
        outputs.mask.parent.mkdir(parents=True, exist_ok=True)
        self.mask = stack_writer(outputs.mask, shape=(pages, h, w), dtype=dtype, **common)
        self.probs = None
        try:
            if probabilities:
                self.probs = stack_writer(outputs.probabilities, shape=(pages, len(classes), h, w), dtype=np.float32,
                                          **common)
        except BaseException:
            self.mask.abort()
            raise
        self.overlay = overlay
        self.sections = {"xy": [None, None], "xz": [np.zeros((pages, w), source.dtype), np.zeros((pages, w), dtype)],
                         "yz": [np.zeros((pages, h), source.dtype), np.zeros((pages, h), dtype)]} if overlay else None

    def record_image(self, lo: int, pages: np.ndarray) -> None:
        """Keep the overlay's image sections of ``pages`` (the stack's pages from ``lo`` on)."""
        if self.sections is None:
            return
        _, h, w = pages.shape
        self.sections["xz"][0][lo:lo + len(pages)] = pages[:, h // 2, :]
        self.sections["yz"][0][lo:lo + len(pages)] = pages[:, :, w // 2]
        if lo <= self.middle < lo + len(pages):
            self.sections["xy"][0] = np.array(pages[self.middle - lo])

    def write(self, result: SlabResult) -> None:
        """Write a slab's pages (in order) and keep its label sections."""
        for i in range(len(result.labels)):  # page by page: the zarr writer takes one page at a time
            self.mask.write_page(result.labels[i])
            if self.probs is not None:
                self.probs.write_page(result.probabilities[:, i])
        if self.sections is not None:
            _, h, w = result.labels.shape
            self.sections["xz"][1][result.start:result.stop] = result.labels[:, h // 2, :]
            self.sections["yz"][1][result.start:result.stop] = result.labels[:, :, w // 2]
            if result.start <= self.middle < result.stop:
                self.sections["xy"][1] = result.labels[self.middle - result.start]

    def close(self) -> None:
        if self.probs is not None:
            self.probs.close()
        self.mask.close()
        if self.sections is not None:
            image, labels = ortho_montage(*(tuple(self.sections[k]) for k in ("xy", "xz", "yz")),
                                          self.voxel[0] / self.voxel[2])
            write_overlay_png(self.outputs.overlay, image, labels, class_names=self.classes)

    def abort(self) -> None:
        for writer in (self.mask, self.probs):
            if writer is not None:
                writer.abort()


def _open_volume(path: Path, pixel_size_nm, voxel_size_nm):
    """The open source of ``path`` and its checked voxel size (one-line InputError when unusable)."""
    source = open_image(path, pixel_size_nm=pixel_size_nm, voxel_size_nm=voxel_size_nm)
    try:
        voxel = check_volume(source.shape, source.voxel_size_nm, str(path), is_stack=source.is_stack)
    except BaseException:
        source.close()
        raise
    return source, voxel


def predict_volume_file(predictor, path: Path, outdir: Path, *, pixel_size_nm: float | None = None,
                        voxel_size_nm=None, combine: str = "mean", memory_mb: float = DEFAULT_MEMORY_MB,
                        probabilities: bool = False, overlay: bool = True, overwrite: bool = False,
                        progress: VolumeProgress | None = None, fmt: str = "tif") -> FileResult:
    """Segment one 3D stack with ortho-plane inference into ``outdir`` (see the module docstring).

    Raises InputError for inputs ortho-plane inference cannot take (2D, one slice, no voxel size,
    extreme anisotropy), with one line saying so.
    """
    def slabs(source, engine: OrthoPlanes, out: VolumeOutput) -> None:
        read = source_reader(source)

        def recording(lo: int, hi: int) -> np.ndarray:
            pages = read(lo, hi)
            out.record_image(lo, pages)
            return pages

        for result in engine.iter_slabs(recording, source.shape, source.dtype, keep_probabilities=probabilities,
                                        progress=progress):
            out.write(result)

    return _predict_file(path, outdir, predictor, slabs, pixel_size_nm=pixel_size_nm, voxel_size_nm=voxel_size_nm,
                         combine=combine, memory_mb=memory_mb, probabilities=probabilities, overlay=overlay,
                         overwrite=overwrite, fmt=fmt)


def _predict_file(path: Path, outdir: Path, predictor, slabs: Callable, *, pixel_size_nm, voxel_size_nm, combine,
                  memory_mb, probabilities, overlay, overwrite, fmt) -> FileResult:
    """What one input's run does around ``slabs(source, engine, out)``, which computes and writes its slabs:
    skip it when done, open and check it, make the writers, close them (or abort them on an error)."""
    outputs = OutputPaths.for_input(path, outdir, fmt)
    if outputs.mask.exists() and not overwrite:
        log.info("%s: skipped, %s exists (use --overwrite to redo)", path, outputs.mask)
        return FileResult(path, "skipped", outputs)
    start = time.perf_counter()
    source, voxel = _open_volume(path, pixel_size_nm, voxel_size_nm)
    with source:
        engine = OrthoPlanes(predictor, voxel, combine=combine, memory_mb=memory_mb)
        out = VolumeOutput(outputs, source, voxel, predictor.card.classes, combine=combine,
                           probabilities=probabilities, overlay=overlay)
        try:
            slabs(source, engine, out)
            out.close()
        except BaseException:
            out.abort()
            raise
        pages, h, w = source.shape
    return FileResult(path, "written", outputs, pages, time.perf_counter() - start, pages * h * w / 1e6)


# ---------------------------------------------------------------- on a dask cluster

def _slab_task(plugin_name: str, path: str, pixel_size_nm, voxel, combine: str, memory_mb: float, slab: Slab,
               keep_probabilities: bool) -> tuple[SlabResult, np.ndarray]:
    """The task: one slab's result, and its core pages' image sections for the overlay."""
    from .distributed import worker_plugin
    plugin = worker_plugin(plugin_name)
    engine = OrthoPlanes(plugin.predictor(), voxel, combine=combine, memory_mb=memory_mb)
    with plugin.open_source(path, pixel_size_nm) as source:
        pages = source_reader(source)(slab.lo, slab.hi)
    result = engine.predict_slab(pages, slab, keep_probabilities=keep_probabilities)
    return result, pages[slab.start - slab.lo:slab.stop - slab.lo]


def predict_volume_files_distributed(client, model, paths: list[Path], outdir: Path, *, options: dict,
                                     pixel_size_nm=None, voxel_size_nm=None, combine: str = "mean",
                                     memory_mb: float = DEFAULT_MEMORY_MB, probabilities: bool = False,
                                     overlay: bool = True, overwrite: bool = False, fmt: str = "tif",
                                     progress_for: Callable[[Path], VolumeProgress] | None = None,
                                     ) -> Iterator[tuple[Path, object]]:
    """Ortho-plane prediction of ``paths`` on the cluster of ``client``, one task per slab; yields
    ``(path, FileResult or EmsegError)`` per input, in order. ``options``: the Predictor's keywords;
    ``progress_for(path)``: the progress callback of one input."""
    from .distributed import check_options, register_model
    planner = check_options(model, options)
    name = register_model(client, model, options)
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
    try:
        for path in paths:
            try:
                yield path, _distributed_file(client, name, planner, path, outdir, max(1, threads),
                                              pixel_size_nm=pixel_size_nm, voxel_size_nm=voxel_size_nm,
                                              combine=combine, memory_mb=memory_mb, probabilities=probabilities,
                                              overlay=overlay, overwrite=overwrite, fmt=fmt,
                                              progress=progress_for(path) if progress_for else None)
            except EmsegError as exc:
                yield path, exc
    finally:
        try:
            client.unregister_worker_plugin(name)
        except Exception as exc:  # noqa: BLE001 - best effort; the cluster may be gone
            log.debug("could not unregister %s: %s", name, exc)


def _distributed_file(client, name, planner, path, outdir, window, *, pixel_size_nm, voxel_size_nm, combine,
                      memory_mb, probabilities, overlay, overwrite, fmt, progress) -> FileResult:
    import distributed

    def slabs(source, engine: OrthoPlanes, out: VolumeOutput) -> None:
        plan = engine.plan(source.shape, source.dtype.itemsize)
        total, done = engine.work(source.shape, plan), 0.0
        px = source.pixel_size_nm if voxel_size_nm is None else engine.voxel[2]
        queue: collections.deque = collections.deque()
        todo = iter(plan)
        try:
            while True:
                for slab in todo:
                    queue.append((slab, client.submit(_slab_task, name, str(path), px, engine.voxel, combine,
                                                      memory_mb, slab, probabilities, pure=False, retries=2)))
                    if len(queue) >= window:
                        break
                if not queue:
                    return
                slab, future = queue.popleft()
                try:
                    result, pages = future.result()
                except distributed.KilledWorker as exc:
                    raise EmsegError(f"{path}: pages {slab.start + 1}-{slab.stop} failed on the cluster: "
                                     f"{exc}") from exc
                out.record_image(slab.start, pages)
                out.write(result)
                done += engine.work(source.shape, [slab])
                if progress is not None:
                    progress(done, total, f"slab {plan.index(slab) + 1}/{len(plan)}")
        finally:
            for _, future in queue:
                future.cancel()

    return _predict_file(path, outdir, planner, slabs, pixel_size_nm=pixel_size_nm, voxel_size_nm=voxel_size_nm,
                         combine=combine, memory_mb=memory_mb, probabilities=probabilities, overlay=overlay,
                         overwrite=overwrite, fmt=fmt)


# ---------------------------------------------------------------- the command

def cmd_predict_ortho(args: argparse.Namespace, paths: list[Path], model, failed: int = 0) -> int:
    """What ``emseg predict --planes ortho`` does: every input, here or on a cluster; logs; exit code."""
    from tqdm.auto import tqdm

    from .cli import _finish_predict, _measure_output
    from .distributed import finished
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
            from .distributed import connect
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
            tables.append(_measure_output(args, path, outcome.outputs.mask, model.classes))
    return _finish_predict(args, tables, failed)
