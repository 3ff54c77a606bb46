"""Self-training: the lab's unlabelled pages, labelled by the model itself, join its few annotated ones.

A run with unlabelled pages is two runs of :func:`emseg.train.loop.train`. The first (the *teacher*, half of the
steps or of the time limit) learns from the annotated pages alone. The teacher then labels the unlabelled pages
(pseudo-labels, Lee 2013): the class it gives each pixel where its top probability is at least ``confidence``
(0.9), the rest left unannotated. The second run (the *student*) starts from the teacher's weights and learns the
rest of the steps from both, the annotated pages drawn as often as all the pseudo-labelled ones together (per
annotated pixel), with the same augmentation (Xie et al. 2020's noisy student, the EM augmentation as the noise).
Both runs validate on the same held-out strips of the annotated pages.

Measured on ISBI, EPFL and NASA with two annotated slices in docs/training.md ("Tenth attempt", "Eleventh attempt"):
an option, not a default.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from emseg.analysis.metrics import IGNORE
from emseg.errors import InputError
from emseg.train.data import Annotated, normalise01, rescale_items, split_regions
from emseg.train.loop import TrainConfig, TrainEvent, TrainResult, train
from emseg.train.pretrain import MAX_PIXELS, _even_pages, _refuse_mask, unlabelled_files

log = logging.getLogger(__name__)

#: pixels the teacher gives a class with less than this probability stay unannotated (ISBI seed 0: 0.9 gained more
#: membrane IoU than 0, every pixel labelled, which gave the better Rand error; docs/training.md, "Tenth attempt")
CONFIDENCE = 0.9
#: the teacher's share of the run's steps (or of its time limit)
TEACHER_SHARE = 0.5
#: added to the run's seed for the student's crops
STUDENT_SEED = 1000


@dataclass
class RawPage:
    """An unlabelled page as read (raw grey values), its pixel size and a name for messages."""

    image: np.ndarray
    pixel_size_nm: float | None
    name: str


def load_raw_pages(paths: Sequence[str | Path], *, pixel_size_nm: float | None = None,
                   max_pixels: int = MAX_PIXELS) -> list[RawPage]:
    """The pages of unlabelled images (files, folders, globs; stacks included) for self-training: at most
    ``max_pixels`` pixels (pretraining's budget), pages taken evenly from every input. InputError (naming the file)
    for no images and a file that looks like a mask."""
    from emseg.io.read import open_image
    files = unlabelled_files(paths, purpose="learn from", flag="--unlabelled")
    shapes = []
    for path in files:
        with open_image(path, pixel_size_nm=pixel_size_nm) as src:
            shapes.append(src.shape)
    keep = min(1.0, max_pixels / max(sum(p * h * w for p, h, w in shapes), 1))
    pages = []
    for path, (n, _, _) in zip(files, shapes):
        with open_image(path, pixel_size_nm=pixel_size_nm) as src:
            for i in _even_pages(n, keep):
                page = np.asarray(src.page(i))
                _refuse_mask(page, path, i, n, what="self-training learns")
                pages.append(RawPage(page, src.pixel_size_nm, f"{path.name}[{i}]" if src.is_stack else path.name))
    if keep < 1:
        log.info("self-training on %d of the unlabelled pages (at most %.0f megapixels)", len(pages), max_pixels / 1e6)
    return pages


def unannotated_pages(image, labels: np.ndarray, *, pixel_size_nm: float | None = None, name: str = "layer",
                      max_pixels: int = MAX_PIXELS) -> list[RawPage]:
    """The pages of a stack (numpy or dask) whose labels hold no annotation (napari: the slices not painted), at most
    ``max_pixels`` pixels of them, taken evenly. InputError where there are none."""
    free = [i for i in range(labels.shape[0]) if not np.any(labels[i])] if labels.ndim == 3 else []
    if not free:
        raise InputError(f"{name}: self-training learns from the slices of a stack that have no annotation, and "
                         "this one has none; open the whole stack, or train without self-training")
    h, w = labels.shape[-2:]
    keep = min(1.0, max_pixels / (len(free) * h * w))
    return [RawPage(np.asarray(image[free[k]]), pixel_size_nm, f"{name}[{free[k]}]")
            for k in _even_pages(len(free), keep)]


def pseudo_labelled(model, pages: Sequence[RawPage], *, confidence: float = CONFIDENCE, balanced: bool = False,
                    device: str = "auto", stop: threading.Event | None = None) -> tuple[list[Annotated], float]:
    """The model's own labels of raw pages as training pages at its pixel size: the most probable class where its
    probability is at least ``confidence``, IGNORE elsewhere; and the share of pixels labelled.

    ``balanced`` (class-balanced self-training, Zou et al. 2018): the same share of pixels labelled, but the same
    share of every class's pixels (the most sure of each, over all pages), so that a class the model is less sure
    of (thin membranes beside wide cell interiors) is not left out of its own labels."""
    predictor = model.predictor(device=device)
    guesses = []  # (class, top probability) a page; the probability is kept only where ``balanced`` needs all pages
    for page in pages:
        if stop is not None and stop.is_set():
            break
        probs = predictor.predict_page(page.image, pixel_size_nm=page.pixel_size_nm)
        target, sure = probs.argmax(0).astype(np.uint8), probs.max(0).astype(np.float32, copy=False)
        if not balanced:
            target[sure < confidence] = IGNORE
        guesses.append((target, sure if balanced else None))
    if balanced:
        thresholds = _balanced_thresholds(guesses, confidence)
        for target, sure in guesses:
            target[sure < thresholds[target]] = IGNORE
    items, labelled, total = [], 0, 0
    for page, (target, _) in zip(pages, guesses):
        labelled, total = labelled + int(np.count_nonzero(target != IGNORE)), total + target.size
        items.append(Annotated(normalise01(page.image, model.card.normalization), target,
                               f"{page.name} (own labels)", page.pixel_size_nm))
    return rescale_items(items, model.card.pixel_size_nm), labelled / max(total, 1)


def _balanced_thresholds(guesses: Sequence[tuple[np.ndarray, np.ndarray]], confidence: float) -> np.ndarray:
    """The probability each class needs (indexed by class, 256 entries): for each class the level that keeps the
    same share of its pixels (the surest of them) as ``confidence`` keeps of all pixels."""
    thresholds = np.full(256, confidence, dtype=np.float32)
    if not guesses:
        return thresholds
    sure = np.concatenate([s.ravel() for _, s in guesses])
    cls = np.concatenate([t.ravel() for t, _ in guesses])
    share = float(np.mean(sure >= confidence))
    for c in np.unique(cls):
        mine = sure[cls == c]
        thresholds[c] = np.quantile(mine, 1 - share) if share > 0 else np.inf
    return thresholds


def _student_config(config: TrainConfig, length: dict) -> TrainConfig:
    """The student's settings: the run's, for the rest of its length (``steps``, ``time_limit_minutes``), from the
    teacher as it is (no fresh parts, nothing frozen, no blending with the teacher)."""
    return replace(config, **length, seed=config.seed + STUDENT_SEED, head="keep",
                   fresh_decoder=False, freeze_encoder=False, freeze_encoder_steps=0, encoder_keep=1.0,
                   encoder_keep_levels=None, encoder_lr_scale=1.0, base_share=0.0)


def _split_length(config: TrainConfig, share: float) -> tuple[dict, dict]:
    """The teacher's and the student's ``steps`` and ``time_limit_minutes``."""
    minutes = config.time_limit_minutes
    if config.fills_time:
        return ({"steps": None, "time_limit_minutes": minutes * share},
                {"steps": None, "time_limit_minutes": minutes * (1 - share)})
    first = max(1, round(config.steps * share))
    return ({"steps": first, "time_limit_minutes": minutes * share if minutes else None},
            {"steps": max(1, config.steps - first), "time_limit_minutes": minutes * (1 - share) if minutes else None})


def self_train(data: Sequence[Annotated], unlabelled: Sequence[RawPage], config: TrainConfig,
               out_dir: str | Path | None = None, *, base=None, val_data: Sequence[Annotated] | None = None,
               confidence: float = CONFIDENCE, balanced: bool = False, teacher_share: float = TEACHER_SHARE,
               preview_image: np.ndarray | None = None, progress: Callable[[TrainEvent], None] | None = None,
               stop: threading.Event | None = None, resume: bool = False) -> TrainResult:
    """Train (or fine-tune ``base``) on annotated pages and on unlabelled pages labelled by the model itself (see
    the module docstring). The teacher's run goes to ``out_dir/teacher``, the student's (the result) to
    ``out_dir``; ``resume`` continues either. ``progress`` sees both runs, the student's steps after the
    teacher's (``preview_image``: as for train). Stopped during the teacher's run, the teacher is the result."""
    if not unlabelled:
        raise InputError("no unlabelled pages to learn from; give images without masks, or train without them")
    if not 0 <= confidence < 1:
        raise ValueError(f"confidence must be at least 0 and below 1, got {confidence}")
    if not 0 < teacher_share < 1:
        raise ValueError(f"teacher_share must be between 0 and 1, got {teacher_share}")
    out = Path(out_dir) if out_dir is not None else None
    if val_data is None:  # one split for both runs: the student never trains on the teacher's held-out pixels
        data, val_data = split_regions(data, config.val_fraction)
    first, rest = _split_length(config, teacher_share)
    teacher_config = replace(config, name=f"{config.name} (teacher)", **first)
    offset = {"steps": 0}

    def relay(event: TrainEvent) -> None:
        if progress is not None:
            total = event.total_steps + (offset["steps"] or (rest["steps"] or event.total_steps))
            progress(replace(event, step=event.step + offset["steps"], total_steps=total))

    teacher = train(data, teacher_config, out / "teacher" if out else None, base=base, val_data=val_data,
                    preview_image=preview_image, progress=relay, stop=stop, resume=resume)
    if teacher.stopped:
        if out is not None:
            teacher = replace(teacher, model_path=teacher.model.save(out / "model.safetensors"))
        return teacher
    log.info("labelling %d unlabelled page(s) with the model's own predictions (where at least %g sure)",
             len(unlabelled), confidence)
    pseudo, share = pseudo_labelled(teacher.model, unlabelled, confidence=confidence, balanced=balanced,
                                   device=config.device, stop=stop)
    pseudo = [it for it in pseudo if it.annotated]
    real = sum(it.annotated for it in data)
    weight = max(1.0, sum(it.annotated for it in pseudo) / max(real, 1))
    log.info("%.0f %% of the unlabelled pixels labelled; the annotated pages drawn %.1f times as often per pixel",
             100 * share, weight)
    offset["steps"] = teacher.history[-1]["step"] if teacher.history else 0
    student = train([replace(it, sampling_weight=it.sampling_weight * weight) for it in data] + pseudo,
                    _student_config(config, rest), out, base=teacher.model, val_data=val_data,
                    preview_image=preview_image, progress=relay, stop=stop, resume=resume)
    record = {"unlabelled_pages": len(unlabelled), "confidence": confidence, "balanced": balanced,
              "labelled_share": round(share, 4),
              "teacher_steps": offset["steps"], "annotated_weight": round(weight, 2)}
    model = student.model
    # the student starts from the teacher, a part of this run: the card says where the teacher started
    origin = {k: v for k, v in (teacher.model.card.training or {}).items()
              if k in ("pretrained_from", "fine_tuned_from")}
    kept = {k: v for k, v in (model.card.training or {}).items() if k != "fine_tuned_from"}
    model.card = model.card.updated(training={**kept, **origin, "self_training": record})
    path = model.save(out / "model.safetensors") if out is not None else None
    return replace(student, model=model, model_path=path)
