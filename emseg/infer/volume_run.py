"""``emseg predict --planes ortho``: ortho-plane segmentation of stacks, file to file, here or on a cluster.

For an input ``NAME.EXT`` (a 3D stack) it writes what ``emseg predict`` writes (see
:mod:`emseg.infer.runner`), from the combined xy, xz and yz planes (:mod:`emseg.infer.volume`):

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

import collections
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from emseg.errors import EmsegError
from emseg.infer.predictor import labels_dtype
from emseg.infer.runner import FileResult, OutputPaths
from emseg.infer.volume import DEFAULT_MEMORY_MB, OrthoPlanes, Slab, SlabResult, check_volume, source_reader
from emseg.io.read import open_image
from emseg.io.write import write_overlay_png
from emseg.io.zarr_store import stack_writer

log = logging.getLogger(__name__)

# (megapixels done, megapixels total, text)
VolumeProgress = Callable[[float, float, str], None]


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
    from emseg.infer.distributed import worker_plugin
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
    from emseg.infer.distributed import check_options, register_model
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
