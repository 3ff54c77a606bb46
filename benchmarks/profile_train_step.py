"""Where the time of one CPU training step goes (emseg's defaults, ISBI 2012 crops).

    python benchmarks/profile_train_step.py [--encoder vgg11_bn_slim] [--steps 12] [--border-weight 0] [--compile]

Times, per step of batch 8 x 256 px: making the batch (crop + augment, done by a background
thread during training), forward, loss, backward, the optimizer step and the update of the
weights' moving average, in channels-last and in
the default memory format (and, with --compile, channels-last under torch.compile), and prints
torch.profiler's top operators. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "isbi2012"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--border-weight", type=float, default=0.0)
    parser.add_argument("--compile", action="store_true",
                        help="also time the channels-last step with the network under torch.compile (inductor)")
    parser.add_argument("--full-resolution-skip", action="store_true",
                        help="time the U-Net whose last decoder block takes the encoder's full-resolution features")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return 0
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import tifffile

    from emseg.model.networks import DEFAULT_ENCODER, build_unet
    from emseg.train.augment import AugmentConfig, build_transform
    from emseg.train.data import CropSampler
    from emseg.train.loop import TrainConfig, _averaged, _Loss, annotations_from_arrays

    config = TrainConfig()
    encoder = args.encoder or DEFAULT_ENCODER
    images = tifffile.imread(DATA / "train-volume.tif")[:24]
    masks = tifffile.imread(DATA / "train-membranes.tif")[:24]
    items = annotations_from_arrays(images, masks, sparse=False, pixel_size_nm=4.0)
    t0 = time.perf_counter()
    border = (1, args.border_weight, config.border_sigma) if args.border_weight else None
    sampler = CropSampler(items, config.tile_size, rng=np.random.default_rng(0),
                          transform=build_transform(AugmentConfig(), seed=0), border=border)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = [sampler.batch(config.batch_size) for _ in range(args.steps)]
    data_s = (time.perf_counter() - t0) / args.steps
    variant = " (full-resolution skip)" if args.full_resolution_skip else ""
    print(f"{encoder}{variant}, batch {config.batch_size} x {config.tile_size} px, "
          f"torch threads {torch.get_num_threads()}")
    print(f"sampler set-up {setup:.2f} s (border weights: {bool(border)}); making one batch: {data_s * 1000:.0f} ms")
    variants = [(True, False), (False, False)] + ([(True, True)] if args.compile else [])
    for channels_last, compiled in variants:
        torch.manual_seed(0)
        net = build_unet(encoder, 2, full_resolution_skip=args.full_resolution_skip)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt).train()
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        averaged = _averaged(net, config.ema_decay)
        if compiled:
            t0 = time.perf_counter()
            net = torch.compile(net)
        loss_fn = _Loss(config.dice_weight)
        parts = {"forward": [], "loss": [], "backward": [], "optimizer": [], "average": []}
        for i, (x, y, w) in enumerate(batches):
            x = x.contiguous(memory_format=fmt)
            t = [time.perf_counter()]
            out = net(x)
            t.append(time.perf_counter())
            loss = loss_fn(out, y.long(), w)
            t.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t.append(time.perf_counter())
            opt.step()
            t.append(time.perf_counter())
            averaged.update_parameters(net)
            t.append(time.perf_counter())
            if compiled and i == 0:
                print(f"torch.compile: first step (compilation) {t[-1] - t0:.1f} s")
            if i >= 2:  # warm-up steps left out
                for k, name in enumerate(parts):
                    parts[name].append(t[k + 1] - t[k])
        total = sum(np.median(v) for v in parts.values())
        print(f"channels-last={channels_last}{', torch.compile' if compiled else ''}: step {total:.3f} s = " +
              ", ".join(f"{k} {np.median(v):.3f} s ({100 * np.median(v) / total:.0f} %)" for k, v in parts.items()))
    from torch.profiler import ProfilerActivity, profile
    net = build_unet(encoder, 2, full_resolution_skip=args.full_resolution_skip)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y, w in batches[:3]:
            loss = loss_fn(net(x.contiguous(memory_format=torch.channels_last)), y.long(), w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
