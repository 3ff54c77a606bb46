"""How fast the training batches are made with 1, 2, ... loader threads (emseg's defaults).

    python benchmarks/bench_loader.py [--threads 1,2,4,8] [--batches 60]

Makes batches of 8 x 256 px crops with the EM augmentation preset and the border weight maps, as
`emseg train` does on membrane data, and prints batches per second for every thread count (nothing
else running). A GPU training step of the default model takes far less than one thread needs for a
batch, so this rate, not the GPU, sets the pace of GPU training; `TrainConfig.loader_workers` (the
`--loader-workers` flag) picks the thread count. Uses ISBI 2012 slices 0-23 from ../shared/data
when present, else a synthetic stack of the same size.
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
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import torch
    from emseg.augment import AugmentConfig, build_transform
    from emseg.dataset import CropSampler, Prefetcher
    from emseg.training import TrainConfig, annotations_from_arrays

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
    if args.json:
        args.json.write_text(json.dumps({"source": source, "cores": cores, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
