"""Regenerate the synthetic sample stack: ``python data_samples/make_sample.py``.

Writes, next to this script:

* ``sample_stack.tif``: the image, 8 x 512 x 512 uint8 (pages, y, x), zlib-compressed;
* ``sample_masks.tif``: the labels, same shape and dtype (0 background, 1 membrane,
  2 mitochondrion).

Both come from :func:`emseg.synthetic.make_em_stack` with seed 0 and carry the pixel size
(6 nm) as TIFF resolution in centimetre units, so readers that honour the resolution tags
recover 6 nm/px.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from emseg.synthetic import make_em_stack  # noqa: E402

SEED = 0
PAGES, HEIGHT, WIDTH = 8, 512, 512
PIXEL_SIZE_NM = 6.0
IMAGE_NAME, MASK_NAME = "sample_stack.tif", "sample_masks.tif"


def make_sample() -> tuple[np.ndarray, np.ndarray]:
    """The sample (image, mask) exactly as written to the TIFF files."""
    return make_em_stack(PAGES, HEIGHT, WIDTH, seed=SEED, pixel_size_nm=PIXEL_SIZE_NM)


def write_tiff(path: Path, array: np.ndarray) -> None:
    """Write a (pages, y, x) uint8 stack, zlib-compressed, with the pixel size in cm units."""
    per_cm = 1e7 / PIXEL_SIZE_NM  # pixels per centimetre
    tifffile.imwrite(path, array, compression="zlib", photometric="minisblack",
                     resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                     metadata={"axes": "ZYX"})


def main(argv: list[str] | None = None) -> int:
    """Write the sample image and mask stacks into a folder (default: this one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    image, mask = make_sample()
    write_tiff(out / IMAGE_NAME, image)
    write_tiff(out / MASK_NAME, mask)
    for name in (IMAGE_NAME, MASK_NAME):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
