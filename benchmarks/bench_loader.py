"""How fast the training batches are made: albumentations in 1, 2, ... loader threads (the CPU
path), and the batched torch augmentation of emseg.train.augment_device (the GPU path) on a device.

    python benchmarks/bench_loader.py [--threads 1,2,4,8] [--batches 60] [--device cpu|cuda]

Makes batches of 8 x 256 px crops with the EM augmentation preset and the border weight maps, as
`emseg train` does on membrane data, and prints batches per second for every thread count of the
CPU path and for the device path (nothing else running). The device path on the CPU runs on one
torch thread, so its figure is batches per second per core, comparable with one loader thread; on a
GPU it is the rate at which the GPU makes batches between steps. Uses ISBI 2012 slices 0-23 from
../shared/data when present, else a synthetic stack of the same size.
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
DATA = ROOT.parent / "shared" / "data" / "isbi2012"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default 1, 2, 4, ... up to the cores)")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per thread count")
    parser.add_argument("--device", default="cpu", help="where the device path runs (default cpu)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import torch

    from emseg.train.augment import AugmentConfig, build_transform
    from emseg.train.data import CropSampler, Prefetcher
    from emseg.train.loop import TrainConfig, annotations_from_arrays

    cores = os.cpu_count() or 1
    counts = ([int(c) for c in args.threads.split(",")] if args.threads
              else sorted({*(2 ** k for k in range(8) if 2 ** k < cores), cores}))
    if DATA.exists():
        import tifffile
        images = tifffile.imread(DATA / "train-volume.tif")[:24]
        masks = tifffile.imread(DATA / "train-membranes.tif")[:24]
        source = "ISBI 2012 slices 0-23"
    else:
        from emseg.synthetic import make_em_stack
        images, masks = make_em_stack(pages=24, height=512, width=512, seed=0)
        masks = (masks == 1).astype(np.uint8)
        source = "synthetic stack (../shared/data absent)"
    config = TrainConfig()
    items = annotations_from_arrays(images, masks, sparse=False, pixel_size_nm=4.0)
    sampler = CropSampler(items, config.tile_size, rng=np.random.default_rng(0),
                          transform=build_transform(AugmentConfig(), seed=0),
                          border=(1, config.border_weight, config.border_sigma))
    torch.set_num_threads(1)  # the loader's own work only; torch is not used to make crops
    print(f"{source}; batch {config.batch_size} x {config.tile_size} px, EM preset, border weights; "
          f"{cores} cores ({platform.processor() or platform.machine()})")
    results = []
    for n in counts:
        loader = Prefetcher([sampler] + [sampler.spawn(i) for i in range(1, n)], config.batch_size)
        for _ in range(2 * n):  # warm-up: every thread has started
            loader.next()
        t0 = time.perf_counter()
        for _ in range(args.batches):
            loader.next()
        rate = args.batches / (time.perf_counter() - t0)
        loader.close()
        results.append({"threads": n, "batches_per_s": rate, "ms_per_batch": 1000 / rate})
        print(f"{n:2d} thread(s): {rate:6.1f} batches/s ({1000 / rate:5.0f} ms per batch, "
              f"{rate / results[0]['batches_per_s']:.2f}x one thread)")
    from emseg.train.augment_device import DeviceCropSampler
    from emseg.train.data import border_weights
    device = torch.device(args.device)
    maps = [border_weights(it.target, 1, config.border_weight, config.border_sigma) for it in items]
    on_device = DeviceCropSampler(items, config.tile_size, config=AugmentConfig(), device=device, seed=0,
                                  bias=0.5, border_maps=maps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        on_device.batch(config.batch_size)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        on_device.batch(config.batch_size)
    sync()
    rate = args.batches / (time.perf_counter() - t0)
    results.append({"device_path": str(device), "batches_per_s": rate, "ms_per_batch": 1000 / rate})
    print(f"device path on {device} ({torch.get_num_threads()} torch thread(s)): {rate:6.1f} batches/s "
          f"({1000 / rate:5.0f} ms per batch, {rate / results[0]['batches_per_s']:.2f}x one albumentations thread)")
    if args.json:
        args.json.write_text(json.dumps({"source": source, "cores": cores, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
