"""The model card: everything needed to rebuild and use a model, stored as JSON beside its weights.

A card names the architecture and encoder (and whether its decoder takes the encoder's
full-resolution features, see emseg.models.FullResolutionUnetDecoder), the class names (index 0
first), how input images are normalised, the pixel size (nm/px) the model was trained at (None when
unknown), the tile size and overlap to infer with, the sub-pixel offset of its training annotation
that inference can reproduce (``label_offset``, see emseg.alignment; followed by default only when the
model was trained to follow it, ``follow_label_offset``), the emseg version that wrote it,
and what the model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

from . import __version__

# bump on an incompatible change of the card or the weight layout; 2 added ``full_resolution_skip``
# (format-1 cards describe smp's own decoder, without it), 3 ``decoder_upsampling`` (nearest before),
# 4 ``follow_label_offset`` (older cards' offsets are followed only when a prediction asks)
FORMAT_VERSION = 4

#: how a U-Net decoder may double the size of its features (``torch.nn.functional.interpolate`` modes)
DECODER_UPSAMPLING = ("nearest", "bilinear")


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
        if self.method == "percentile" and not 0 <= self.low < self.high <= 100:
            raise ValueError(f"normalisation percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")


@dataclass(frozen=True)
class ModelCard:
    """Self-description of a model file (see the module docstring)."""

    encoder: str
    classes: tuple[str, ...]
    architecture: str = "unet"
    in_channels: int = 1
    decoder_channels: tuple[int, ...] | None = None
    full_resolution_skip: bool = True
    decoder_upsampling: str = "bilinear"
    normalization: Normalization = field(default_factory=Normalization)
    pixel_size_nm: float | None = None
    tile_size: int = 512
    overlap: int = 128
    label_offset: tuple[float, float] = (0.0, 0.0)
    follow_label_offset: bool = False
    name: str = "emseg model"
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    emseg_version: str = __version__
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self):
        if self.decoder_upsampling not in DECODER_UPSAMPLING:
            raise ValueError(f"unknown decoder_upsampling {self.decoder_upsampling!r}; "
                             f"this emseg knows {', '.join(DECODER_UPSAMPLING)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
        data["classes"] = tuple(data["classes"])
        data.setdefault("full_resolution_skip", False)  # format-1 cards: smp's own decoder
        data.setdefault("decoder_upsampling", "nearest")  # formats 1 and 2: smp's nearest-neighbour upsampling
        if data.get("decoder_channels") is not None:
            data["decoder_channels"] = tuple(data["decoder_channels"])
        if "label_offset" in data:
            data["label_offset"] = tuple(float(v) for v in data["label_offset"])
        data["normalization"] = Normalization(**data.get("normalization", {}))
        return cls(**data)

    def updated(self, **changes: Any) -> "ModelCard":
        """A copy with some fields changed (and the writing version and time refreshed)."""
        changes.setdefault("emseg_version", __version__)
        changes.setdefault("format_version", FORMAT_VERSION)  # this emseg writes its own format
        changes.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        return replace(self, **changes)
