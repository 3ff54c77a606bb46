"""Training and fine-tuning a U-Net on a few annotated pages.

:func:`train` samples random crops (biased towards annotated pixels), augments them, and
optimises Dice + cross-entropy with AdamW under a warm-up + cosine schedule, ignoring
unannotated pixels. Every ``val_every`` steps it measures per-class IoU/Dice on held-out pixels,
keeps the best weights, writes a resumable checkpoint, and stops early after ``patience``
validations without improvement. From a quarter into the run (at every validation until 90 % of
it) and at its end, it measures a systematic sub-pixel offset of the annotation on the held-out
pixels (emseg.infer.alignment); where following the mean of those measurements scores better, the
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

from emseg.analysis.metrics import IGNORE, boundary_class_of, scores
from emseg.errors import InputError
from emseg.infer.alignment import estimate_offset, is_offset, shift_image, shift_probabilities
from emseg.infer.predictor import argmax_classes, resolve_device
from emseg.infer.tiling import TileCanvas, TileGrid
from emseg.model.card import ModelCard, Normalization
from emseg.model.modelfile import Model
from emseg.model.networks import DEFAULT_ENCODER, build_unet
from emseg.train.augment import AugmentConfig, build_transform
from emseg.train.checkpoint import (
    check_run_folder,
    checkpoint_classes,
    checkpoint_payload,
    has_checkpoint,
    load_checkpoint,
    write_checkpoint,
)
from emseg.train.data import (
    Annotated,
    CropSampler,
    Prefetcher,
    arrays_to_items,
    border_weights,
    check_classes,
    split_regions,
)

log = logging.getLogger(__name__)

#: fraction of a run after which the annotation's offset is measured and the training images moved
ALIGN_AT = 0.25
#: the images are moved again when the mean of the measurements differs from the last move by this much (pixels)
REALIGN_BY = 0.1
#: fraction of a run after which the images are not moved again (too few steps left to learn from them)
REALIGN_UNTIL = 0.9
#: added to the run's seed for the fresh weights that ``TrainConfig.encoder_keep`` mixes into the base's encoder
SHRINK_SEED = 7919
#: optimiser steps of a run without --steps and without a time limit
DEFAULT_STEPS = 2000
#: the shares of the base's weights that ``TrainConfig(base_share="auto")`` chooses from on the validation pages
BASE_SHARES = (0.0, 0.25, 0.5, 0.75)
#: ... unless the base alone scores more than this (validation mean IoU) below the fine-tuned weights: a base that
#: does not know the new pages has a barrier between it and the fine-tuned weights (docs/training.md)
BLEND_MARGIN = 0.1
#: the step cap of a run with a time limit and no --steps: the time limit decides (with the schedule
#: planned for DEFAULT_STEPS until the pace is known)
FILL_STEPS = 10_000_000
#: on an accelerator the loss is read back (a host synchronisation) once every this many steps
LOSS_READ_EVERY = 25
#: checkpoints of models larger than this (bytes of weights) are written at most every CHECKPOINT_SECONDS
LARGE_MODEL_BYTES = 50 * 2**20
CHECKPOINT_SECONDS = 300.0


class RunLength:
    """What a run's config (``steps``, ``time_limit_minutes``, ``augment``) says about its length, as a dict."""

    def _default_steps(self) -> None:
        if self.steps is None:  # a time limit alone decides how many steps fit (on a GPU, many)
            object.__setattr__(self, "steps", FILL_STEPS if self.time_limit_minutes else DEFAULT_STEPS)

    @property
    def fills_time(self) -> bool:
        """Whether the run has no step count of its own: the time limit decides."""
        return self.steps == FILL_STEPS and bool(self.time_limit_minutes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d


@dataclass(frozen=True)
class TrainConfig(RunLength):
    """Everything that defines a training run (saved with the run and summarised in the model card)."""

    encoder: str = DEFAULT_ENCODER
    full_resolution_skip: bool = True
    decoder_upsampling: str = "nearest"  # bilinear: neutral on ISBI, EPFL and NASA (docs/training.md)
    classes: tuple[str, ...] | None = None
    sparse: bool = False
    tile_size: int = 256
    batch_size: int = 8
    steps: int | None = None
    val_every: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05
    patience: int = 10
    val_fraction: float = 0.2
    dice_weight: float = 1.0  # Dice + cross-entropy: 2-slice EPFL (no moving average) 0.52 without, 0.68 with it
    border_weight: float = 10.0
    border_sigma: float = 5.0
    label_offset: bool = False
    ema_decay: float = 0.999  # the moving average of the weights: helps NASA and 2-slice EPFL (docs/training.md)
    seed: int = 0
    device: str = "auto"
    loader_workers: int = 0
    freeze_encoder: bool = False
    freeze_encoder_steps: int = 0  # the encoder's weights frozen for the first steps only (then all train)
    # starting from a model: keep its encoder only (decoder and head start afresh); None: for a new task only
    fresh_decoder: bool | None = None
    encoder_lr_scale: float = 1.0  # the encoder's learning rate as a share of lr (discriminative fine-tuning)
    # starting from a model: this share of its encoder's weights, the rest a fresh draw's (shrink and perturb, Ash &
    # Adams 2020); a half helped dense new tasks on two pairs of three and lost on every pair of scribbles, so all by
    # default (docs/training.md, "A sixth look")
    encoder_keep: float = 1.0
    # starting from a model: its encoder's layers at this many of the finest resolutions only, the deeper ones a fresh
    # draw's (early layers carry over between tasks better than deep ones: Yosinski et al. 2014, Raghu et al. 2019);
    # None: all of them. 3 was no better than all on EPFL -> ISBI (docs/training.md, "An eighth look")
    encoder_keep_levels: int | None = None
    freeze_bn: bool | None = None
    # fine-tuning the same classes: this share of the base's weights in the result (WiSE-FT); "auto": the share of
    # BASE_SHARES that scores best on the validation pages
    base_share: float | str = 0.0
    head: str = "auto"
    pixel_size_nm: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    time_limit_minutes: float | None = None
    augment_on: str = "auto"
    name: str = "emseg model"

    def __post_init__(self):
        self._default_steps()
        if self.augment_on not in ("auto", "cpu", "device"):
            raise ValueError(f"augment_on must be auto, cpu or device, got {self.augment_on!r}")
        if self.head not in ("auto", "keep", "fresh"):
            raise ValueError(f"head must be auto, keep or fresh, got {self.head!r}")
        if self.base_share != "auto" and not (isinstance(self.base_share, (int, float)) and 0 <= self.base_share < 1):
            raise ValueError(f"base_share must be 'auto', or at least 0 and below 1, got {self.base_share!r}")
        if not (isinstance(self.encoder_keep, (int, float)) and 0 < self.encoder_keep <= 1):
            raise ValueError(f"encoder_keep must be above 0 and at most 1, got {self.encoder_keep!r}")
        if self.encoder_keep_levels is not None and not (isinstance(self.encoder_keep_levels, int)
                                                         and self.encoder_keep_levels >= 0):
            raise ValueError(f"encoder_keep_levels must be a whole number, 0 or more, got {self.encoder_keep_levels!r}")


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
    """Annotated pages from in-memory arrays (the napari plugin's layers); see :mod:`emseg.train.data`."""
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
    """Cross-entropy (optionally weighted per pixel), plus Dice (smp) if weighted, both ignoring unannotated pixels."""

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
        unused = ([k for k in ("fresh_decoder", "freeze_encoder", "freeze_encoder_steps", "base_share")
                   if getattr(config, k)]
                  + [k for k in ("encoder_lr_scale", "encoder_keep") if getattr(config, k) != 1]
                  + ["encoder_keep_levels"] * (config.encoder_keep_levels is not None))
        if unused:
            log.warning("%s: no effect without a model to start from (a new network is all fresh)", ", ".join(unused))
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
    if is_new_task(base, classes, config.head):  # the scale of the old classes goes with them
        card = card.updated(pixel_size_nm=config.pixel_size_nm)
        log.info("a new task for the %s model (%s -> %s): trained at the pages' pixel size (%s), not the base's",
                 base.card.encoder, ", ".join(base.classes), ", ".join(classes),
                 f"{config.pixel_size_nm:g} nm/px" if config.pixel_size_nm else "unknown")
    fresh_head = _fresh_head(config.head, base, classes)
    fresh_decoder = _decoder_afresh(config, base, classes)
    if fresh_decoder or fresh_head:
        fresh = build_unet(base.card.encoder, len(classes), decoder_channels=base.card.decoder_channels,
                           full_resolution_skip=base.card.full_resolution_skip,
                           upsampling=base.card.decoder_upsampling)
    why = (f"classes changed from {', '.join(base.classes)} to {', '.join(classes)}"
           if tuple(classes) != tuple(base.classes) else "a fresh head was asked for")
    if fresh_decoder:
        fresh.encoder.load_state_dict(net.encoder.state_dict())
        net = fresh
        log.info("%s: the %s encoder from %s; decoder and output head start afresh",
                 why if fresh_head and not base.card.is_pretrained else "fresh_decoder", base.card.encoder,
                 "the pretrained model" if base.card.is_pretrained else "the base model")
    elif fresh_head:
        net.segmentation_head = fresh.segmentation_head
        if base.card.is_pretrained:
            log.info("starting from the pretrained %s U-Net (%s on %s): encoder and decoder from it, a fresh "
                     "head for the classes %s", base.card.encoder, base.card.pretrained.get("objective"),
                     ", ".join(base.card.pretrained.get("sources", [])[:3]) or "unlabelled images", ", ".join(classes))
        else:
            log.info("%s: the output head starts afresh", why)
    if config.encoder_keep < 1 or config.encoder_keep_levels is not None:
        with torch.random.fork_rng(devices=[]):  # a draw of its own: with the base's seed it would be its first weights
            torch.manual_seed(config.seed + SHRINK_SEED)
            drawn = build_unet(base.card.encoder, len(classes), decoder_channels=base.card.decoder_channels,
                               full_resolution_skip=base.card.full_resolution_skip).encoder.state_dict()
        state = net.encoder.state_dict()
        if config.encoder_keep < 1:
            state = weights_with_base(state, drawn, 1 - config.encoder_keep)
            log.info("the encoder starts %g %% from the base model and %g %% from a fresh initialisation (shrink and "
                     "perturb)", 100 * config.encoder_keep, 100 * (1 - config.encoder_keep))
        if config.encoder_keep_levels is not None:
            strides = encoder_strides(net.encoder)
            kept = sorted(set(strides.values()))[:config.encoder_keep_levels]
            state = {k: v if strides[k] in kept else drawn[k] for k, v in state.items()}
            if kept:
                log.info("the encoder's layers at stride %s from the base model, the deeper ones afresh",
                         ", ".join(map(str, kept)))
            else:
                log.info("encoder_keep_levels 0: the encoder starts afresh")
        net.encoder.load_state_dict(state)
    card = card.updated(classes=classes, name=config.name, pretrained={})
    return net, card


def _warn_other_pixel_sizes(items: Sequence[Annotated], model_nm: float | None) -> None:
    """Pages at another pixel size than the model's teach it another scale than it will be shown: the CLI and
    napari rescale them first (emseg.train.data.rescale_items); a caller of the Python API may not have."""
    other = [i for i in items if model_nm and i.pixel_size_nm and abs(i.pixel_size_nm / model_nm - 1) > 0.02]
    if other:
        log.warning("%d page(s) (%s, ...) are at %.3g nm/px but the model is for %.3g nm/px, and will be "
                    "predicted rescaled to it: rescale them before training (emseg.train.data.rescale_items)",
                    len(other), other[0].name, other[0].pixel_size_nm, model_nm)


def is_new_task(base: Model | None, classes: Sequence[str], head: str = "auto") -> bool:
    """Whether fine-tuning ``base`` for ``classes`` is a new task: a segmentation model given other classes, so
    that its output head starts afresh. A new task is trained at the annotated pages' own pixel size rather than
    the base's (its scale belonged to the old classes) and, by default, at ``FINETUNE_DEFAULTS["new_task_lr"]``:
    measured on four pairs of data sets (docs/training.md, "Fine-tuning that pays"). A pretrained base (`emseg
    pretrain`) is not one: its pixel size is kept."""
    return base is not None and not base.card.is_pretrained and _fresh_head(head, base, tuple(classes))


def finetune_lr(base: Model | None, classes: Sequence[str], head: str = "auto") -> float:
    """The learning rate of `emseg finetune` and the napari Fine-tune widget when none is given:
    ``FINETUNE_DEFAULTS["lr"]`` for the base's own classes, ``["new_task_lr"]`` whenever the output head starts
    afresh (other classes, a pretrained base, or no base). A pretrained base at the lower rate scored 0.553 and
    0.597 against 0.616 and 0.613 (two seeds; docs/training.md, "Pretraining on unlabelled images")."""
    from emseg.train import FINETUNE_DEFAULTS
    fresh = base is None or _fresh_head(head, base, tuple(classes))
    return FINETUNE_DEFAULTS["new_task_lr" if fresh else "lr"]


def finetune_base_share(base: Model | None, classes: Sequence[str], head: str = "auto") -> float | str:
    """The share of the base's weights in the result of `emseg finetune` and the napari Fine-tune widget when none
    is given (WiSE-FT, ``TrainConfig.base_share``): ``FINETUNE_DEFAULTS["base_share"]`` for the base's own classes,
    0 whenever the output head starts afresh (nothing to average it with)."""
    from emseg.train import FINETUNE_DEFAULTS
    fresh = base is None or _fresh_head(head, base, tuple(classes))
    return 0.0 if fresh else FINETUNE_DEFAULTS["base_share"]


def _decoder_afresh(config: TrainConfig, base: Model, classes: tuple[str, ...]) -> bool:
    """Whether fine-tuning ``base`` keeps its encoder only: ``config.fresh_decoder``, by default for a new task
    (a decoder that drew membranes is a worse start for mitochondria than a fresh one; docs/training.md,
    "Fine-tuning that pays") and for a base pretrained by the contrastive objective (its decoder never learnt)."""
    if config.fresh_decoder is not None:
        return config.fresh_decoder
    return is_new_task(base, classes, config.head) or base.card.pretrained.get("objective") == "contrastive"


def _fresh_head(head: str, base: Model, classes: tuple[str, ...]) -> bool:
    """Whether fine-tuning ``base`` for ``classes`` re-makes the output head: ``fresh`` always, ``keep`` only when
    the number of classes changes, ``auto`` when their names change too (a membrane output kept for
    mitochondria starts the run from the wrong answer; docs/training.md, "Fine-tuning that pays")."""
    if base.card.is_pretrained or len(classes) != base.card.num_classes or head == "fresh":
        return True
    return head == "auto" and [c.lower() for c in classes] != [c.lower() for c in base.classes]


class _ValSet:
    """The validation pages held on the training device (normalised images, targets and tile grids),
    predicted with tiles of several pages sharing batches, blended on the device, and scored with the
    confusion counted there: one host transfer per validation."""

    #: validation pixels blended at once (their canvases share the device)
    GROUP_PIXELS = 2**26

    def __init__(self, items: Sequence[Annotated], norm: Normalization, device: torch.device, tile: int):
        self.items, self.device = list(items), device
        self.batch = 32 if device.type == "cuda" else 4
        self.grids = [TileGrid(*it.image.shape, tile, tile // 4) for it in self.items]
        self.padded = [grid.pad(torch.from_numpy(((it.image - norm.mean) / norm.std).astype(np.float32))[None]
                                .to(device)) for grid, it in zip(self.grids, self.items)]
        self.targets = [torch.from_numpy(it.target).to(device) for it in self.items]

    def _groups(self) -> Iterator[list[int]]:
        group, pixels = [], 0
        for k, grid in enumerate(self.grids):
            if group and pixels + grid.height * grid.width > self.GROUP_PIXELS:
                yield group
                group, pixels = [], 0
            group.append(k)
            pixels += grid.height * grid.width
        if group:
            yield group

    def probabilities(self, net: nn.Module, classes: int, amp) -> Iterator[tuple[int, torch.Tensor]]:
        """``(page index, probabilities (K, H, W) on the device)`` of every validation page."""
        net.eval()
        for group in self._groups():
            canvases = {k: TileCanvas(self.grids[k], classes, self.device) for k in group}
            runs = [(k, first, 1) for k in group for first in range(len(self.grids[k]))]
            for j in range(0, len(runs), self.batch):
                chunk = _merge_runs(runs[j:j + self.batch])
                x = torch.cat([self.grids[k].gather(self.padded[k], first, count) for k, first, count in chunk])
                with torch.inference_mode(), amp():
                    out = torch.softmax(net(x.contiguous(memory_format=torch.channels_last)).float(), dim=1)
                done = 0
                for k, first, count in chunk:
                    canvases[k].add(first, out[done:done + count])
                    done += count
            for k in group:
                yield k, canvases[k].blended()

    def confusion(self, net: nn.Module, classes: int, amp, offset=(0.0, 0.0)) -> np.ndarray:
        """The confusion matrix (target x prediction) over the annotated validation pixels, the
        predictions moved by ``offset``."""
        counts = torch.zeros(classes * classes + 1, dtype=torch.int64, device=self.device)
        for k, probs in self.probabilities(net, classes, amp):
            predicted = argmax_classes(shift_probabilities(probs, offset)).long()
            target = self.targets[k].long()
            index = torch.where(target != IGNORE, target * classes + predicted, classes * classes)
            counts.index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.int64, device=self.device))
        return counts[:-1].view(classes, classes).cpu().numpy()

    def numpy_pairs(self, net: nn.Module, classes: int, amp) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(probabilities, target)`` of every page as numpy arrays (for emseg.infer.alignment)."""
        for k, probs in self.probabilities(net, classes, amp):
            yield probs.cpu().numpy(), self.items[k].target


def _merge_runs(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Consecutive tiles of one page joined: ``(page, first tile, count)``."""
    merged: list[list[int]] = []
    for k, first, count in runs:
        if merged and merged[-1][0] == k and merged[-1][1] + merged[-1][2] == first:
            merged[-1][2] += count
        else:
            merged.append([k, first, count])
    return [tuple(m) for m in merged]


def _validate(net: nn.Module, val: _ValSet, card: ModelCard, amp, offset=None) -> dict:
    """Per-class scores on the validation pages, the predictions moved by ``offset`` (default: the card's)."""
    offset = card.label_offset if offset is None else offset
    return scores(val.confusion(net, card.num_classes, amp, offset), card.classes)


def _measured_offset(net, card: ModelCard, val: _ValSet, amp) -> tuple[float, float]:
    """The annotation's sub-pixel offset measured on the validation pages (emseg.infer.alignment)."""
    return tuple(round(o, 3) for o in estimate_offset(val.numpy_pairs(net, card.num_classes, amp)))


def _better_offset(net, card: ModelCard, val: _ValSet, amp, offset,
                   before: dict | None = None) -> tuple[tuple[float, float], dict]:
    """``offset`` if moving the predictions by it scores a higher validation mean IoU than the card's
    offset so far (``before``: those scores, if known), else the card's offset; with a summary holding
    the validation scores of the offset returned."""
    current = tuple(float(o) for o in card.label_offset)
    summary = {"before": list(current)}
    if not is_offset(offset) and not is_offset(current):
        return (0.0, 0.0), summary
    before = before or _validate(net, val, card, amp)
    after = _validate(net, val, card, amp, offset)
    summary.update(mean_iou_before=before["mean_iou"], mean_iou_measured=after["mean_iou"], validation=before)
    if (after["mean_iou"] or 0) > (before["mean_iou"] or 0):
        summary["validation"] = after
        return (tuple(offset) if is_offset(offset) else (0.0, 0.0)), summary
    return current, summary


class WeightAverage(nn.Module):
    """An exponential moving average of a network's weights and float buffers (batch-norm
    statistics), updated in one fused operation per step (``torch._foreach_lerp_``) with no host
    synchronisation; integer buffers (batch-norm's batch count) are copied.

    Its decay grows with the updates, ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so it
    spans about the last tenth of the steps so far: short runs (fine-tuning, tests) are not held back
    by their first weights. Same averages, and the same ``state_dict`` layout (``n_averaged``,
    ``module.*``), as ``torch.optim.swa_utils.AveragedModel`` with that decay and ``use_buffers``.
    """

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(net)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=next(net.parameters()).device))
        self._count = 0  # on the host: reading n_averaged would synchronise
        self._pairs: tuple[int, list, list, list, list] | None = None

    def _tensors(self, net: nn.Module):
        if self._pairs is None or self._pairs[0] != id(net):
            mine = list(self.module.parameters()) + list(self.module.buffers())
            theirs = list(net.parameters()) + list(net.buffers())
            floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
            others = [(a, b) for a, b in zip(mine, theirs) if not a.is_floating_point()]
            self._pairs = (id(net), [a for a, _ in floats], [b.detach() for _, b in floats],
                           [a for a, _ in others], [b.detach() for _, b in others])
        return self._pairs[1:]

    @torch.no_grad()
    def update_parameters(self, net: nn.Module) -> None:
        averaged, current, counts, current_counts = self._tensors(net)
        if self._count == 0:
            torch._foreach_copy_(averaged, current)
        else:
            keep = min(self.decay, (1 + self._count) / (10 + self._count))
            torch._foreach_lerp_(averaged, current, 1.0 - keep)
        if counts:
            torch._foreach_copy_(counts, current_counts)
        self._count += 1
        self.n_averaged.fill_(self._count)

    def load_state_dict(self, state_dict, strict: bool = True):
        result = super().load_state_dict(state_dict, strict)
        self._count = int(self.n_averaged)
        return result


def _averaged(net: nn.Module, decay: float) -> WeightAverage | None:
    """The run's :class:`WeightAverage` of ``net`` (``decay`` 0: none). One validation to the next,
    the weights of a CPU-length run move the validation IoU by 0.01-0.03; their average does not
    follow that noise (docs/training.md)."""
    return WeightAverage(net, decay) if decay else None


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
    from emseg.infer.predictor import Predictor
    predictor = Predictor(model, tile=tile, overlap=tile // 4, device=device)
    return predictor.predict_page(np.asarray(image)).argmax(0).astype(np.uint8)


# ---------------------------------------------------------------- the loop

def train(data: Sequence[Annotated], config: TrainConfig, out_dir: str | Path | None = None, *,
          base: Model | None = None, val_data: Sequence[Annotated] | None = None,
          preview_image: np.ndarray | None = None, progress: Callable[[TrainEvent], None] | None = None,
          stop: threading.Event | None = None, resume: bool = False) -> TrainResult:
    """Train a new model (or fine-tune ``base``) on annotated pages; see the module docstring.

    Args:
        data: training pages (images normalised with the card's normalisation, see emseg.train.data).
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
    out, device, rng, resuming = start_run(config, out_dir, resume)
    classes = _classes_of(data, config, base, out if resuming else None)
    train_items, val_items = _held_out(data, val_data, config)

    sizes = {it.pixel_size_nm for it in data}
    if is_new_task(base, classes, config.head) and config.pixel_size_nm is None and len(sizes) == 1:
        config = replace(config, pixel_size_nm=sizes.pop())  # the pages' own, for the new model's card
    if base is not None:
        config = replace(config, fresh_decoder=_decoder_afresh(config, base, classes))  # as the card records it
    net, card = _prepare_network(config, classes, base)
    _warn_other_pixel_sizes(list(train_items) + list(val_items or []), card.pixel_size_nm)
    card = card.updated(follow_label_offset=bool(config.label_offset))
    opt = _Optimisation(net, config, device)
    state = {"step": 0, "history": [], "best_metric": None, "bad_validations": 0, "label_offset": None}
    best_state = {k: v.detach().clone() for k, v in opt.evaluated.state_dict().items()}
    if resuming:
        state = load_checkpoint(out / "checkpoint", net, opt.optimizer, opt.scheduler, config, opt.averaged)
        best_state = state.pop("best_weights")
        opt.schedule.total = opt.planned  # LambdaLR restores the callable's attributes; the new run decides
        rng = np.random.default_rng([config.seed, state["step"]])
        log.info("resumed from %s at step %d", out / "checkpoint", state["step"])
    sampled = train_items
    if is_offset(state.get("label_offset")):  # resumed after the training images were moved
        card = card.updated(label_offset=tuple(state["label_offset"]))
        sampled = _moved(train_items, card.label_offset)
    batches = _Batches(sampled, config, device, rng, _border_of(config, classes), state)
    val_set = _ValSet(val_items, card.normalization, device, config.tile_size) if val_items else None
    writer = _CheckpointWriter(out / "checkpoint", _weights_bytes(net)) if out is not None else None
    meter = _LossMeter(device)
    clock = _Clock(config)
    stopped = False
    try:
        while state["step"] < opt.schedule.total:
            if stop is not None and stop.is_set():
                stopped = True
                break
            loss = opt.step(*batches.next(), card.normalization)
            state["step"] += 1
            validating = state["step"] % config.val_every == 0 or state["step"] == opt.schedule.total
            meter.add(loss, read=validating)
            clock.tick(opt.schedule, state["step"])
            event = TrainEvent(state["step"], opt.schedule.total, meter.value, opt.scheduler.get_last_lr()[-1])
            if validating:
                event = _end_of_epoch(state, event, meter.take_running(), opt.evaluated, card, val_set, device,
                                      config, opt.amp, best_state, preview_image, clock.start)
                if (config.label_offset and val_items
                        and ALIGN_AT * opt.schedule.total <= state["step"] < opt.schedule.total):
                    card = _follow_offset(state, event, opt, card, val_set, batches, train_items)
                if writer is not None:  # after the offset's measurement and any move, which belong in it too
                    writer.save(net, opt.averaged, opt.optimizer, opt.scheduler, config, state, best_state, card,
                                last=state["step"] >= opt.schedule.total)
                if state["bad_validations"] >= config.patience:
                    log.info("stopping early: no improvement in %d validations", config.patience)
                    if progress:
                        progress(event)
                    break
            if progress:
                progress(event)
    finally:
        batches.close()
        if writer is not None:
            writer.close()
    _final_weights(net, opt, best_state, state, val_items)
    best_val = _best_validation(state)
    share_summary = None
    if config.base_share:
        best_val, share_summary = _averaged_with_base(net, base, config, classes, val_set, card, opt.amp, best_val,
                                                      state["step"])
    offset_summary = None
    if val_items and config.label_offset:
        card, best_val, offset_summary = _final_offset(net, card, val_set, opt.amp, state, best_val)
    summary = _training_summary(config, data, val_items, state, best_val, base, clock.start)
    if offset_summary is not None:
        summary["label_offset"] = offset_summary
    if share_summary is not None:
        summary["base_share"] = share_summary
    model = Model(net.cpu(), card.updated(training=summary))
    model_path = None
    if out is not None:
        model_path = model.save(out / "model.safetensors")
        _write_reports(out, state["history"], model, val_items)
    return TrainResult(model, model_path, state["history"], state["best_metric"], stopped)


# ---------------------------------------------------------------- the parts of a run

def start_run(config, out_dir: str | Path | None, resume: bool):
    """``(run folder or None, device, numpy generator, resuming)`` of a run: the seeds set, the folder checked
    (one that holds a checkpoint is refused unless ``resume``)."""
    out = Path(out_dir) if out_dir is not None else None
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if out is not None:
        check_run_folder(out, resume)
    return out, device, rng, resume and out is not None and has_checkpoint(out / "checkpoint")


def _classes_of(data: Sequence[Annotated], config: TrainConfig, base: Model | None,
                checkpoint_folder: Path | None) -> tuple[str, ...]:
    """The run's class names: the config's, the base model's, a resumed checkpoint's, or class_1.. from the
    largest label in the masks; checked against the masks."""
    classes = tuple(config.classes) if config.classes else (base.classes if base else None)
    if classes is None and checkpoint_folder is not None:
        classes = checkpoint_classes(checkpoint_folder / "checkpoint")
    if classes is None:
        top = max(int(it.target[it.target != IGNORE].max(initial=0)) for it in data)
        classes = ("background",) + tuple(f"class_{i}" for i in range(1, max(top, 1) + 1))
    check_classes(data, classes)
    return classes


def _held_out(data: Sequence[Annotated], val_data: Sequence[Annotated] | None,
              config: TrainConfig) -> tuple[list[Annotated], list[Annotated]]:
    """Training and validation pages: ``val_data`` if given, else ``config.val_fraction`` of every page."""
    if val_data is None:
        train_items, val_items = split_regions(data, config.val_fraction)
    else:
        train_items, val_items = list(data), list(val_data)
    if not val_items:
        log.warning("no annotated pixel is held out for validation; the last weights are kept instead of the best")
    return train_items, val_items


def _border_of(config: TrainConfig, classes: tuple[str, ...]):
    """``(boundary class, weight, sigma)`` of the border weighting, or None where it does not apply."""
    boundary = boundary_class_of(classes)
    if config.border_weight <= 0 or boundary is None:
        return None
    if config.sparse:
        log.info("border weighting needs dense masks with a boundary class (e.g. 'membrane'); not used "
                 "with sparse labels, whose regions are unknown")
        return None
    return boundary, config.border_weight, config.border_sigma


class _Optimisation:
    """The network on its device with its optimiser, LR schedule, loss, mixed precision and the moving
    average of its weights (``evaluated``: what is validated, kept as best and written)."""

    def __init__(self, net: nn.Module, config: TrainConfig, device: torch.device):
        # channels-last: 1.16x (vgg11_bn_slim) and 1.28x (densenet_slim) per CPU training step (docs/training.md)
        self.net = net.to(device, memory_format=torch.channels_last)
        self.device = device
        # frozen for a while: in the optimiser from the start, without gradients (skipped) until then
        self.frozen_until = 0 if config.freeze_encoder else config.freeze_encoder_steps
        if config.freeze_encoder or self.frozen_until:
            for p in net.encoder.parameters():
                p.requires_grad_(False)
        self.freeze_bn = config.freeze_bn if config.freeze_bn is not None else config.batch_size <= 2
        params = [p for p in net.parameters() if p.requires_grad or self.frozen_until]
        if config.encoder_lr_scale != 1:  # the rest last: its rate is the one reported
            encoder = {id(p) for p in net.encoder.parameters()}
            params = [g for g in ({"params": [p for p in params if id(p) in encoder],
                                   "lr": config.lr * config.encoder_lr_scale},
                                  {"params": [p for p in params if id(p) not in encoder]}) if g["params"]]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.planned = DEFAULT_STEPS if config.fills_time else config.steps  # until the pace is known
        self.schedule = _Schedule(self.planned, config.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.loss_fn = _Loss(config.dice_weight).to(device)
        self.use_amp = device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.averaged = _averaged(net, config.ema_decay)
        self.evaluated = self.averaged.module if self.averaged is not None else net

    def amp(self):
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return torch.autocast("cpu", enabled=False)

    def step(self, images: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
             norm: Normalization) -> torch.Tensor:
        """One optimiser step on a batch (raw images, uint8 targets); returns the loss, on the device."""
        device = self.device
        if self.frozen_until and self.scheduler.last_epoch >= self.frozen_until:
            for p in self.net.encoder.parameters():
                p.requires_grad_(True)
            log.info("the encoder trains too from step %d", self.scheduler.last_epoch)
            self.frozen_until = 0
        _set_train_mode(self.net, self.freeze_bn)
        images = ((images.to(device, non_blocking=True) - norm.mean) / norm.std).contiguous(
            memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True).long()  # uploaded as uint8
        weights = weights.to(device, non_blocking=True) if weights is not None else None
        with self.amp():
            loss = self.loss_fn(self.net(images).float(), targets, weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.net)
        return loss.detach()


class _Batches:
    """The training batches: cut and augmented on the device (DeviceBatches) or by CPU threads (Prefetcher)."""

    def __init__(self, items: Sequence[Annotated], config: TrainConfig, device: torch.device,
                 rng: np.random.Generator, border, state: dict):
        self.config, self.device, self.state = config, device, state
        bias = 0.9 if config.sparse else 0.5
        self.on_device = _augment_on_device(config, device, items)
        if self.on_device:
            from emseg.train.augment_device import DeviceCropSampler
            maps = [border_weights(it.target, *border) for it in items if it.annotated] if border else None
            self.sampler = DeviceCropSampler(items, config.tile_size, config=config.augment, device=device,
                                             seed=int(rng.integers(2**31)), bias=bias, border_maps=maps)
            log.info("training batches are cut and augmented on %s", device)
        else:
            self.sampler = CropSampler(items, config.tile_size, rng=rng,
                                       transform=build_transform(config.augment, seed=int(rng.integers(2**31))),
                                       bias=bias, border=border)
            self.workers = loader_workers(config.loader_workers, device)
            if self.workers > 1:
                log.info("%d threads make the training batches", self.workers)
        self._source = self._start()

    def _start(self):
        config = self.config
        if self.on_device:
            from emseg.train.augment_device import DeviceBatches
            return DeviceBatches(self.sampler, config.batch_size)
        spawned = [self.sampler.spawn([config.seed, self.state["step"], i]) for i in range(1, self.workers)]
        return Prefetcher([self.sampler] + spawned, config.batch_size, pin=self.device.type == "cuda")

    def next(self):
        """``(images, targets, weights)`` of the next batch."""
        return self._source.next()

    def move_to(self, items: Sequence[Annotated]) -> None:
        """Go on with the same sampling on other pages (the images moved onto their annotation)."""
        self._source.close()
        self.sampler = self.sampler.with_items(items)
        if not self.on_device:
            self.sampler = self.sampler.spawn([self.config.seed, self.state["step"], 0])
        self._source = self._start()

    def close(self) -> None:
        self._source.close()


class _LossMeter:
    """The training loss, read back from the device (a host synchronisation) every step on the CPU and
    every LOSS_READ_EVERY steps, and at validations, on an accelerator."""

    def __init__(self, device: torch.device):
        self.every = 1 if device.type == "cpu" else LOSS_READ_EVERY
        self.sum = torch.zeros((), device=device)
        self.count, self.value = 0, float("nan")
        self.running: list[float] = []

    def add(self, loss: torch.Tensor, *, read: bool) -> None:
        self.sum += loss
        self.count += 1
        if self.count >= self.every or read:
            self.value = float(self.sum) / self.count
            self.running.extend([self.value] * self.count)
            self.sum.zero_()
            self.count = 0

    def take_running(self) -> list[float]:
        """The losses since the last validation (and forget them)."""
        running, self.running = self.running, []
        return running


class _Clock:
    """The run's start, and with a time limit the pace that fits the schedule into it."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.start = time.perf_counter()
        self.timed_from = None

    def tick(self, schedule: _Schedule, step: int) -> None:
        config = self.config
        if config.time_limit_minutes and self.timed_from is None and step >= 5:
            self.timed_from = (time.perf_counter(), step)
        elif self.timed_from is not None and (step == self.timed_from[1] + 20 or (
                step % config.val_every == 1 and step > self.timed_from[1] + 20)):
            # first estimate after 20 timed steps, then again after every validation
            _fit_schedule_to_time(schedule, config, step, self.timed_from, self.start)


def _follow_offset(state: dict, event: TrainEvent, opt: _Optimisation, card: ModelCard, val_set: _ValSet,
                   batches: _Batches, train_items: Sequence[Annotated]) -> ModelCard:
    """The annotation's offset during the run: measured a quarter into it, then at every validation until
    REALIGN_UNTIL; the training images follow the mean of the measurements when it has moved by REALIGN_BY.
    Returns the card (with the offset followed)."""
    first = state.get("label_offset") is None
    if not (first or state["step"] < REALIGN_UNTIL * opt.schedule.total):
        return card
    evaluated, amp = opt.evaluated, opt.amp
    moved_by = (0.0, 0.0) if first else tuple(state["label_offset"])
    measurement = _measured_offset(evaluated, card, val_set, amp)
    state["history"][-1]["offset_measured"] = list(measurement)
    state.setdefault("offset_measurements", []).append([state["step"], *measurement])
    target = _mean_offset(state["offset_measurements"])
    offset = moved_by
    if first or not _within(target, moved_by, REALIGN_BY):
        offset, _ = _better_offset(evaluated, card, val_set, amp, target, event.metrics)
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
        batches.move_to(_moved(train_items, offset))
    return card


def _final_weights(net: nn.Module, opt: _Optimisation, best_state: dict, state: dict, val_items) -> None:
    """Load the weights the run ends with: the best validated ones, else the moving average, else the last."""
    if val_items and state["best_metric"] is not None:
        net.load_state_dict(best_state)
    elif opt.averaged is not None:
        net.load_state_dict(opt.evaluated.state_dict())
    net.eval().to(memory_format=torch.contiguous_format)


def _averaged_with_base(net: nn.Module, base: Model | None, config: TrainConfig, classes: tuple[str, ...],
                        val_set, card: ModelCard, amp, best_val: dict | None, step: int) -> tuple[dict | None, dict | None]:
    """WiSE-FT (Wortsman et al. 2022): the run's final weights averaged with the base's, ``config.base_share`` of
    the base's (batch-norm statistics too), or with ``"auto"`` the share of BASE_SHARES (0 included: the fine-tuned
    weights alone) that scores the highest validation mean IoU, unless the base alone scores more than BLEND_MARGIN
    below the fine-tuned weights there (a base that does not know the new pages: half-way between the two, inverted
    grey levels scored 0.31 where the fine-tuned weights scored 0.59). Only for the base's own classes: a re-made
    head has nothing to average with. Returns the validation of the weights ``net`` ends with, and a summary for the card
    (None when nothing was averaged)."""
    if base is None:
        return best_val, None
    if _fresh_head(config.head, base, classes):
        log.warning("base_share: the output head was made afresh for other classes; nothing averaged with the base")
        return best_val, None
    tuned = {k: v.detach().clone() for k, v in net.state_dict().items()}
    base_state = base.net.state_dict()
    share, summary = config.base_share, {}
    if share == "auto":
        if val_set is None:
            log.warning("base_share auto: no validation pages to choose a share on; the fine-tuned weights are kept "
                        "alone")
            return best_val, {"chosen": 0.0, "how": "no validation pages"}
        metrics = {}
        for candidate in (*BASE_SHARES, 1.0):  # 1: the base alone, to see whether it knows these pages at all
            net.load_state_dict(weights_with_base(tuned, base_state, candidate))
            metrics[candidate] = _validate(net, val_set, card, amp)
        scored = {c: m["mean_iou"] or 0.0 for c, m in metrics.items()}
        alone = scored.pop(1.0)
        summary = {"how": "validation", "validation_mean_iou": {f"{c:g}": scored[c] for c in scored},
                   "base_alone_mean_iou": alone}
        if alone < scored[0.0] - BLEND_MARGIN:
            share = 0.0
            summary["how"] = "the base alone scores too far below the fine-tuned weights to blend with"
            log.info("base_share auto: the base alone scores %.4f on the validation pages, the fine-tuned weights "
                     "%.4f: not blended (a base that does not know these pages)", alone, scored[0.0])
        else:
            share = max(scored, key=scored.get)  # the first of equals: the least base
            log.info("base_share auto: validation mean IoU %s (the base alone %.4f); %.0f %% of the base's weights "
                     "kept", ", ".join(f"{100 * c:.0f} % base {scored[c]:.4f}" for c in scored), alone, 100 * share)
        net.load_state_dict(weights_with_base(tuned, base_state, share))
        val = metrics[share]  # validated in the scan above
    else:
        log.info("the fine-tuned weights averaged with the base's (%.0f %% base)", 100 * share)
        net.load_state_dict(weights_with_base(tuned, base_state, share))
        val = _validate(net, val_set, card, amp) if val_set is not None else None
    return ({"step": step, "val": val} if val is not None else best_val), {"chosen": share, **summary}


def encoder_strides(encoder: nn.Module, size: int = 64) -> dict[str, int]:
    """The stride (input pixels per output pixel) at which each entry of ``encoder``'s state dict works: that of the
    output of the layer holding it, found by running ``encoder`` once on a blank ``size`` x ``size`` image."""
    found: dict[str, int] = {}

    def record(name):
        def hook(module, inputs, output):
            found.setdefault(name, size // output.shape[-1])
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in encoder.named_modules()
             if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None]
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad():
            channels = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d)).in_channels
            encoder(torch.zeros(1, channels, size, size, device=next(encoder.parameters()).device))
    finally:
        encoder.train(was_training)
        for h in hooks:
            h.remove()
    return {k: found[k.rpartition(".")[0]] for k in encoder.state_dict()}


def weights_with_base(tuned: dict, base: dict, base_share: float) -> dict:
    """A state dict of ``base_share`` of ``base``'s weights and the rest of ``tuned``'s (floating-point entries,
    batch-norm statistics included; counters kept from ``tuned``)."""
    return {k: (1 - base_share) * v + base_share * base[k].to(v.device) if v.is_floating_point() else v
            for k, v in tuned.items()}


def _best_validation(state: dict) -> dict | None:
    """The history record of the best validation (or the best mean IoU of a checkpoint of an older emseg)."""
    validated = [h for h in state["history"] if h.get("val")]
    best_val = next((h for h in validated if h["step"] == state.get("best_step")), None)
    if best_val is None and validated:  # a checkpoint of an older emseg, or no validation improved
        best_val = max(validated, key=lambda h: h["val"]["mean_iou"] or 0)
    return best_val


def _final_offset(net: nn.Module, card: ModelCard, val_set: _ValSet, amp, state: dict, best_val: dict | None):
    """The annotation's offset measured once more on the final weights: the card's offset (kept where it
    scores better), the best validation's scores with it, and the summary of the offset's history."""
    measurement = _measured_offset(net, card, val_set, amp)
    measurements = state.get("offset_measurements", []) + [[state["step"], *measurement]]
    offset, measured = _better_offset(net, card, val_set, amp, _mean_offset(measurements))
    if offset != tuple(card.label_offset) and is_offset(offset):
        _log_offset("predictions are moved to match", offset, measured["mean_iou_before"],
                    measured["mean_iou_measured"])
    card = card.updated(label_offset=offset, follow_label_offset=True)
    if "validation" in measured:
        best_val = dict(best_val or {}, val=measured["validation"])
    summary = {
        "images_moved_by": state.get("label_offset") or [0.0, 0.0],
        "moves": [[h["step"], *h["images_moved_by"]] for h in state["history"] if h.get("images_moved_by")],
        "measurements": measurements, "measured_at_end": list(measurement), "used": list(offset),
        **{k: v for k, v in measured.items() if k.startswith("mean_iou")}}
    return card, best_val, summary


def _moved(items: Sequence[Annotated], offset) -> list[Annotated]:
    """The pages with their images moved by ``offset`` (emseg.infer.alignment), targets unchanged."""
    return [replace(it, image=shift_image(it.image, offset)) for it in items]


def _augment_on_device(config: TrainConfig, device: torch.device, items: Sequence[Annotated]) -> bool:
    """Whether batches are made on the training device: ``augment_on`` "device", or "auto" on an
    accelerator when the pages take less than a quarter of its free memory."""
    if config.augment_on == "cpu" or (config.augment_on == "auto" and device.type == "cpu"):
        return False
    if config.augment_on == "auto" and device.type == "cuda":
        from emseg.train.augment_device import DeviceCropSampler
        free, _ = torch.cuda.mem_get_info(device)
        needed = DeviceCropSampler.nbytes(items, config.tile_size)
        if needed > free / 4:
            log.info("the training pages (%.1f GiB) are too large to hold on the GPU; batches are made on the CPU",
                     needed / 2**30)
            return False
    return True


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
        first = not getattr(schedule, "fitted", False)
        (log.info if first else log.debug)(
            "time limit %g min: about %.3f s per step, so %d steps%s", config.time_limit_minutes, pace, fits,
            "" if config.fills_time or not first else f" instead of {config.steps}")
        schedule.total = fits
        schedule.fitted = True


def _end_of_epoch(state, event, running, net, card, val_set, device, config, amp, best_state,
                  preview_image, start) -> TrainEvent:
    """Validate ``net`` (the moving average of the weights, if kept), keep the best weights, log;
    returns the event with metrics attached."""
    record = {"step": state["step"], "loss": float(np.mean(running)) if running else None,
              "lr": event.lr, "seconds": round(time.perf_counter() - start, 1)}
    if val_set is not None:
        metrics = _validate(net, val_set, card, amp)
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


def _weights_bytes(net: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


class _CheckpointWriter:
    """Writes the resumable checkpoint and log.json in a background thread, off the training loop.

    The tensors are copied to the host on the training thread (a consistent snapshot), then written
    while training goes on; a save waits for the previous one to finish. A model larger than
    :data:`LARGE_MODEL_BYTES` (a full VGG-16-BN U-Net's checkpoint is ~0.5 GB) is checkpointed at
    most every :data:`CHECKPOINT_SECONDS`, and at the end of the run; smaller ones at every validation.
    """

    def __init__(self, folder: Path, weights_bytes: int):
        self.folder = folder
        self.every = CHECKPOINT_SECONDS if weights_bytes > LARGE_MODEL_BYTES else 0.0
        self.last = time.perf_counter()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def save(self, net, averaged, optimizer, scheduler, config, state, best_state, card, *, last: bool = False) -> None:
        log_text = json.dumps(state["history"], indent=1)
        if not last and time.perf_counter() - self.last < self.every:
            (self.folder.parent / "log.json").write_text(log_text)
            return
        self._wait()
        tensors, meta = checkpoint_payload(net, optimizer, scheduler, config, state, best_state, card.classes,
                                           averaged)
        self.last = time.perf_counter()

        def write():
            try:
                write_checkpoint(self.folder, tensors, meta)
                (self.folder.parent / "log.json").write_text(log_text)
            except BaseException as exc:  # noqa: BLE001 - raised on the training thread at the next save
                self.error = exc
        self.thread = threading.Thread(target=write, name="emseg-checkpoint", daemon=False)
        self.thread.start()

    def close(self) -> None:
        self._wait()


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
    if base is not None and base.card.is_pretrained:
        pre = base.card.pretrained
        summary["pretrained_from"] = {"name": base.card.name, "path": str(base.path) if base.path else None,
                                      **{k: pre.get(k) for k in ("objective", "sources", "pages", "steps", "seconds")}}
    elif base is not None:
        summary["fine_tuned_from"] = {"name": base.card.name, "path": str(base.path) if base.path else None,
                                      "training": base.card.training.get("sources")}
    return summary


def _write_reports(out: Path, history: list[dict], model: Model, val_items: Sequence[Annotated]) -> None:
    from emseg.analysis.reports import plot_curves, plot_validation
    if history:
        plot_curves(history, out / "curves.png")
    if val_items:
        plot_validation(model, val_items, out / "validation.png")
