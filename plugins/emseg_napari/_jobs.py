"""What the widgets run in their worker threads, without Qt: segmentation and fine-tuning jobs.

Each job takes plain data (arrays, paths, numbers), reports progress through plain callbacks,
stops when a ``threading.Event`` is set, and never raises: it returns an :class:`Outcome` whose
``error`` is a message for the user (see :func:`emseg_napari._utils.describe_error`). The widgets
adapt the callbacks to their progress bars and show the outcome as layers and notifications.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emseg.train import FINETUNE_DEFAULTS

from ._utils import Cancelled, describe_error, scale_mismatch

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """A job's end: ``value`` when it worked, ``error`` (a message) when not, or ``cancelled``."""

    value: Any = None
    error: str | None = None
    cancelled: bool = False


def run_job(job: Callable[[], Any], doing: str) -> Outcome:
    """Run ``job`` and turn every exception into an :class:`Outcome` (logged with its traceback)."""
    try:
        return Outcome(value=job())
    except Cancelled:
        return Outcome(cancelled=True)
    except Exception as exc:  # noqa: BLE001 - shown to the user, the viewer must survive
        log.exception("%s failed", doing)
        return Outcome(error=describe_error(exc, doing))


# -- segmentation ----------------------------------------------------------------------------

@dataclass
class SegmentRequest:
    """What to segment: ``image`` is 2D or 3D (numpy or dask); ``pages`` None means all pages."""

    model_path: Path
    image: Any
    pages: list[int] | None = None
    pixel_size_nm: float | None = None
    tile: int | None = None
    overlap: int | None = None
    tta: bool = False
    device: str = "auto"
    batch_size: int = 4
    probabilities: bool = False
    objects: ObjectOptions | None = None
    measure_pixel_size_nm: float | None = None
    ortho: bool = False  # the whole volume through its xy, xz and yz planes (emseg.infer.volume)
    voxel_size_nm: tuple[float, float, float] | None = None  # needed with ortho
    combine: str = "mean"


@dataclass(frozen=True)
class ObjectOptions:
    """How to turn the segmented classes into objects (see :func:`emseg.analysis.objects.find_instances`)."""

    split: bool = False
    min_size_px: int = 0
    fill_holes: bool = False
    exclude_border: bool = True
    classes: tuple[str, ...] | None = None  # class names to find objects of; None: every foreground class


@dataclass
class ObjectsResult:
    """Objects of the segmented pages and their measurements.

    ``features`` has one row per label value, row 0 for the background, as napari's Labels layer
    wants its features; ``columns`` the same without the background row (the CSV of ``emseg
    measure``); ``summary`` the per-class rows of :func:`emseg.analysis.measure.summarize`.
    """

    instances: Any
    table: Any
    columns: dict[str, np.ndarray]
    features: Any
    summary: list[dict]


@dataclass
class SegmentResult:
    """Labels ``(len(pages), H, W)`` (``(H, W)`` for a 2D image) and optional probabilities."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    pages: list[int] | None
    classes: tuple[str, ...]
    model_path: Path
    seconds: float
    device: str
    objects: ObjectsResult | None = None


def segment(request: SegmentRequest, load_model: Callable[[Path], Any], *,
            progress: Callable[[float, str], None] | None = None,
            stop: threading.Event | None = None) -> SegmentResult:
    """Segment the requested pages; ``progress(fraction, text)``; raises :class:`Cancelled` on stop."""
    from emseg.infer.predictor import labels_dtype
    from emseg.io.read import array_source

    start = time.perf_counter()
    model = load_model(request.model_path)
    predictor = model.predictor(tile=request.tile, overlap=request.overlap, tta=request.tta,
                                device=request.device, batch_size=request.batch_size)
    if request.ortho:
        return _segment_volume(request, model, predictor, start, progress, stop)
    image = request.image
    is_stack = image.ndim == 3
    pages = request.pages if (is_stack and request.pages is not None) else (
        list(range(image.shape[0])) if is_stack else None)
    source = array_source(image[pages] if pages is not None and len(pages) < image.shape[0] else image,
                          pixel_size_nm=request.pixel_size_nm, name="image layer")
    n = len(source)
    dtype = labels_dtype(model.card.num_classes)
    labels = np.zeros(source.shape, dtype)
    probs = (np.zeros((n, model.card.num_classes, *source.shape[1:]), np.float32)
             if request.probabilities else None)

    def on_tiles(i: int, done: int, total: int) -> None:
        if stop is not None and stop.is_set():
            raise Cancelled()
        if progress is not None:
            page = pages[i] + 1 if pages is not None else 1
            progress((i + done / max(total, 1)) / n, f"page {page}: tile {done}/{total}")

    for result in predictor.iter_pages(source, keep_probabilities=request.probabilities, progress=on_tiles):
        labels[result.index] = result.labels
        if probs is not None:
            probs[result.index] = result.probabilities
        if stop is not None and stop.is_set():
            raise Cancelled()
    if not is_stack:
        labels = labels[0]
        probs = probs[0] if probs is not None else None
    objects = None
    if request.objects is not None:
        if progress is not None:
            progress(1.0, "finding and measuring objects…")
        pixels = np.asarray(image[pages] if pages is not None and len(pages) < image.shape[0] else image)
        objects = measure_segmentation(labels, pixels, model.card.classes, request.measure_pixel_size_nm,
                                       request.objects, pages=pages if is_stack else None)
    return SegmentResult(labels, probs, pages, model.card.classes, request.model_path,
                         time.perf_counter() - start, str(predictor.device), objects)


def _segment_volume(request: SegmentRequest, model, predictor, start: float, progress, stop) -> SegmentResult:
    """The whole volume with ortho-plane inference; objects connected and measured in 3D."""
    from emseg.infer.volume import predict_volume

    def on_progress(done: float, total: float, text: str) -> None:
        if stop is not None and stop.is_set():
            raise Cancelled()
        if progress is not None:
            progress(done / max(total, 1e-9), f"ortho-plane: {text}")

    out = predict_volume(predictor, request.image, voxel_size_nm=request.voxel_size_nm, combine=request.combine,
                         return_probabilities=request.probabilities, progress=on_progress, name="image layer")
    labels, probs = out if request.probabilities else (out, None)
    objects = None
    if request.objects is not None:
        if progress is not None:
            progress(1.0, "finding and measuring 3D objects…")
        objects = measure_segmentation(labels, np.asarray(request.image), model.card.classes,
                                       request.measure_pixel_size_nm, request.objects, three_d=True,
                                       voxel_size_nm=request.voxel_size_nm)
    return SegmentResult(labels, probs, None, model.card.classes, request.model_path, time.perf_counter() - start,
                         str(predictor.device), objects)


def measure_segmentation(labels: np.ndarray, image: np.ndarray | None, classes: Sequence[str],
                         pixel_size_nm: float | None, options: ObjectOptions, *, pages: Sequence[int] | None = None,
                         name: str = "image layer", three_d: bool = False,
                         voxel_size_nm: Sequence[float] | None = None) -> ObjectsResult:
    """Objects of every foreground class of ``labels`` (per slice for a stack) and their measurements
    in nm (px when ``pixel_size_nm`` is None), as ``emseg predict --instances --measure`` makes them.
    ``pages``: the stack slices that ``labels`` holds, so that the ``slice`` column names them.
    ``three_d``: objects connected across slices, with their volume, surface and bounding box
    (in nm with ``voxel_size_nm``)."""
    import pandas as pd

    from emseg.analysis.measure import measure_objects, object_columns, summarize
    from emseg.analysis.objects import find_instances

    class_ids = [list(classes).index(c) for c in options.classes] if options.classes else None
    instances = find_instances(labels, split=options.split, min_size_px=options.min_size_px,
                               fill_holes=options.fill_holes, class_ids=class_ids, three_d=three_d)
    table = measure_objects(instances, image=image, pixel_size_nm=pixel_size_nm, class_names=classes, name=name,
                            voxel_size_nm=voxel_size_nm)
    if pages is not None:
        table.data["slice"] = np.asarray(pages)[table.data["slice"]]
    columns = object_columns(table)
    background = {k: (0 if k in ("label", "class_index", "slice", "n_slices") or k.startswith("bbox_") else
                      "background" if k == "class" else False if k == "touches_border" else np.nan)
                  for k in columns}
    features = pd.concat([pd.DataFrame([background]), pd.DataFrame(columns)], ignore_index=True)
    features["touches_border"] = features["touches_border"].astype(bool)
    summary = [row for row in summarize([table], exclude_border=options.exclude_border)
               if not options.classes or row["class"] in options.classes]
    return ObjectsResult(instances, table, columns, features, summary)


def class_fractions(labels: np.ndarray, classes: Sequence[str]) -> str:
    """``membrane 13.2 %, mitochondrion 3.1 %`` for the non-background classes."""
    counts = np.bincount(labels.ravel(), minlength=len(classes))
    total = max(int(labels.size), 1)
    return ", ".join(f"{name} {100 * counts[k] / total:.1f} %" for k, name in enumerate(classes) if k)


# -- fine-tuning -----------------------------------------------------------------------------

@dataclass
class FinetuneRequest:
    """A fine-tuning run: ``base_path`` None trains a new model with ``encoder``.

    ``labels`` has the image's shape; sparse: 0 = not annotated, k = class k - 1; dense: class
    indices. ``preview_page`` is a raw 2D page predicted at every validation.
    """

    image: Any
    labels: np.ndarray
    classes: tuple[str, ...]
    out_path: Path
    base_path: Path | None = None
    encoder: str | None = None
    sparse: bool = True
    steps: int = FINETUNE_DEFAULTS["steps"]
    batch_size: int = 4
    tile_size: int = 256
    lr: float | None = None  # None: FINETUNE_DEFAULTS, by whether the classes change (a new model: 1e-3)
    val_every: int = 50
    device: str = "auto"
    freeze_encoder: bool = False
    base_share: float | None = None  # None: FINETUNE_DEFAULTS' share of the base's weights when its classes are kept
    pixel_size_nm: float | None = None
    preview_page: np.ndarray | None = None
    name: str = "fine-tuned"
    layer_name: str = "layer"
    extra: dict = field(default_factory=dict)
    planes: str = "xy"  # "ortho": pages from the xy, xz and yz planes of the annotated volume (emseg.train.volume)
    voxel_size_nm: tuple[float, float, float] | None = None  # needed with ortho
    self_train: bool = False  # also learn from the stack's unannotated slices, labelled by the model (selftrain)


@dataclass
class FinetuneResult:
    path: Path | None
    classes: tuple[str, ...]
    steps_done: int
    held_out_iou: float | None  # the saved model's validation mean IoU
    stopped: bool
    seconds: float
    base_share: float | None = None  # the share of the base's weights averaged into the result (None: none)


def check_annotations(labels: np.ndarray, classes: Sequence[str], *, sparse: bool, name: str) -> None:
    """Raise InputError when nothing is annotated or a label has no class."""
    from emseg.errors import InputError
    top = int(labels.max()) if labels.size else 0
    if sparse and top == 0:
        raise InputError(f"{name}: nothing is painted yet. Paint a few strokes of each class "
                         f"(label 1 = {classes[0]}, 2 = {classes[1] if len(classes) > 1 else '...'}; "
                         "0 = not annotated), then start again")
    limit = len(classes) if sparse else len(classes) - 1
    if top > limit:
        raise InputError(f"{name}: label {top} is painted but only {len(classes)} classes are defined "
                         f"(labels {'1' if sparse else '0'}..{limit}); add a class in the table or erase "
                         "that label")
    if labels.min() < 0:
        raise InputError(f"{name}: holds negative labels; erase them (label 0) first")


def annotated_pages(image: Any, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Only the pages with annotations, as numpy arrays (a stack stays a stack)."""
    if labels.ndim == 2:
        return np.asarray(image), np.asarray(labels)
    keep = [i for i in range(labels.shape[0]) if np.any(labels[i])]
    keep = keep or [0]
    return np.stack([np.asarray(image[i]) for i in keep]), np.asarray(labels)[keep]


def finetune(request: FinetuneRequest, *, progress: Callable[[Any], None] | None = None,
             stop: threading.Event | None = None) -> FinetuneResult:
    """Train on the annotations and save the model to ``request.out_path`` (the base stays untouched)."""
    from emseg.errors import InputError
    from emseg.model.modelfile import load_model
    from emseg.train.data import rescale_items
    from emseg.train.loop import (
        TrainConfig,
        annotations_from_arrays,
        finetune_base_share,
        finetune_lr,
        is_new_task,
        train,
    )

    start = time.perf_counter()
    if request.labels.shape != tuple(request.image.shape):
        raise InputError(f"{request.layer_name}: the annotations have shape {request.labels.shape} but the "
                         f"image has {tuple(request.image.shape)}; paint on a Labels layer of the image's "
                         "shape (press 'New scribble layer')")
    check_annotations(request.labels, request.classes, sparse=request.sparse, name=request.layer_name)
    base = load_model(request.base_path) if request.base_path is not None else None
    norm = base.card.normalization if base is not None else None
    val_items = None
    if request.planes == "ortho":
        from emseg.model.card import Normalization
        from emseg.train.volume import volume_splits
        items, val_items = volume_splits(np.asarray(request.image), request.labels, 0.2,
                                         voxel_size_nm=request.voxel_size_nm, sparse=request.sparse,
                                         norm=norm or Normalization(), name=request.layer_name)
    else:
        image, labels = annotated_pages(request.image, request.labels)
        items = annotations_from_arrays(image, labels, sparse=request.sparse, pixel_size_nm=request.pixel_size_nm,
                                        name=request.layer_name, norm=norm)
    preview = request.preview_page
    new_task = is_new_task(base, request.classes)  # other classes: the layer's own pixel size, a new-task rate
    model_nm = base.card.pixel_size_nm if base is not None and not new_task else None
    factor = 1.0
    mismatch = scale_mismatch(request.pixel_size_nm, model_nm)
    if mismatch:
        log.warning("%s: %s; the fine-tuned model is for %.3g nm/px", request.layer_name, mismatch,
                    request.pixel_size_nm)
        from emseg.model.modelfile import Model
        base = Model(base.net, base.card.updated(pixel_size_nm=request.pixel_size_nm), base.path)  # a relabelled copy
    elif model_nm and request.pixel_size_nm:
        items = rescale_items(items, model_nm)
        val_items = rescale_items(val_items, model_nm) if val_items is not None else None
        factor = request.pixel_size_nm / model_nm
    if preview is not None and abs(factor - 1) > 0.02:
        preview = _resize_page(np.asarray(preview, np.float32), factor)
    encoder = base.card.encoder if base is not None else (request.encoder or "vgg11_bn_slim")
    config = TrainConfig(encoder=encoder, classes=tuple(request.classes), sparse=request.sparse,
                         tile_size=request.tile_size, batch_size=request.batch_size, steps=request.steps,
                         val_every=max(1, request.val_every), device=request.device,
                         lr=request.lr or finetune_lr(base, request.classes),
                         freeze_encoder=request.freeze_encoder,
                         base_share=(finetune_base_share(base, request.classes) if request.base_share is None
                                     else request.base_share),
                         pixel_size_nm=request.pixel_size_nm if base is None or new_task else None, name=request.name)
    steps_done = 0
    shape = None if request.preview_page is None else request.preview_page.shape

    def on_event(event) -> None:
        nonlocal steps_done
        steps_done = event.step
        if event.preview is not None and shape is not None and event.preview.shape != shape:
            event.preview = _resize_labels(event.preview, shape)
        if progress is not None:
            progress(event)

    if request.self_train:
        from emseg.train.selftrain import self_train, unannotated_pages
        if request.planes == "ortho":
            raise InputError(f"{request.layer_name}: self-training learns from unannotated xy slices; untick "
                             "'learn from all three planes' to use it")
        pages = unannotated_pages(request.image, request.labels, pixel_size_nm=request.pixel_size_nm,
                                  name=request.layer_name)
        result = self_train(items, pages, config, None, base=base, val_data=val_items, preview_image=preview,
                            progress=on_event, stop=stop)
    else:
        result = train(items, config, None, base=base, val_data=val_items, preview_image=preview,
                       progress=on_event, stop=stop)
    if steps_done == 0:
        return FinetuneResult(None, result.model.classes, 0, None, True, time.perf_counter() - start)
    if not request.out_path.parent.exists():
        request.out_path.parent.mkdir(parents=True, exist_ok=True)
    path = result.model.save(request.out_path)
    log.info("saved %s after %d steps (best mean IoU %s)", path, steps_done, result.best_metric)
    training = result.model.card.training
    validation = (training.get("validation") or {}).get("mean_iou")
    return FinetuneResult(path, result.model.classes, steps_done, validation, result.stopped,
                          time.perf_counter() - start, (training.get("base_share") or {}).get("chosen"))


def _resize_page(page: np.ndarray, factor: float) -> np.ndarray:
    from emseg.infer.preprocess import resize, scaled_shape
    return resize(page, scaled_shape(page.shape, factor)).numpy()


def _resize_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D label image to ``shape``."""
    rows = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1).astype(int)
    return labels[rows][:, cols]


# -- pretraining -----------------------------------------------------------------------------

@dataclass
class PretrainRequest:
    """Self-supervised pretraining (:mod:`emseg.train.pretrain`) on an image layer, into the run folder
    ``out_dir`` (model.safetensors, curves.png, restorations.png, a checkpoint)."""

    image: Any
    out_dir: Path
    minutes: float | None  # None: no time limit (then steps)
    steps: int | None = None  # with minutes: at most this many; alone: exactly this many
    encoder: str | None = None  # None here and below: PretrainConfig's default
    objective: str | None = None  # restoration, masked or contrastive (emseg.train.pretrain.OBJECTIVES)
    tile_size: int | None = None
    batch_size: int | None = None
    val_every: int | None = None
    device: str = "auto"
    pixel_size_nm: float | None = None
    name: str = "pretrained"
    layer_name: str = "image layer"


@dataclass
class PretrainJobResult:
    path: Path | None
    steps_done: int
    stopped: bool
    seconds: float
    validation_loss: float | None
    copy_loss: float | None
    restorations: Path | None  # restorations.png, or features.png of the contrastive objective
    objective: str = "restoration"


def pretrain_layer(request: PretrainRequest, *, progress: Callable[[Any], None] | None = None,
                   stop: threading.Event | None = None) -> PretrainJobResult:
    """Pretrain on the layer's pages; ``progress(TrainEvent)`` after every step; Stop saves what was learnt."""
    from emseg.train.pretrain import PretrainConfig, pretrain, unlabelled_from_arrays

    start = time.perf_counter()
    chosen = {key: value for key, value in (("encoder", request.encoder), ("objective", request.objective),
                                            ("tile_size", request.tile_size),
                                            ("batch_size", request.batch_size), ("val_every", request.val_every))
              if value is not None}
    config = PretrainConfig(time_limit_minutes=request.minutes, steps=request.steps, device=request.device,
                            pixel_size_nm=request.pixel_size_nm, name=request.name, **chosen)
    pages = unlabelled_from_arrays(request.image, tile=config.crop_size, pixel_size_nm=request.pixel_size_nm,
                                   name=request.layer_name)
    steps_done = 0

    def on_event(event) -> None:
        nonlocal steps_done
        steps_done = event.step
        if progress is not None:
            progress(event)

    result = pretrain(pages, config, request.out_dir, progress=on_event, stop=stop, sources=[request.layer_name])
    last = result.history[-1] if result.history else {}
    restorations = request.out_dir / ("features.png" if config.objective == "contrastive" else "restorations.png")
    return PretrainJobResult(result.model_path if steps_done else None, steps_done, result.stopped,
                             time.perf_counter() - start, last.get("val_loss"), last.get("copy_loss"),
                             restorations if restorations.exists() else None, config.objective)
