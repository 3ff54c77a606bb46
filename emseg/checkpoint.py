"""Resumable training checkpoints without pickle.

A checkpoint folder holds ``tensors.safetensors`` (current weights, their moving average, best weights, optimizer
tensors, torch RNG state) and ``state.json`` (step, history, scheduler and optimizer scalars,
the run's configuration). Both are written to temporary names and renamed, so an interrupted
write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import EmsegError

log = logging.getLogger(__name__)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_classes(folder: Path) -> tuple[str, ...] | None:
    """The class names a checkpoint was trained with (None when there is no readable checkpoint)."""
    try:
        return tuple(json.loads((folder / "state.json").read_text())["config"]["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_payload(net, optimizer, scheduler, config, state: dict, best_weights: dict,
                       classes: tuple[str, ...], averaged=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Host copies of everything a checkpoint holds: ``(tensors, meta)`` for :func:`write_checkpoint`;
    ``averaged``: the moving average of the weights (``emseg.training.WeightAverage``), if kept."""
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if averaged is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in averaged.state_dict().items()})
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_weights.items()})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"state": json.loads(json.dumps(state, default=str)), "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "config": {"encoder": config.encoder, "steps": config.steps, "seed": config.seed,
                       "classes": list(classes)}}
    return tensors, meta


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a checkpoint atomically (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp_t, tmp_j = folder / ".tensors.partial", folder / ".state.partial"
    save_file(tensors, str(tmp_t))
    tmp_j.write_text(json.dumps(meta, default=str))
    os.replace(tmp_t, folder / "tensors.safetensors")
    os.replace(tmp_j, folder / "state.json")


def save_checkpoint(folder: Path, net, optimizer, scheduler, config, state: dict, best_weights: dict,
                    classes: tuple[str, ...], averaged=None) -> None:
    """Write the checkpoint atomically, on this thread (:func:`checkpoint_payload`, :func:`write_checkpoint`)."""
    write_checkpoint(folder, *checkpoint_payload(net, optimizer, scheduler, config, state, best_weights, classes,
                                                 averaged))


def load_checkpoint(folder: Path, net, optimizer, scheduler, config, averaged=None) -> dict:
    """Restore weights, optimizer, scheduler, RNG and the weights' moving average (``averaged``; a
    checkpoint without one starts it afresh); returns the loop state with ``best_weights``."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "tensors.safetensors"))
    except (OSError, ValueError) as exc:
        raise EmsegError(f"{folder}: checkpoint cannot be read ({exc}); start afresh without --resume") from None
    if meta["config"]["encoder"] != config.encoder:
        raise EmsegError(f"{folder}: checkpoint is for encoder {meta['config']['encoder']}, not {config.encoder}; "
                         "resume with the same settings or use another output folder")
    if meta["config"]["steps"] != config.steps:
        log.info("%s: checkpoint was planned for %d steps, now %d", folder, meta["config"]["steps"], config.steps)
    device = next(net.parameters()).device
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    kept = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    if averaged is not None and kept:
        averaged.load_state_dict(kept)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    for group in optimizer.state.values():
        for key, value in group.items():
            if torch.is_tensor(value) and key != "step":
                group[key] = value.to(device)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    state = meta["state"]
    state["best_weights"] = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
    return state
