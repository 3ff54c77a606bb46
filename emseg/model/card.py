"""The model card: everything needed to rebuild and use a model, stored as JSON beside its weights.

A card names the architecture and encoder (and whether its decoder takes the encoder's
full-resolution features, see emseg.model.networks.FullResolutionUnetDecoder), the class names (index 0
first), how input images are normalised, the pixel size (nm/px) the model was trained at (None when
unknown), the tile size and overlap to infer with, the sub-pixel offset of its training annotation
that inference can reproduce (``label_offset``, see emseg.infer.alignment; followed by default only when the
model was trained to follow it, ``follow_label_offset``), the emseg version that wrote it,
and what the model was trained on.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

from emseg import __version__
from emseg.io.tiff import MAX_PIXEL_SIZE_NM, MIN_PIXEL_SIZE_NM

# bump on an incompatible change of the card or the weight layout; 2 added ``full_resolution_skip``
# (format-1 cards describe smp's own decoder, without it), 3 ``decoder_upsampling`` (nearest before),
# 4 ``follow_label_offset`` (older cards' offsets are followed only when a prediction asks), 5 ``pretrained``
# (a self-supervised model with no classes and one output channel)
FORMAT_VERSION = 5

#: how a U-Net decoder may double the size of its features (``torch.nn.functional.interpolate`` modes)
DECODER_UPSAMPLING = ("nearest", "bilinear")
#: tiles are square, a multiple of the network's total downsampling, and at most this many pixels a side
TILE_MULTIPLE, MAX_TILE = 32, 16384
#: the largest annotation offset a card may hold (pixels; emseg measures -2.5 to +2.5)
MAX_LABEL_OFFSET = 8.0
#: label images are uint8 up to 256 classes, uint16 beyond
MAX_CLASSES = 65536


def _real(value: Any) -> bool:
    """A finite real number (not a bool, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_classes(classes: Any, what: str = "classes") -> tuple[str, ...]:
    """``classes`` as a tuple of at least two distinct, non-empty names; ValueError naming ``what`` else."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)):
        raise ValueError(f"{what} must be a list of names (background first), got {classes!r}")
    if not all(isinstance(c, str) and c.strip() for c in classes):
        raise ValueError(f"{what} must be non-empty names, got {list(classes)!r}")
    if not 2 <= len(classes) <= MAX_CLASSES:
        raise ValueError(f"{what} must name 2 to {MAX_CLASSES} classes (background first), got {len(classes)}")
    twice = sorted({c for c in classes if list(classes).count(c) > 1})
    if twice:
        raise ValueError(f"{what} names {', '.join(twice)} more than once; give each class once")
    return tuple(classes)


@dataclass(frozen=True)
class Normalization:
    """How a raw page becomes network input.

    ``percentile``: map the ``low``/``high`` percentiles of each page to 0 and 1 and clip to [0, 1]
    (robust to 8/16-bit data, drifting brightness and hot pixels); then ``(x - mean) / std``.
    ``none``: only ``(x - mean) / std`` on the raw values.
    """

    method: str = "percentile"
    low: float = 1.0
    high: float = 99.0
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self):
        if self.method not in ("percentile", "none"):
            raise ValueError(f"unknown normalisation method {self.method!r}; use 'percentile' or 'none'")
        for key in ("low", "high", "mean", "std"):
            if not _real(getattr(self, key)):
                raise ValueError(f"normalisation {key} must be a finite number, got {getattr(self, key)!r}")
        if self.method == "percentile" and not 0 <= self.low < self.high <= 100:
            raise ValueError(f"normalisation percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")
        if not self.std > 0:
            raise ValueError(f"normalisation std must be above 0 (it divides), got {self.std}")


@dataclass(frozen=True)
class ModelCard:
    """Self-description of a model file (see the module docstring)."""

    encoder: str
    classes: tuple[str, ...]
    architecture: str = "unet"
    in_channels: int = 1
    decoder_channels: tuple[int, ...] | None = None
    full_resolution_skip: bool = True
    decoder_upsampling: str = "nearest"
    normalization: Normalization = field(default_factory=Normalization)
    pixel_size_nm: float | None = None
    tile_size: int = 512
    overlap: int = 128
    label_offset: tuple[float, float] = (0.0, 0.0)
    follow_label_offset: bool = False
    name: str = "emseg model"
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    pretrained: dict[str, Any] = field(default_factory=dict)
    emseg_version: str = __version__
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self):
        """Check every field's type and range (ValueError naming the field): a card edited by hand or
        written by another program must not give wrong results silently."""
        if self.decoder_upsampling not in DECODER_UPSAMPLING:
            raise ValueError(f"unknown decoder_upsampling {self.decoder_upsampling!r}; "
                             f"this emseg knows {', '.join(DECODER_UPSAMPLING)}")
        if not isinstance(self.pretrained, dict):
            raise ValueError(f"pretrained must be a mapping, got {type(self.pretrained).__name__} "
                             f"{self.pretrained!r:.60}")
        if self.pretrained:  # a pretrained model has no classes yet: fine-tuning gives it its own
            if tuple(self.classes):
                raise ValueError(f"a pretrained model has no classes, got {list(self.classes)!r}")
            object.__setattr__(self, "classes", ())
        else:
            object.__setattr__(self, "classes", check_classes(self.classes))
        for key in ("encoder", "architecture", "name", "description", "emseg_version", "created"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be text, got {getattr(self, key)!r}")
        for key in ("full_resolution_skip",):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not (_integer(self.in_channels) and self.in_channels >= 1):
            raise ValueError(f"in_channels must be a positive integer, got {self.in_channels!r}")
        if self.decoder_channels is not None:
            if not (isinstance(self.decoder_channels, (list, tuple))
                    and all(_integer(c) and c >= 1 for c in self.decoder_channels)):
                raise ValueError(f"decoder_channels must be positive integers, got {self.decoder_channels!r}")
            object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        if not isinstance(self.normalization, Normalization):
            raise ValueError(f"normalization must be a Normalization, got {self.normalization!r}")
        if self.pixel_size_nm is not None and not (
                _real(self.pixel_size_nm) and MIN_PIXEL_SIZE_NM <= self.pixel_size_nm <= MAX_PIXEL_SIZE_NM):
            raise ValueError(f"pixel_size_nm must be null or a number of nm per pixel from {MIN_PIXEL_SIZE_NM:g} to "
                             f"{MAX_PIXEL_SIZE_NM:g}, got {self.pixel_size_nm!r}")
        if not (_integer(self.tile_size) and TILE_MULTIPLE <= self.tile_size <= MAX_TILE
                and self.tile_size % TILE_MULTIPLE == 0):
            raise ValueError(f"tile_size must be a multiple of {TILE_MULTIPLE} from {TILE_MULTIPLE} to {MAX_TILE}, "
                             f"got {self.tile_size!r}")
        if not (_integer(self.overlap) and 0 <= self.overlap < self.tile_size):
            raise ValueError(f"overlap must be an integer from 0 to tile_size - 1 ({self.tile_size - 1}), "
                             f"got {self.overlap!r}")
        offset = self.label_offset
        if not (isinstance(offset, (list, tuple)) and len(offset) == 2
                and all(_real(v) and abs(v) <= MAX_LABEL_OFFSET for v in offset)):
            raise ValueError(f"label_offset must be two numbers of pixels from -{MAX_LABEL_OFFSET:g} to "
                             f"{MAX_LABEL_OFFSET:g}, got {offset!r}")
        object.__setattr__(self, "label_offset", (float(offset[0]), float(offset[1])))
        if not isinstance(self.training, dict):
            raise ValueError(f"training must be a mapping, got {type(self.training).__name__} {self.training!r:.60}")
        if not _integer(self.format_version):
            raise ValueError(f"format_version must be an integer, got {self.format_version!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_pretrained(self) -> bool:
        """A self-supervised model (``emseg pretrain``): no classes; a starting point for training."""
        return bool(self.pretrained)

    @property
    def out_channels(self) -> int:
        """The network's output channels: one per class, or the one restored image of a pretrained model."""
        return self.num_classes or 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        """Build a card from parsed JSON; raises ValueError/KeyError/TypeError on a malformed one."""
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown card fields {unknown}")
        data.setdefault("full_resolution_skip", False)  # format-1 cards: smp's own decoder
        data.setdefault("decoder_upsampling", "nearest")  # formats 1 and 2: smp's nearest-neighbour upsampling
        norm = data.get("normalization", {})
        if not isinstance(norm, dict):
            raise ValueError(f"normalization must be a mapping, got {norm!r}")
        data["normalization"] = Normalization(**norm)
        return cls(**data)

    def updated(self, **changes: Any) -> "ModelCard":
        """A copy with some fields changed (and the writing version and time refreshed)."""
        changes.setdefault("emseg_version", __version__)
        changes.setdefault("format_version", FORMAT_VERSION)  # this emseg writes its own format
        changes.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return replace(self, **changes)
