"""Training-time augmentation for EM images and label masks (albumentations 2).

Contract
--------
* Images are ``float32`` scaled to ``[0, 1]``, shape ``(H, W)`` or ``(H, W, 1)``; masks are
  integer label images (``uint8``) of the same ``H, W``. Work in float32: some transforms
  reject ``uint16``.
* :func:`build_transform` returns an ``albumentations.Compose``; call it as
  ``t(image=img, mask=mask)``. Geometric transforms (D4 flips/rotations, affine, elastic)
  move image and mask together; masks use nearest-neighbour interpolation, and borders are
  reflected (``cv2.BORDER_REFLECT_101``) for both, so no fill value is invented and the
  mask keeps only labels it already had. Intensity transforms (brightness, contrast,
  gamma, blur, noise) touch the image only. The output image is ``float32`` clipped to
  ``[0, 1]``, with the input's shape (D4's 90-degree rotations swap height and width of
  non-square inputs: train on square patches).
* :class:`AugmentConfig` holds one switch and five strength multipliers (0 switches a
  transform off, 1 is the default strength, 2 twice as strong); :data:`PRESETS` names
  ready-made configs ("em", "light", "none").
* :func:`augment_preview` writes a PNG grid of augmented crops with their masks overlaid,
  so a user can see what the model will be trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import albumentations as A
import cv2
import numpy as np
import yaml
from albumentations.augmentations.geometric import functional as fgeometric

logger = logging.getLogger(__name__)

BORDER = cv2.BORDER_REFLECT_101

# Transform magnitudes at strength 1.
ELASTIC_ALPHA = 1000.0  # with ELASTIC_SIGMA = 20 px: displacements of about 2.3 px (std)
ELASTIC_SIGMA = 20.0
AFFINE_SCALE = 0.10  # +-10 %
AFFINE_ROTATE_DEG = 15.0
BRIGHTNESS = 0.15  # fraction of the [0, 1] range
CONTRAST = 0.15
GAMMA_PERCENT = 25.0  # gamma in [0.75, 1.25]
NOISE_STD = (0.01, 0.04)  # fraction of the [0, 1] range
BLUR_SIGMA_PX = (0.3, 1.2)


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply, and how strongly.

    Attributes:
        flips: horizontal/vertical flips and 90-degree rotations (the D4 group).
        elastic: elastic deformation strength multiplier; 0 switches it off.
        affine: strength of the small scale (+-10 %) / rotation (+-15 deg) affine; 0 off.
        intensity: brightness/contrast/gamma strength; 0 off.
        noise: Gaussian noise strength; 0 off.
        blur: Gaussian blur strength; 0 off.
    """

    flips: bool = True
    elastic: float = 1.0
    affine: float = 1.0
    intensity: float = 1.0
    noise: float = 1.0
    blur: float = 1.0

    def __post_init__(self) -> None:
        """Check types and ranges so a bad config fails where it is made."""
        if not isinstance(self.flips, (bool, np.bool_)):
            raise ValueError(f"augment option 'flips' must be true or false, got {self.flips!r}")
        for name in _STRENGTHS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"augment option {name!r} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"augment option {name!r} must be finite and >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "flips", bool(self.flips))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentConfig:
        """Build a config from a mapping; missing keys keep their defaults.

        Raises:
            ValueError: for keys that are not options (the message lists the valid ones)
                or values of the wrong type.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"augment config must be a mapping of options, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in valid)
        if unknown:
            raise ValueError(f"unknown augment option(s) {', '.join(unknown)}; "
                             f"valid options are: {', '.join(valid)}")
        return cls(**dict(d))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> AugmentConfig:
        """Read a config from a YAML file holding a mapping of options (empty file: defaults)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from error
        try:
            return cls.from_dict({} if data is None else data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (YAML/JSON friendly); ``from_dict`` inverts it."""
        return dataclasses.asdict(self)


_STRENGTHS = ("elastic", "affine", "intensity", "noise", "blur")

PRESETS: Mapping[str, AugmentConfig] = MappingProxyType({
    "em": AugmentConfig(),
    "light": AugmentConfig(elastic=0.5, affine=0.5, intensity=0.5, noise=0.5, blur=0.5),
    "none": AugmentConfig(flips=False, elastic=0.0, affine=0.0, intensity=0.0, noise=0.0,
                          blur=0.0),
})


class ClipUnit(A.ImageOnlyTransform):
    """Clip the image to [0, 1] and make it float32 (the last step of every pipeline)."""

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        """Clip one image."""
        return np.clip(img, 0.0, 1.0).astype(np.float32, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """No arguments to serialise."""
        return ()


class EdgeSafeElastic(A.ElasticTransform):
    """``ElasticTransform`` whose displacement field is as smooth at the edges as inside.

    albumentations 2.0 blurs the random field with replicated borders, which makes
    displacements several times larger within ``sigma`` of the image edges (visible as
    streaks). Here the field is made on a canvas padded by 3 sigma and cropped back.
    """

    def get_params_dependent_on_data(self, params: dict[str, Any],
                                     data: dict[str, Any]) -> dict[str, Any]:
        """Coordinate maps (map_x, map_y) of the deformation for this image's shape."""
        height, width = params["shape"][:2]
        pad = int(3 * self.sigma) + 1
        dx, dy = fgeometric.generate_displacement_fields(
            (height + 2 * pad, width + 2 * pad), self.alpha, self.sigma,
            same_dxdy=self.same_dxdy, kernel_size=(17, 17) if self.approximate else (0, 0),
            random_generator=self.random_generator, noise_distribution=self.noise_distribution)
        inner = (slice(pad, pad + height), slice(pad, pad + width))
        yy, xx = np.mgrid[:height, :width].astype(np.float32)
        return {"map_x": xx + dx[inner], "map_y": yy + dy[inner]}


def build_transform(config: AugmentConfig, *, seed: int | None = None) -> A.Compose:
    """Build the augmentation pipeline for a config.

    Args:
        config: which transforms, how strong.
        seed: seed of the pipeline's random generator (``None``: not reproducible).

    Returns:
        ``albumentations.Compose`` taking ``image`` (float32 in [0, 1], (H, W) or (H, W, 1))
        and ``mask`` (integer labels, (H, W)).
    """
    steps = _geometric_steps(config) + _intensity_steps(config) + [ClipUnit()]
    logger.debug("augmentation %s: %s", config, [type(s).__name__ for s in steps])
    return A.Compose(steps, seed=seed)


def _geometric_steps(config: AugmentConfig) -> list[A.BasicTransform]:
    """D4, affine and elastic transforms (image and mask move together)."""
    steps: list[A.BasicTransform] = []
    if config.flips:
        steps.append(A.D4(p=1.0))
    if config.affine > 0:
        s = config.affine
        steps.append(A.Affine(scale=(max(1 - AFFINE_SCALE * s, 0.1), 1 + AFFINE_SCALE * s),
                              rotate=(-AFFINE_ROTATE_DEG * s, AFFINE_ROTATE_DEG * s),
                              keep_ratio=True, interpolation=cv2.INTER_LINEAR,
                              mask_interpolation=cv2.INTER_NEAREST, border_mode=BORDER, p=0.5))
    if config.elastic > 0:
        steps.append(EdgeSafeElastic(alpha=ELASTIC_ALPHA * config.elastic, sigma=ELASTIC_SIGMA,
                                     interpolation=cv2.INTER_LINEAR,
                                     mask_interpolation=cv2.INTER_NEAREST,
                                     border_mode=BORDER, p=0.5))
    return steps


def _intensity_steps(config: AugmentConfig) -> list[A.BasicTransform]:
    """Brightness/contrast, gamma, blur and noise (image only)."""
    steps: list[A.BasicTransform] = []
    if config.intensity > 0:
        s = config.intensity
        steps.append(A.RandomBrightnessContrast(brightness_limit=BRIGHTNESS * s,
                                                contrast_limit=CONTRAST * s, p=0.5))
        steps.append(A.RandomGamma(gamma_limit=(max(100 - GAMMA_PERCENT * s, 10.0),
                                                100 + GAMMA_PERCENT * s), p=0.5))
    if config.blur > 0:
        lo, hi = (v * config.blur for v in BLUR_SIGMA_PX)
        steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=(lo, hi), p=0.3))
    if config.noise > 0:
        lo, hi = (v * config.noise for v in NOISE_STD)
        steps.append(A.GaussNoise(std_range=(min(lo, 1.0), min(hi, 1.0)), p=0.5))
    return steps


def augment_preview(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    path: str | os.PathLike,
    *,
    config: AugmentConfig,
    n: int = 8,
    crop: int = 256,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid of n augmented random crops with their masks overlaid.

    Args:
        images: 2D float32 images in [0, 1].
        masks: integer label masks, one per image, same shapes.
        path: PNG file to write (atomically: temporary file in the same folder, then rename).
        config: augmentation to show.
        n: number of samples.
        crop: crop side in pixels (smaller images are used whole).
        seed: makes the choice of crops and the augmentations reproducible.
        class_names: names of labels 0, 1, ... for the legend (label 0 is not drawn).

    Returns:
        The path written.
    """
    images, masks = _check_pairs(images, masks)
    if n < 1 or crop < 8:
        raise ValueError(f"need n >= 1 and crop >= 8, got n={n}, crop={crop}")
    rng = np.random.default_rng(seed)
    transform = build_transform(config, seed=seed)
    samples = []
    for _ in range(n):
        image, mask, where = _random_crop(images, masks, crop, rng)
        out = transform(image=image, mask=mask)
        samples.append((out["image"], out["mask"], where))
    labels = sorted({int(v) for _, m, _ in samples for v in np.unique(m)} - {0})
    return _save_grid(samples, labels, class_names, Path(path))


def _check_pairs(images: Sequence[np.ndarray],
                 masks: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate images/masks for the preview; return float32 images and uint8 masks."""
    if len(images) == 0 or len(images) != len(masks):
        raise ValueError(f"need as many masks as images (at least one); got {len(images)} "
                         f"images and {len(masks)} masks")
    out_images, out_masks = [], []
    for i, (image, mask) in enumerate(zip(images, masks)):
        image = np.asarray(image, dtype=np.float32)
        image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        mask = np.asarray(mask)
        if image.ndim != 2 or mask.shape != image.shape:
            raise ValueError(f"image {i}: need a 2D image and a mask of the same shape, got "
                             f"{image.shape} and {mask.shape}")
        if image.size and (image.min() < -1e-3 or image.max() > 1 + 1e-3):
            raise ValueError(f"image {i}: values must be scaled to [0, 1], got "
                             f"[{image.min():g}, {image.max():g}]")
        if not np.issubdtype(mask.dtype, np.integer) or mask.min() < 0 or mask.max() > 255:
            raise ValueError(f"mask {i}: need integer labels 0-255, got {mask.dtype}")
        out_images.append(np.clip(image, 0.0, 1.0))
        out_masks.append(mask.astype(np.uint8))
    return out_images, out_masks


def _random_crop(images: list[np.ndarray], masks: list[np.ndarray], crop: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """A random crop of a random image/mask pair, and a short description of where."""
    i = int(rng.integers(len(images)))
    h, w = images[i].shape
    ch, cw = min(crop, h), min(crop, w)
    y = int(rng.integers(h - ch + 1))
    x = int(rng.integers(w - cw + 1))
    region = (slice(y, y + ch), slice(x, x + cw))
    return (np.ascontiguousarray(images[i][region]), np.ascontiguousarray(masks[i][region]),
            f"image {i}, y={y}, x={x}")


def _label_colours(labels: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """One distinct colour per label (matplotlib's tab10 cycle)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: tuple(cmap((label - 1) % 10)[:3]) for label in labels}


def _overlay(mask: np.ndarray, colours: Mapping[int, tuple[float, float, float]],
             alpha: float = 0.45) -> np.ndarray:
    """RGBA overlay of a label mask: label 0 (and unknown labels) transparent."""
    rgba = np.zeros(mask.shape + (4,), np.float32)
    for label, colour in colours.items():
        rgba[mask == label] = (*colour, alpha)
    return rgba


PANEL_IN, GAP_IN, TITLE_IN, LEGEND_IN = 3.0, 0.1, 0.3, 0.5  # preview layout, inches


def _save_grid(samples: list[tuple[np.ndarray, np.ndarray, str]], labels: list[int],
               class_names: Sequence[str] | None, path: Path) -> Path:
    """Draw the samples in a grid with a class legend and write the PNG atomically."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colours = _label_colours(labels)
    cols = min(4, len(samples))
    rows = -(-len(samples) // cols)
    width = cols * PANEL_IN + (cols + 1) * GAP_IN
    height = rows * (PANEL_IN + TITLE_IN) + LEGEND_IN
    fig = Figure(figsize=(width, height), dpi=100)
    for k, (image, mask, where) in enumerate(samples):
        row, col = divmod(k, cols)
        left = GAP_IN + col * (PANEL_IN + GAP_IN)
        bottom = LEGEND_IN + (rows - 1 - row) * (PANEL_IN + TITLE_IN)
        ax = fig.add_axes((left / width, bottom / height, PANEL_IN / width, PANEL_IN / height))
        ax.imshow(np.squeeze(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(_overlay(mask, colours), interpolation="nearest")
        ax.set_title(where, fontsize=8)
        ax.set_axis_off()
    handles = [Patch(facecolor=colours[label], label=_class_name(label, class_names))
               for label in labels]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    return _atomic_savefig(fig, path)


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    """The legend name of a label."""
    if class_names is not None and label < len(class_names):
        return str(class_names[label])
    return f"class {label}"


def _atomic_savefig(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG via a temporary file in the same folder + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a preview is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote augmentation preview %s", path)
    return path
