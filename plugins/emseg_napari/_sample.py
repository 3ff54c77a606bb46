"""napari sample data: the synthetic serial-section TEM stack, a synthetic FIB-SEM volume, their ground truth.

Uses ``data_samples/sample_stack.tif`` and ``sample_masks.tif`` of a source checkout when they
are there, and otherwise generates the same kind of stack with :func:`emseg.synthetic.make_em_stack`
(a couple of seconds), so the sample also works from an installed wheel.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ._utils import labels_layer_kwargs, layer_kwargs

log = logging.getLogger(__name__)

SAMPLE_SHAPE = (8, 512, 512)
SAMPLE_PIXEL_NM = 6.0


def sample_files() -> tuple[Path, Path]:
    """Where a source checkout keeps the bundled sample image and masks."""
    import emseg
    folder = Path(emseg.__file__).resolve().parents[1] / "data_samples"
    return folder / "sample_stack.tif", folder / "sample_masks.tif"


def load_sample() -> tuple[np.ndarray, np.ndarray, float | None]:
    """``(image, masks, pixel_size_nm)`` of the bundled sample (generated when the files are absent)."""
    from emseg.synthetic import CLASS_NAMES  # noqa: F401 - the classes the masks use
    image_path, mask_path = sample_files()
    if image_path.is_file() and mask_path.is_file():
        from emseg.io.read import open_image
        with open_image(image_path) as src:
            image = np.stack(list(src)) if src.is_stack else src.page(0)
            pixel_size = src.pixel_size_nm
        with open_image(mask_path) as src:
            masks = np.stack(list(src)) if src.is_stack else src.page(0)
        if masks.shape == image.shape:
            return image, masks.astype(np.uint8, copy=False), pixel_size
        log.warning("%s and %s differ in shape; generating the sample instead", image_path, mask_path)
    from emseg.synthetic import make_em_stack
    image, masks = make_em_stack(*SAMPLE_SHAPE, seed=0, pixel_size_nm=SAMPLE_PIXEL_NM)
    return image, masks, SAMPLE_PIXEL_NM


def make_sample_data():
    """The sample as napari layer data: the image and its ground-truth labels."""
    from emseg.synthetic import CLASS_NAMES
    image, masks, pixel_size = load_sample()
    image_kwargs = layer_kwargs(pixel_size, image.ndim)
    labels_kwargs = labels_layer_kwargs(CLASS_NAMES, pixel_size, masks.ndim)
    labels_kwargs["opacity"] = 0.5
    labels_kwargs["visible"] = False
    return [
        (image, {"name": "emseg sample", **image_kwargs}, "image"),
        (masks, {"name": "emseg sample ground truth", **labels_kwargs}, "labels"),
    ]


VOLUME_SHAPE = (80, 192, 192)


def make_volume_sample_data():
    """A synthetic isotropic FIB-SEM volume (5 nm voxels; :func:`emseg.synthetic3d.make_em_volume`,
    a few seconds) and its ground truth, for 'Segment volume (ortho)' and 3D views."""
    from emseg.synthetic3d import CLASS_NAMES, make_em_volume
    volume = make_em_volume(VOLUME_SHAPE, seed=0)
    z, _, x = volume.voxel_size_nm
    image_kwargs = layer_kwargs(x, 3, z)
    labels_kwargs = labels_layer_kwargs(CLASS_NAMES, x, 3, z_spacing_nm=z)
    labels_kwargs.update(opacity=0.5, visible=False)
    return [
        (volume.image, {"name": "emseg FIB-SEM volume", **image_kwargs}, "image"),
        (volume.mask, {"name": "emseg FIB-SEM volume ground truth", **labels_kwargs}, "labels"),
    ]
