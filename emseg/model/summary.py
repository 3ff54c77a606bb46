"""Model size and cost: parameter counts, FLOPs per megapixel (measured), and layer summaries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from emseg.model.networks import ENCODERS, build_unet, get_spec

_FLOP_SIDE = 256  # a fully convolutional net's cost is linear in pixels; one 256x256 tile measures it


@dataclass(frozen=True)
class EncoderCost:
    """Size and cost of a U-Net with one encoder (2 classes, 1 input channel)."""

    name: str
    family: str
    parameters: int
    gflops_per_mp: float
    description: str


def measure_cost(encoder: str, classes: int = 2) -> EncoderCost:
    """Count parameters and forward FLOPs per megapixel with torch's FLOP counter (on the meta device)."""
    spec = get_spec(encoder)
    with torch.device("meta"):
        net = build_unet(encoder, classes)
        x = torch.zeros(1, 1, _FLOP_SIDE, _FLOP_SIDE)
    with FlopCounterMode(display=False) as counter:
        net(x)
    megapixels = _FLOP_SIDE * _FLOP_SIDE / 1e6
    return EncoderCost(encoder, spec.family, sum(p.numel() for p in net.parameters()),
                       counter.get_total_flops() / 1e9 / megapixels, spec.description)


def cost_table() -> list[EncoderCost]:
    """:func:`measure_cost` for every registered encoder."""
    return [measure_cost(name) for name in ENCODERS]


def layer_summary(encoder: str, size: int = 512, classes: int = 2, depth: int = 3) -> str:
    """A torchinfo table of each block's output shape and parameters for a ``size`` x ``size`` input."""
    from torchinfo import summary
    net = build_unet(encoder, classes)
    stats = summary(net, input_size=(1, 1, size, size), depth=depth, device="cpu", verbose=0,
                    col_names=("output_size", "num_params"), row_settings=("var_names",))
    return str(stats)
