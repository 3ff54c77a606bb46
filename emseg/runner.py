"""File-to-file prediction: what ``emseg predict`` does for each input.

For an input ``NAME.EXT`` it writes, into the output folder:

* ``NAME_mask.tif``: class labels, same pages as the input (2D for a 2D image), the input's pixel
  size in the metadata, zlib-compressed, BigTIFF when large;
* ``NAME_probs.tif`` (optional): float32 probabilities ``(pages, classes, H, W)`` (``(classes, H, W)`` for a 2D input);
* ``NAME_overlay.png`` (optional): a small preview of the middle page with the mask over it.

Every file is written under a temporary name and renamed when complete, so a killed run never
leaves a finished-looking mask; an input whose mask already exists is skipped unless overwriting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .inference import Predictor, labels_dtype
from .io import open_image, write_overlay_png
from .io_zarr import stack_writer

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
    status: str  # "written" or "skipped"
    outputs: OutputPaths
    pages: int = 0
    seconds: float = 0.0
    megapixels: float = 0.0


def check_outputs(inputs: list[Path], outdir: Path, fmt: str = "tif") -> None:
    """Refuse outputs that would overwrite an input or each other, before any work starts."""
    resolved_inputs = {p.resolve() for p in inputs}
    seen: dict[Path, Path] = {}
    for path in inputs:
        for out in OutputPaths.for_input(path, outdir, fmt).all():
            target = out.resolve()
            if target in resolved_inputs:
                raise InputError(f"{path}: its output {out} would overwrite an input; choose another output folder (-o)")
            if target in seen and seen[target] != path:
                raise InputError(f"{path}: its output {out} would also be written for {seen[target]} (same name); "
                                 "predict them into separate output folders")
            seen[target] = path


def predict_file(predictor: Predictor, path: Path, outdir: Path, *, pixel_size_nm: float | None = None,
                 probabilities: bool = False, overlay: bool = True, overwrite: bool = False,
                 progress: FileProgress | None = None, fmt: str = "tif", voxel_size_nm=None) -> FileResult:
    """Segment one input file into ``outdir`` (see the module docstring). Raises InputError on bad input."""
    outputs = OutputPaths.for_input(path, outdir, fmt)
    if outputs.mask.exists() and not overwrite:
        log.info("%s: skipped, %s exists (use --overwrite to redo)", path, outputs.mask)
        return FileResult(path, "skipped", outputs)
    start = time.perf_counter()
    with open_image(path, pixel_size_nm=pixel_size_nm, voxel_size_nm=voxel_size_nm) as source:
        pages, height, width = source.shape
        page_shape = (pages, height, width) if source.is_stack else (height, width)
        num_classes = predictor.card.num_classes
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
            if prob_writer is not None:
                prob_writer.close()
            mask_writer.close()
        except BaseException:
            mask_writer.abort()
            if prob_writer is not None:
                prob_writer.abort()
            raise
    if preview is not None:
        write_overlay_png(outputs.overlay, *preview, class_names=predictor.card.classes)
    seconds = time.perf_counter() - start
    return FileResult(path, "written", outputs, pages, seconds, pages * height * width / 1e6)
