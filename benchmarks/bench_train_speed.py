"""Is training starved by batch making? emseg's training loop against the same network's bare step.

    python benchmarks/bench_train_speed.py [--device cuda] [--steps 300] [--encoder vgg11_bn_slim]

Two step rates, same network, same batch (8 crops of 256 px), same optimiser (AdamW), same execution
settings (channels-last; bf16 autocast on CUDA):

* synthetic: random tensors already on the device, forward + loss + backward + optimiser step + the
  weights' moving average, nothing else: what the device can do;
* emseg: ``emseg.train.loop.train`` with the defaults (EM augmentation, border weights, batches made on
  the device on a GPU and by albumentations threads on the CPU), on ISBI 2012 slices 0-23 from
  ../shared/data (EMSEG_BENCH_DATA) when present, else a synthetic stack of the same size; no
  validation inside the timed steps (``val_every`` beyond them), and the first steps (warm-up,
  cudnn's kernel choice) left out.

The goal on a GPU: emseg at >= 80 % of the synthetic rate. On the CPU the figure is a proxy: the
step time of emseg's loop against the bare step (the augmentation threads compete for the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMSEG_BENCH_DATA", ROOT.parent / "shared" / "data")) / "isbi2012"
WARMUP = 25  # steps left out (a multiple of the loss read-back interval, where the device is in step)


def synthetic_rate(encoder: str, device, steps: int, batch: int, tile: int) -> float:
    import torch

    from emseg.model.networks import build_unet
    from emseg.train.loop import TrainConfig, _averaged, _Loss
    config = TrainConfig()
    torch.manual_seed(0)
    net = build_unet(encoder, 2).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    averaged = _averaged(net, config.ema_decay)
    loss_fn = _Loss(config.dice_weight).to(device)
    x = torch.randn(batch, 1, tile, tile, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch, tile, tile), device=device)
    w = torch.rand(batch, tile, tile, device=device) + 1
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(steps + WARMUP):
        if i == WARMUP:
            sync()
            start = time.perf_counter()
        with amp():
            loss = loss_fn(net(x).float(), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        averaged.update_parameters(net)
    sync()
    return steps / (time.perf_counter() - start)


def emseg_rate(encoder: str, device, steps: int) -> tuple[float, str]:
    from emseg.train.loop import TrainConfig, annotations_from_arrays, train
    if (DATA / "train-volume.tif").exists():
        import tifffile
        images = tifffile.imread(DATA / "train-volume.tif")[:24]
        masks = tifffile.imread(DATA / "train-membranes.tif")[:24]
        source = "ISBI 2012 slices 0-23"
    else:
        from emseg.synthetic import make_em_stack
        images, masks = make_em_stack(pages=24, height=512, width=512, seed=0)
        masks = (masks == 1).astype(np.uint8) * 255
        source = "synthetic stack (ISBI 2012 absent)"
    items = annotations_from_arrays(images, masks, sparse=False, pixel_size_nm=4.0)
    total = steps + WARMUP
    config = TrainConfig(encoder=encoder, classes=("background", "membrane"), steps=total, val_every=10 * total,
                         device=str(device), label_offset=False)
    marks = {}

    def progress(event):
        if event.step in (WARMUP, total):
            marks[event.step] = time.perf_counter()
    train(items, config, None, val_data=items[:1], progress=progress)
    return steps / (marks[total] - marks[WARMUP]), source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 300 on a GPU, 10 on the CPU)")
    parser.add_argument("--encoder", default=None, help="default: emseg's default encoder")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import torch

    from emseg.model.networks import DEFAULT_ENCODER
    device = torch.device(args.device)
    steps = args.steps or (300 if device.type == "cuda" else 10)
    encoder = args.encoder or DEFAULT_ENCODER
    bare = synthetic_rate(encoder, device, steps, 8, 256)
    ours, source = emseg_rate(encoder, device, steps)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else "")
    print(f"Machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads.")
    print(f"U-Net {encoder}, batch 8 x 256 px, {steps} timed steps after {WARMUP}, device {device}; emseg on {source}.")
    print("| loop | steps/s | ms per step |\n|---|---:|---:|")
    for name, rate in (("synthetic (tensors on the device)", bare), ("emseg train (defaults)", ours)):
        print(f"| {name} | {rate:.2f} | {1000 / rate:.1f} |")
    print(f"emseg / synthetic: {ours / bare:.0%} (goal on a GPU: >= 80 %)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "encoder": encoder, "device": str(device),
                                         "steps": steps, "synthetic": bare, "emseg": ours, "source": source}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
