"""File-to-file prediction: what ``emseg predict`` does for each input.

For an input ``NAME.EXT`` it writes, into the output folder:

* ``NAME_mask.tif``: class labels, same pages as the input (2D for a 2D image), the input's pixel
  size in the metadata, zlib-compressed, BigTIFF when large;
* ``NAME_probs.tif`` (optional): float32 probabilities ``(pages, classes, H, W)`` (``(classes, H, W)`` for a 2D input);
* ``NAME_overlay.png`` (optional): a small preview of the middle page with the mask over it.

Every file is written under a temporary name and renamed when complete, so a killed run never
leaves a finished-looking mask. The outputs of one input are one unit: the mask is renamed last, so
its presence says the others were written before it. A re-run skips an input whose outputs all exist
(unless overwriting), makes only the overlay again when that alone is missing, and otherwise
segments the input again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emseg.errors import InputError
from emseg.infer.predictor import Predictor, labels_dtype
from emseg.infer.preprocess import check_rescale
from emseg.io.read import open_image
from emseg.io.write import write_overlay_png
from emseg.io.zarr_store import stack_writer

log = logging.getLogger(__name__)

# (page_index, pages_total, tiles_done, tiles_total, page_megapixels)
FileProgress = Callable[[int, int, int, int, float], None]


@dataclass(frozen=True)
class OutputPaths:
    mask: Path
    probabilities: Path
    overlay: Path

    @classmethod
    def for_input(cls, path: Path, outdir: Path, fmt: str = "tif") -> "OutputPaths":
        stem = path.name
        for suffix in (".ome.tiff", ".ome.tif"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        else:
            stem = path.stem
        ext = {"tif": ".tif", "zarr": ".zarr"}[fmt]
        return cls(outdir / f"{stem}_mask{ext}", outdir / f"{stem}_probs{ext}", outdir / f"{stem}_overlay.png")

    def all(self) -> tuple[Path, ...]:
        return self.mask, self.probabilities, self.overlay


@dataclass(frozen=True)
class FileResult:
    """What happened to one input."""

    input: Path
    status: str  # "written", "skipped" (all outputs existed) or "completed" (a missing overlay was made)
    outputs: OutputPaths
    pages: int = 0
    seconds: float = 0.0
    megapixels: float = 0.0


def check_outputs(inputs: list[Path], outdir: Path, fmt: str = "tif") -> tuple[list[Path], list[InputError]]:
    """Leave out, before any work starts, the inputs whose outputs would overwrite an input or each other.

    Returns:
        The inputs that can run, and one error per input left out (all inputs whose outputs share a
        name are left out: which of them should win is not emseg's to guess).
    """
    resolved_inputs = {p.resolve() for p in inputs}
    owners: dict[Path, list[Path]] = {}
    problems: dict[Path, InputError] = {}
    for path in inputs:
        for out in OutputPaths.for_input(path, outdir, fmt).all():
            target = out.resolve()
            if target in resolved_inputs:
                problems.setdefault(path, InputError(
                    f"{path}: its output {out} would overwrite an input; choose another output folder (-o)"))
            owners.setdefault(target, []).append(path)
    for target, paths in owners.items():
        for path in paths:
            others = [str(p) for p in paths if p != path]
            if others:
                problems.setdefault(path, InputError(
                    f"{path}: its output {target.name} would also be written for {', '.join(others)} (same name); "
                    "predict them into separate output folders"))
    return [p for p in inputs if p not in problems], [problems[p] for p in inputs if p in problems]


def missing_outputs(outputs: OutputPaths, *, probabilities: bool, overlay: bool) -> list[Path]:
    """The outputs of one input that a run with these options writes and that do not exist yet."""
    wanted = [outputs.mask] + [outputs.probabilities] * probabilities + [outputs.overlay] * overlay
    return [p for p in wanted if not p.exists()]


def remake_overlay(path: Path, outputs: OutputPaths, classes, pixel_size_nm: float | None = None) -> bool:
    """Write the overlay of an input from its existing mask (no inference); False when they do not match."""
    with open_image(path, pixel_size_nm=pixel_size_nm) as source, open_image(outputs.mask) as mask:
        if mask.shape != source.shape:
            return False
        middle = len(source) // 2
        write_overlay_png(outputs.overlay, source.page(middle), mask.page(middle), class_names=classes)
    return True


def predict_file(predictor: Predictor, path: Path, outdir: Path, *, pixel_size_nm: float | None = None,
                 probabilities: bool = False, overlay: bool = True, overwrite: bool = False,
                 progress: FileProgress | None = None, fmt: str = "tif", voxel_size_nm=None) -> FileResult:
    """Segment one input file into ``outdir`` (see the module docstring). Raises InputError on bad input."""
    outputs = OutputPaths.for_input(path, outdir, fmt)
    start = time.perf_counter()
    if not overwrite:
        missing = missing_outputs(outputs, probabilities=probabilities, overlay=overlay)
        if not missing:
            log.info("%s: skipped, %s exists (use --overwrite to redo)", path, outputs.mask)
            return FileResult(path, "skipped", outputs)
        if missing == [outputs.overlay] and remake_overlay(path, outputs, predictor.card.classes, pixel_size_nm):
            log.info("%s: %s exists; made the missing %s", path, outputs.mask, outputs.overlay)
            return FileResult(path, "completed", outputs, seconds=time.perf_counter() - start)
        if outputs.mask.exists():
            log.info("%s: segmenting again, %s is missing", path, ", ".join(str(p) for p in missing))
    with open_image(path, pixel_size_nm=pixel_size_nm, voxel_size_nm=voxel_size_nm) as source:
        pages, height, width = source.shape
        page_shape = (pages, height, width) if source.is_stack else (height, width)
        num_classes = predictor.card.num_classes
        check_rescale(str(path), (height, width), source.pixel_size_nm, predictor.card.pixel_size_nm,
                      channels=num_classes + 1)
        prob_shape = (pages, num_classes, height, width) if source.is_stack else (num_classes, height, width)
        middle = pages // 2
        outdir.mkdir(parents=True, exist_ok=True)
        mask_writer = stack_writer(outputs.mask, shape=page_shape, dtype=labels_dtype(num_classes),
                                      pixel_size_nm=source.pixel_size_nm, z_spacing_nm=source.z_spacing_nm,
                                      metadata={"classes": list(predictor.card.classes)})
        prob_writer = (stack_writer(outputs.probabilities, shape=prob_shape, dtype=np.float32,
                                       pixel_size_nm=source.pixel_size_nm, z_spacing_nm=source.z_spacing_nm,
                                       metadata={"classes": list(predictor.card.classes)})
                       if probabilities else None)
        preview = None
        try:
            page_mp = height * width / 1e6
            tile_progress = ((lambda page, done, total: progress(page, pages, done, total, page_mp))
                             if progress else None)
            for result in predictor.iter_pages(source, keep_probabilities=probabilities, progress=tile_progress):
                mask_writer.write_page(result.labels)
                if prob_writer is not None:
                    prob_writer.write_page(result.probabilities)
                if result.index == middle and overlay:
                    preview = (source.page(middle), result.labels)
            # the mask last: once it exists, so do the input's other outputs
            if prob_writer is not None:
                prob_writer.close()
            if preview is not None:
                write_overlay_png(outputs.overlay, *preview, class_names=predictor.card.classes)
            mask_writer.close()
        except BaseException:
            mask_writer.abort()
            if prob_writer is not None:
                prob_writer.abort()
            raise
    seconds = time.perf_counter() - start
    return FileResult(path, "written", outputs, pages, seconds, pages * height * width / 1e6)
