"""Peak memory of `emseg predict` on a short and a long stack of the same page size.

Shows that pages are streamed: the peak resident memory must not grow with the number of pages.
Each run is a fresh `emseg predict` process; its peak RSS comes from getrusage of the child.

    python benchmarks/bench_stack_memory.py [--pages 4 32] [--size 1024] [--encoder vgg11_bn_micro]

Prints a Markdown table (recorded in docs/inference.md with the machine it ran on).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch


def make_stack(path: Path, pages: int, size: int) -> None:
    rng = np.random.default_rng(0)
    page = rng.integers(0, 65535, (size, size), dtype=np.uint16)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i in range(pages):
            tw.write(np.roll(page, i, axis=0), photometric="minisblack", contiguous=True,
                     resolution=(1e7 / 5, 1e7 / 5), resolutionunit="CENTIMETER")


def run_predict(model: Path, stack: Path, out: Path, tile: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `emseg predict` child process."""
    code = ("import resource, sys; from emseg.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "-q", "predict", str(model), str(stack), "-o", str(out),
                           "--tile", str(tile), "--overwrite", "--no-overlay"],
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    peak_kib = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK")))
    return peak_kib / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, nargs=2, default=[4, 32])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--encoder", default="vgg11_bn_micro")
    args = parser.parse_args()
    from emseg.model.card import ModelCard
    from emseg.model.modelfile import Model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Model.new(ModelCard(encoder=args.encoder, classes=("background", "membrane"))).save(tmp / "m.safetensors")
        rows = []
        for pages in args.pages:
            stack = tmp / f"stack{pages}.tif"
            make_stack(stack, pages, args.size)
            peak, seconds = run_predict(model, stack, tmp / "out", args.tile)
            size_mib = stack.stat().st_size / 2**20
            rows.append((pages, size_mib, peak, seconds))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    print(f"model: U-Net {args.encoder}, tile {args.tile}; pages of {args.size}x{args.size} uint16\n")
    print("| pages | input size (MiB) | peak RSS (MiB) | wall time (s) |")
    print("|---:|---:|---:|---:|")
    for pages, size_mib, peak, seconds in rows:
        print(f"| {pages} | {size_mib:.0f} | {peak:.0f} | {seconds:.1f} |")
    growth = rows[-1][2] / rows[0][2] - 1
    print(f"\npeak RSS growth from {rows[0][0]} to {rows[-1][0]} pages: {growth * 100:+.1f} %")


if __name__ == "__main__":
    main()
