"""Training and fine-tuning a U-Net on a few annotated pages.

:func:`train` samples random crops (biased towards annotated pixels), augments them, and
optimises Dice + cross-entropy with AdamW under a warm-up + cosine schedule, ignoring
unannotated pixels. Every ``val_every`` steps it measures per-class IoU/Dice on held-out pixels,
keeps the best weights, writes a resumable checkpoint, and stops early after ``patience``
validations without improvement. From a quarter into the run (at every validation until 90 % of
it) and at its end, it measures a systematic sub-pixel offset of the annotation on the held-out
pixels (emseg.alignment); where following the mean of those measurements scores better, the
training images are moved onto their annotation and the card keeps the offset for prediction. Progress is reported through a plain callback; a ``threading.Event``
stops the run, keeping the best model so far.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .alignment import estimate_offset, is_offset, shift_image, shift_probabilities
from .augment import AugmentConfig, build_transform
from .card import ModelCard, Normalization
from .checkpoint import check_run_folder, checkpoint_classes, has_checkpoint, load_checkpoint, save_checkpoint
from .dataset import Annotated, CropSampler, Prefetcher, arrays_to_items, check_classes, split_regions
from .errors import InputError
from .inference import resolve_device
from .metrics import IGNORE, boundary_class_of, confusion, scores
from .modelfile import Model
from .models import DEFAULT_ENCODER, build_unet
from .tiling import sliding_window

log = logging.getLogger(__name__)

#: fraction of a run after which the annotation's offset is measured and the training images moved
ALIGN_AT = 0.25
#: the images are moved again when the mean of the measurements differs from the last move by this much (pixels)
REALIGN_BY = 0.1
#: fraction of a run after which the images are not moved again (too few steps left to learn from them)
REALIGN_UNTIL = 0.9


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved with the run and summarised in the model card)."""

    encoder: str = DEFAULT_ENCODER
    full_resolution_skip: bool = True
    decoder_upsampling: str = "bilinear"
    classes: tuple[str, ...] | None = None
    sparse: bool = False
    tile_size: int = 256
    batch_size: int = 8
    steps: int = 2000
    val_every: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    patience: int = 10
    val_fraction: float = 0.2
    dice_weight: float = 1.0
    border_weight: float = 10.0
    border_sigma: float = 5.0
    label_offset: bool = True
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "auto"
    loader_workers: int = 0
    freeze_encoder: bool = False
    freeze_bn: bool | None = None
    pixel_size_nm: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    time_limit_minutes: float | None = None
    name: str = "emseg model"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d


@dataclass
class TrainEvent:
    """What the progress callback receives after every step."""

    step: int
    total_steps: int
    loss: float
    lr: float
    metrics: dict | None = None
    preview: np.ndarray | None = None
    best: bool = False


@dataclass
class TrainResult:
    model: Model
    model_path: Path | None
    history: list[dict]
    best_metric: float | None
    stopped: bool


def annotations_from_arrays(image, labels, *, sparse: bool = True, pixel_size_nm: float | None = None,
                            name: str = "layer", norm: Normalization | None = None) -> list[Annotated]:
    """Annotated pages from in-memory arrays (the napari plugin's layers); see :mod:`emseg.dataset`."""
    return arrays_to_items(image, labels, sparse=sparse, norm=norm or Normalization(),
                           pixel_size_nm=pixel_size_nm, name=name)


# ---------------------------------------------------------------- pieces

class _Schedule:
    """Linear warm-up then cosine decay to 1 % over ``total`` steps (``total`` may shrink once
    a time limit shows how many steps fit)."""

    def __init__(self, total: int, warmup: float):
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        warm = max(1, int(self.total * self.warmup))
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.total - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Loss(nn.Module):
    """Cross-entropy (optionally weighted per pixel) + Dice (smp), both ignoring unannotated pixels."""

    def __init__(self, dice_weight: float):
        super().__init__()
        from segmentation_models_pytorch.losses import DiceLoss
        self.dice = DiceLoss(mode="multiclass", ignore_index=IGNORE, from_logits=True)
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
        annotated = target != IGNORE
        if weight is not None:
            ce = ce * weight
        loss = ce.sum() / annotated.sum().clamp(min=1)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss


def _set_train_mode(net: nn.Module, freeze_bn: bool) -> None:
    net.train()
    if freeze_bn:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _prepare_network(config: TrainConfig, classes: tuple[str, ...], base: Model | None) -> tuple[nn.Module, ModelCard]:
    """A fresh network, or a copy of the base model's with its head re-made if the classes changed."""
    if base is None:
        net = build_unet(config.encoder, len(classes), full_resolution_skip=config.full_resolution_skip,
                         upsampling=config.decoder_upsampling)
        card = ModelCard(encoder=config.encoder, full_resolution_skip=config.full_resolution_skip,
                         decoder_upsampling=config.decoder_upsampling, classes=classes,
                         tile_size=max(512, config.tile_size),
                         pixel_size_nm=config.pixel_size_nm, name=config.name)
        return net, card
    net = copy.deepcopy(base.net).cpu()
    # the base's annotation offset belongs to its own annotation: the new one is measured afresh (or not at all)
    card = base.card.updated(name=config.name, label_offset=(0.0, 0.0))
    if is_offset(base.card.label_offset):
        log.info("the base model's annotation offset (%+.2f, %+.2f px) is not carried over: it belongs to the "
                 "annotation it was trained on%s", *base.card.label_offset,
                 "; this one's is measured during the run" if config.label_offset else "")
    if len(classes) != base.card.num_classes:
        fresh = build_unet(base.card.encoder, len(classes), decoder_channels=base.card.decoder_channels,
                           full_resolution_skip=base.card.full_resolution_skip,
                           upsampling=base.card.decoder_upsampling)
        net.segmentation_head = fresh.segmentation_head
        log.info("classes changed from %s to %s: the output head starts afresh", base.classes, classes)
    card = card.updated(classes=classes, name=config.name)
    return net, card


def _val_probabilities(net: nn.Module, items: Sequence[Annotated], card: ModelCard, device: torch.device,
                       tile: int, amp) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(probabilities, target) of every validation page, one page at a time."""
    norm = card.normalization
    net.eval()
    for item in items:
        x = ((item.image - norm.mean) / norm.std)[None].astype(np.float32)
        with torch.inference_mode(), amp():
            probs = sliding_window(x, lambda b: net(b).float(), tile=tile, overlap=tile // 4,
                                   batch_size=4, device=device)
        yield probs, item.target


def _validate(net: nn.Module, items: Sequence[Annotated], card: ModelCard, device: torch.device,
              tile: int, amp, offset=None) -> dict:
    """Per-class scores on the validation pages, the predictions moved by ``offset`` (default: the card's)."""
    offset = card.label_offset if offset is None else offset
    matrix = np.zeros((card.num_classes, card.num_classes), np.int64)
    for probs, target in _val_probabilities(net, items, card, device, tile, amp):
        matrix += confusion(target, shift_probabilities(probs, offset).argmax(0), card.num_classes)
    return scores(matrix, card.classes)


def _measured_offset(net, card: ModelCard, items: Sequence[Annotated], device, tile: int, amp) -> tuple[float, float]:
    """The annotation's sub-pixel offset measured on the validation pages (emseg.alignment)."""
    return tuple(round(o, 3) for o in estimate_offset(_val_probabilities(net, items, card, device, tile, amp)))


def _better_offset(net, card: ModelCard, items: Sequence[Annotated], device, tile: int, amp, offset,
                   before: dict | None = None) -> tuple[tuple[float, float], dict]:
    """``offset`` if moving the predictions by it scores a higher validation mean IoU than the card's
    offset so far (``before``: those scores, if known), else the card's offset; with a summary holding
    the validation scores of the offset returned."""
    current = tuple(float(o) for o in card.label_offset)
    summary = {"before": list(current)}
    if not is_offset(offset) and not is_offset(current):
        return (0.0, 0.0), summary
    before = before or _validate(net, items, card, device, tile, amp)
    after = _validate(net, items, card, device, tile, amp, offset)
    summary.update(mean_iou_before=before["mean_iou"], mean_iou_measured=after["mean_iou"], validation=before)
    if (after["mean_iou"] or 0) > (before["mean_iou"] or 0):
        summary["validation"] = after
        return (tuple(offset) if is_offset(offset) else (0.0, 0.0)), summary
    return current, summary


def _averaged(net: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``net``'s weights and batch-norm statistics (``decay`` 0: none).

    Its decay grows with the updates, ``min(decay, (1 + n) / (10 + n))``, so it spans about the last
    tenth of the steps so far: short runs (fine-tuning, tests) are not held back by their first
    weights. One validation to the next, the weights of a CPU-length run move the validation IoU by
    0.01-0.03; their average does not follow that noise (docs/training.md)."""
    if not decay:
        return None
    cap = float(decay)

    def ema(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # batch-norm's batch count
            return current
        return torch.lerp(current, averaged, torch.clamp((1 + n) / (10 + n), max=cap).to(averaged.dtype))

    return AveragedModel(net, avg_fn=ema, use_buffers=True)


def _mean_offset(measurements) -> tuple[float, float]:
    """The mean of the offsets measured so far ([step, rows, columns] each): one measurement moves by
    0.1-0.3 px from one validation to the next (docs/training.md), their mean much less."""
    return tuple(round(float(o), 3) for o in np.mean([m[1:] for m in measurements], axis=0))


def _within(a, b, tolerance: float) -> bool:
    return all(abs(float(x) - float(y)) < tolerance for x, y in zip(a, b))


def _log_offset(what: str, offset, before: float | None = None, after: float | None = None) -> None:
    scores_ = f" (validation mean IoU {before:.4f} -> {after:.4f})" if before is not None and after is not None else ""
    log.info("the annotation sits %.2f px %s and %.2f px %s of what the model draws: %s%s", abs(offset[0]),
             "below" if offset[0] > 0 else "above", abs(offset[1]), "right" if offset[1] > 0 else "left",
             what, scores_)


def _preview(net: nn.Module, card: ModelCard, image: np.ndarray, device, tile: int) -> np.ndarray:
    model = Model(net, card)
    from .inference import Predictor
    predictor = Predictor(model, tile=tile, overlap=tile // 4, device=device)
    return predictor.predict_page(np.asarray(image)).argmax(0).astype(np.uint8)


# ---------------------------------------------------------------- the loop

def train(data: Sequence[Annotated], config: TrainConfig, out_dir: str | Path | None = None, *,
          base: Model | None = None, val_data: Sequence[Annotated] | None = None,
          preview_image: np.ndarray | None = None, progress: Callable[[TrainEvent], None] | None = None,
          stop: threading.Event | None = None, resume: bool = False) -> TrainResult:
    """Train a new model (or fine-tune ``base``) on annotated pages; see the module docstring.

    Args:
        data: training pages (images normalised with the card's normalisation, see emseg.dataset).
        config: the run's settings.
        out_dir: where the model, checkpoint, log and plots go (None: keep everything in memory).
        base: a model to fine-tune; its normalisation and pixel size are kept; it is never modified.
        val_data: held-out pages; without them, ``config.val_fraction`` of every page is held out.
        preview_image: a raw 2D page predicted at every validation (``TrainEvent.preview``).
        progress: called after every step with a :class:`TrainEvent`.
        stop: set it to end the run after the current step; the best model so far is returned.
        resume: continue from ``out_dir/checkpoint`` if it exists; without it, an ``out_dir`` that holds a
            checkpoint is refused (EmsegError) rather than replaced.
    """
    if not data:
        raise InputError("no annotated training pages; give images with masks")
    out = Path(out_dir) if out_dir is not None else None
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    if out is not None:
        check_run_folder(out, resume)
    resuming = resume and out is not None and has_checkpoint(out / "checkpoint")
    classes = tuple(config.classes) if config.classes else (base.classes if base else None)
    if classes is None and resuming:
        classes = checkpoint_classes(out / "checkpoint")
    if classes is None:
        top = max(int(it.target[it.target != IGNORE].max(initial=0)) for it in data)
        classes = ("background",) + tuple(f"class_{i}" for i in range(1, max(top, 1) + 1))
    check_classes(data, classes)
    if val_data is None:
        train_items, val_items = split_regions(data, config.val_fraction)
    else:
        train_items, val_items = list(data), list(val_data)
    if not val_items:
        log.warning("no annotated pixel is held out for validation; the last weights are kept instead of the best")

    net, card = _prepare_network(config, classes, base)
    # channels-last: 1.16x (vgg11_bn_slim) and 1.28x (densenet_slim) per CPU training step (docs/training.md)
    net = net.to(device, memory_format=torch.channels_last)
    if config.freeze_encoder:
        for p in net.encoder.parameters():
            p.requires_grad_(False)
    freeze_bn = config.freeze_bn if config.freeze_bn is not None else config.batch_size <= 2
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = _Schedule(config.steps, config.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_fn = _Loss(config.dice_weight).to(device)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else torch.autocast("cpu", enabled=False)

    # validation, the best weights and the model written are those of the weights' moving average
    averaged = _averaged(net, config.ema_decay)
    evaluated = averaged.module if averaged is not None else net
    state = {"step": 0, "history": [], "best_metric": None, "bad_validations": 0, "label_offset": None}
    best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
    if resuming:
        state = load_checkpoint(out / "checkpoint", net, optimizer, scheduler, config, averaged)
        best_state = state.pop("best_weights")
        schedule.total = config.steps  # LambdaLR restores the callable's attributes; the new run decides
        rng = np.random.default_rng([config.seed, state["step"]])
        log.info("resumed from %s at step %d", out / "checkpoint", state["step"])

    boundary = boundary_class_of(classes)
    border = None
    if config.border_weight > 0 and boundary is not None and not config.sparse:
        border = (boundary, config.border_weight, config.border_sigma)
    elif config.border_weight > 0 and boundary is not None:
        log.info("border weighting needs dense masks with a boundary class (e.g. 'membrane'); not used "
                 "with sparse labels, whose regions are unknown")
    sampled = train_items
    if is_offset(state.get("label_offset")):  # resumed after the training images were moved
        card = card.updated(label_offset=tuple(state["label_offset"]))
        sampled = _moved(train_items, card.label_offset)
    sampler = CropSampler(sampled, config.tile_size, rng=rng,
                          transform=build_transform(config.augment, seed=int(rng.integers(2**31))),
                          bias=0.9 if config.sparse else 0.5, border=border)
    workers = loader_workers(config.loader_workers, device)
    samplers = [sampler] + [sampler.spawn([config.seed, state["step"], i]) for i in range(1, workers)]
    if workers > 1:
        log.info("%d threads make the training batches", workers)
    batches = Prefetcher(samplers, config.batch_size)
    norm = card.normalization
    stopped = False
    running = []
    start = time.perf_counter()
    timed_from = None
    try:
        while state["step"] < schedule.total:
            if stop is not None and stop.is_set():
                stopped = True
                break
            _set_train_mode(net, freeze_bn)
            images, targets, weights = batches.next()
            images = ((images - norm.mean) / norm.std).to(device, non_blocking=True,
                                                            memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            weights = weights.to(device, non_blocking=True) if weights is not None else None
            with amp():
                loss = loss_fn(net(images).float(), targets, weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(net)
            state["step"] += 1
            loss_value = loss.item()
            running.append(loss_value)
            if config.time_limit_minutes and timed_from is None and state["step"] >= 5:
                timed_from = (time.perf_counter(), state["step"])
            elif timed_from is not None and (state["step"] == timed_from[1] + 20 or (
                    state["step"] % config.val_every == 1 and state["step"] > timed_from[1] + 20)):
                # first estimate after 20 timed steps, then again after every validation
                _fit_schedule_to_time(schedule, config, state["step"], timed_from, start)
            event = TrainEvent(state["step"], schedule.total, loss_value, scheduler.get_last_lr()[0])
            if state["step"] % config.val_every == 0 or state["step"] == schedule.total:
                event = _end_of_epoch(state, event, running, evaluated, card, val_items, device, config, amp,
                                      best_state, preview_image, start)
                running = []
                first = state.get("label_offset") is None
                if (config.label_offset and val_items
                        and ALIGN_AT * schedule.total <= state["step"] < schedule.total
                        and (first or state["step"] < REALIGN_UNTIL * schedule.total)):
                    # measured a quarter into the run, then at every validation until REALIGN_UNTIL; the
                    # images follow the mean of the measurements when it has moved by REALIGN_BY
                    moved_by = (0.0, 0.0) if first else tuple(state["label_offset"])
                    measurement = _measured_offset(evaluated, card, val_items, device, config.tile_size, amp)
                    state["history"][-1]["offset_measured"] = list(measurement)
                    state.setdefault("offset_measurements", []).append([state["step"], *measurement])
                    target = _mean_offset(state["offset_measurements"])
                    offset = moved_by
                    if first or not _within(target, moved_by, REALIGN_BY):
                        offset, _ = _better_offset(evaluated, card, val_items, device, config.tile_size, amp, target,
                                                   event.metrics)
                        offset = offset if is_offset(offset) else (0.0, 0.0)
                    if first and not is_offset(offset):
                        log.info("annotation offset against the images: %+.2f, %+.2f px (rows, columns); not "
                                 "followed (too small, or no better on validation)", *measurement)
                    if first or offset != moved_by:
                        state["label_offset"] = list(offset)
                        if offset != tuple(card.label_offset):
                            card = card.updated(label_offset=offset)
                            # scores from here on include the new offset: the best weights are chosen among them
                            state["best_metric"], state["bad_validations"] = None, 0
                    if tuple(state["label_offset"]) != moved_by:
                        _log_offset("the training images are " + ("moved again" if is_offset(moved_by) else "moved")
                                    + " to match" + (f" (mean of {len(state['offset_measurements'])} measurements; "
                                                     "this one %+.2f, %+.2f px)" % measurement
                                                     if len(state["offset_measurements"]) > 1 else ""), offset)
                        state["history"][-1]["images_moved_by"] = list(offset)
                        batches.close()
                        sampler = sampler.with_items(_moved(train_items, offset))
                        batches = Prefetcher([sampler.spawn([config.seed, state["step"], i]) for i in range(workers)],
                                             config.batch_size)
                if out is not None:  # after the offset's measurement and any move, which belong in it too
                    _save_progress(out, net, averaged, optimizer, scheduler, config, state, best_state, card)
                if state["bad_validations"] >= config.patience:
                    log.info("stopping early: no improvement in %d validations", config.patience)
                    if progress:
                        progress(event)
                    break
            if progress:
                progress(event)

    finally:
        batches.close()
    if val_items and state["best_metric"] is not None:
        net.load_state_dict(best_state)
    elif averaged is not None:
        net.load_state_dict(evaluated.state_dict())
    net.eval().to(memory_format=torch.contiguous_format)
    validated = [h for h in state["history"] if h.get("val")]
    best_val = next((h for h in validated if h["step"] == state.get("best_step")), None)
    if best_val is None and validated:  # a checkpoint of an older emseg, or no validation improved
        best_val = max(validated, key=lambda h: h["val"]["mean_iou"] or 0)
    offset_summary = None
    if val_items and config.label_offset:
        measurement = _measured_offset(net, card, val_items, device, config.tile_size, amp)
        measurements = state.get("offset_measurements", []) + [[state["step"], *measurement]]
        offset, measured = _better_offset(net, card, val_items, device, config.tile_size, amp,
                                          _mean_offset(measurements))
        if offset != tuple(card.label_offset) and is_offset(offset):
            _log_offset("predictions are moved to match", offset, measured["mean_iou_before"],
                        measured["mean_iou_measured"])
        card = card.updated(label_offset=offset)
        if "validation" in measured:
            best_val = dict(best_val or {}, val=measured["validation"])
        offset_summary = {
            "images_moved_by": state.get("label_offset") or [0.0, 0.0],
            "moves": [[h["step"], *h["images_moved_by"]] for h in state["history"] if h.get("images_moved_by")],
            "measurements": measurements, "measured_at_end": list(measurement), "used": list(offset),
            **{k: v for k, v in measured.items() if k.startswith("mean_iou")}}
    summary = _training_summary(config, data, val_items, state, best_val, base, start)
    if offset_summary is not None:
        summary["label_offset"] = offset_summary
    card = card.updated(training=summary)
    model = Model(net.cpu(), card)
    model_path = None
    if out is not None:
        model_path = model.save(out / "model.safetensors")
        _write_reports(out, state["history"], model, val_items)
    return TrainResult(model, model_path, state["history"], state["best_metric"], stopped)


def _moved(items: Sequence[Annotated], offset) -> list[Annotated]:
    """The pages with their images moved by ``offset`` (emseg.alignment), targets unchanged."""
    return [replace(it, image=shift_image(it.image, offset)) for it in items]


def loader_workers(requested: int, device: torch.device) -> int:
    """Threads that make training batches: ``requested``, or for 0 one on the CPU (the training step
    needs the cores) and up to 8 on a GPU, whose steps outpace one thread (docs/training.md)."""
    if requested < 0:
        raise InputError(f"loader_workers must be 0 (automatic) or more, not {requested}")
    if requested:
        return requested
    return 1 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def _fit_schedule_to_time(schedule: _Schedule, config: TrainConfig, step: int, timed_from, start) -> None:
    """Fit the run (and its LR schedule) into the time limit: the number of steps that fit at the pace
    measured since ``timed_from``; re-estimated after every validation, whose cost the pace then holds."""
    pace = (time.perf_counter() - timed_from[0]) / (step - timed_from[1])
    if step - timed_from[1] <= config.val_every:  # no validation timed yet: it costs about 3 steps
        pace *= 1 + 3 / config.val_every
    budget = config.time_limit_minutes * 60 - (time.perf_counter() - start)
    fits = min(config.steps, step + max(1, int(budget / pace)))
    if fits != schedule.total:
        first = schedule.total == config.steps
        schedule.total = fits
        (log.info if first else log.debug)(
            "time limit %.0f min: about %.2f s per step, so %d steps%s", config.time_limit_minutes, pace,
            schedule.total, f" instead of {config.steps}" if first else "")


def _end_of_epoch(state, event, running, net, card, val_items, device, config, amp, best_state,
                  preview_image, start) -> TrainEvent:
    """Validate ``net`` (the moving average of the weights, if kept), keep the best weights, log;
    returns the event with metrics attached."""
    record = {"step": state["step"], "loss": float(np.mean(running)) if running else None,
              "lr": event.lr, "seconds": round(time.perf_counter() - start, 1)}
    if val_items:
        metrics = _validate(net, val_items, card, device, config.tile_size, amp)
        record["val"] = metrics
        metric = metrics["mean_iou"] if metrics["mean_iou"] is not None else -1.0
        if state["best_metric"] is None or metric > state["best_metric"]:
            state["best_metric"] = metric
            state["bad_validations"] = 0
            state["best_step"] = state["step"]
            best_state.update({k: v.detach().clone() for k, v in net.state_dict().items()})
            event.best = True
        else:
            state["bad_validations"] += 1
        event.metrics = metrics
    else:
        best_state.update({k: v.detach().clone() for k, v in net.state_dict().items()})
    state["history"].append(record)
    if preview_image is not None:
        event.preview = _preview(net, card, preview_image, device, config.tile_size)
    _log_epoch(record)
    return event


def _save_progress(out: Path, net, averaged, optimizer, scheduler, config, state, best_state, card) -> None:
    """The resumable checkpoint and log.json."""
    save_checkpoint(out / "checkpoint", net, optimizer, scheduler, config, state, best_state, card.classes, averaged)
    (out / "log.json").write_text(json.dumps(state["history"], indent=1))


def _log_epoch(record: dict) -> None:
    val = record.get("val")
    if val:
        ious = ", ".join(f"{k} {v:.3f}" for k, v in val["iou"].items() if v is not None)
        log.info("step %d: loss %.4f, val mean IoU %s (%s), pixel error %.4f", record["step"], record["loss"] or 0,
                 f"{val['mean_iou']:.4f}" if val["mean_iou"] is not None else "-", ious, val["pixel_error"] or 0)
    else:
        log.info("step %d: loss %.4f", record["step"], record["loss"] or 0)


def _training_summary(config, data, val_items, state, best_val, base, start) -> dict:
    summary = {
        "config": config.to_dict(),
        "pages": len(data),
        "annotated_pixels": int(sum(it.annotated for it in data)),
        "sources": sorted({it.name.split("[")[0] for it in data})[:20],
        "validation_pages": len(val_items),
        "steps": state["step"],
        "seconds": round(time.perf_counter() - start, 1),
        "validation": best_val["val"] if best_val else None,
    }
    if base is not None:
        summary["fine_tuned_from"] = {"name": base.card.name, "path": str(base.path) if base.path else None,
                                      "training": base.card.training.get("sources")}
    return summary


def _write_reports(out: Path, history: list[dict], model: Model, val_items: Sequence[Annotated]) -> None:
    from .reports import plot_curves, plot_validation
    if history:
        plot_curves(history, out / "curves.png")
    if val_items:
        plot_validation(model, val_items, out / "validation.png")
