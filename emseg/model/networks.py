"""Encoder registry and U-Net construction.

Every network emseg builds is a segmentation-models-pytorch ``Unet`` with a grey (1-channel)
input, ``classes`` output logits of shape ``(N, classes, H, W)`` for an input ``(N, 1, H, W)``
whose height and width are multiples of 32, and random initial weights (``encoder_weights=None``:
there is no network access at run time).

Encoders come from two families, the VGG family of Simonyan & Zisserman (11/13/16/19 layers,
with or without batch norm) and the DenseNet family of Huang et al. (121/169/201/161), plus
compact members built the way each paper builds its own small variants: VGG with fewer channels
per block, DenseNet with a small growth rate and short blocks. All are registered into smp's
encoder table (as ``NAME_emseg``) so they go through exactly the same U-Net code path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base.initialization import initialize_decoder
from segmentation_models_pytorch.decoders.unet.decoder import UnetCenterBlock, UnetDecoder
from segmentation_models_pytorch.encoders import encoders as _smp_encoders
from segmentation_models_pytorch.encoders.densenet import DenseNetEncoder
from segmentation_models_pytorch.encoders.vgg import VGGEncoder
from torch import nn
from torchvision.models.vgg import make_layers

from emseg.model.card import DECODER_UPSAMPLING

log = logging.getLogger(__name__)

STANDARD_DECODER = (256, 128, 64, 32, 16)
COMPACT_DECODER = (128, 64, 32, 16, 16)
MICRO_DECODER = (64, 32, 16, 8, 8)


@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder: its family, a one-line description and the decoder it pairs with."""

    name: str
    family: str
    description: str
    decoder_channels: tuple[int, ...] = STANDARD_DECODER

    @property
    def smp_name(self) -> str:
        """The key of this encoder in smp's encoder table."""
        return f"{self.name}_emseg"  # smp adds its VGG centre block to names starting with "vgg"


class LeanVGGEncoder(VGGEncoder):
    """smp's VGG encoder without ever allocating torchvision's ImageNet classifier.

    smp builds the full torchvision VGG and then deletes its classifier: 120 M parameters that cost
    about 2 s and 500 MB on every build. Here the parent is built on the meta device and only the
    convolutional features are real, initialised as torchvision initialises them.
    """

    def __init__(self, out_channels, config, batch_norm=False, depth=5, output_stride=32, **kwargs):
        features = make_layers(config, batch_norm=batch_norm)
        with torch.device("meta"):
            super().__init__(out_channels, config, batch_norm, depth, output_stride, **kwargs)
        self.features = features
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _vgg_config(widths: tuple[int, ...], convs: tuple[int, ...]) -> list[int | str]:
    """A VGG layer list: ``convs[i]`` 3x3 convolutions of ``widths[i]`` channels, then a max-pool."""
    config: list[int | str] = []
    for width, n in zip(widths, convs):
        config += [width] * n + ["M"]
    return config


def _densenet_out_channels(init: int, growth: int, blocks: tuple[int, ...]) -> list[int]:
    """Channels of the six feature maps smp's DenseNetEncoder returns (input first)."""
    channels, out = init, [3, init]
    for i, layers in enumerate(blocks):
        channels += layers * growth
        out.append(channels)
        if i < len(blocks) - 1:
            channels //= 2  # transition layers halve the channels (compression 0.5)
    return out


def _register_narrow_vgg(name: str, widths: tuple[int, ...], convs: tuple[int, ...] = (1, 1, 2, 2, 2)) -> None:
    """Put a narrow VGG-BN (``convs`` 3x3 convolutions of ``widths`` channels per block; VGG-11's
    1-1-2-2-2 by default) into smp's table as ``NAME_emseg``."""
    _smp_encoders.setdefault(f"{name}_emseg", {
        "encoder": LeanVGGEncoder,
        "pretrained_settings": {},
        "params": {
            "out_channels": [*widths, widths[-1]],
            "config": _vgg_config(widths, convs),
            "batch_norm": True,
        },
    })


def register_narrow_vgg(widths: tuple[int, ...], decoder_channels: tuple[int, ...] | None = None,
                        convs: tuple[int, ...] = (1, 1, 2, 2, 2)) -> str:
    """Register a narrow VGG-BN of other widths (and convolutions per block: VGG-11's 1-1-2-2-2 by
    default, VGG-13's 2-2-2-2-2) for this process (width studies); returns its name. The decoder's
    widths default to 8, 4, 2, 1 and 1 times the first encoder width, as vgg11_bn_slim's.

    The name, ``vgg<layers>_bn_w<widths>``, is known only to the process that registered it, so a
    model file made with it loads only after the same call.
    """
    default_decoder = (8 * widths[0], 4 * widths[0], 2 * widths[0], widths[0], widths[0]) if widths else ()
    decoder_channels = tuple(decoder_channels or default_decoder)
    if len(widths) != 5 or len(decoder_channels) != 5 or len(convs) != 5:
        raise ValueError("a VGG U-Net needs 5 encoder widths, 5 decoder widths and 5 convolution counts")
    layers = sum(convs) + 3  # VGG counts its three classifier layers
    name = f"vgg{layers}_bn_w" + "-".join(map(str, widths))
    if tuple(convs) != _VGG_CONVS.get(layers):
        name += "_c" + "-".join(map(str, convs))
    if decoder_channels != default_decoder:
        name += "_d" + "-".join(map(str, decoder_channels))
    _register_narrow_vgg(name, tuple(widths), tuple(convs))
    ENCODERS.setdefault(name, EncoderSpec(name, "vgg", f"VGG-{layers}-BN, {'-'.join(map(str, widths))} channels",
                                          tuple(decoder_channels)))
    return name


def _register_encoders() -> None:
    """Add emseg's encoders to smp's table under ``NAME_emseg`` keys (idempotent).

    Standard VGGs get the lean class; the compact members are new entries of both families.
    """
    for name in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
        _smp_encoders.setdefault(f"{name}_emseg", {"encoder": LeanVGGEncoder, "pretrained_settings": {},
                                                   "params": dict(_smp_encoders[name]["params"])})
    for name in ("densenet121", "densenet169", "densenet201", "densenet161"):
        _smp_encoders.setdefault(f"{name}_emseg", {**_smp_encoders[name], "pretrained_settings": {}})
    for name, widths in (("vgg11_bn_slim", (16, 32, 64, 128, 128)), ("vgg11_bn_micro", (8, 16, 32, 64, 64))):
        _register_narrow_vgg(name, widths)
    init, growth, blocks = 24, 12, (2, 4, 8, 6)
    _smp_encoders.setdefault("densenet_slim_emseg", {
        "encoder": DenseNetEncoder,
        "pretrained_settings": {},
        "params": {
            "out_channels": _densenet_out_channels(init, growth, blocks),
            "num_init_features": init,
            "growth_rate": growth,
            "block_config": blocks,
        },
    })


_register_encoders()

_VGG_DEPTHS = {"vgg11": 11, "vgg13": 13, "vgg16": 16, "vgg19": 19}
_VGG_CONVS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_DENSENET_DEPTHS = ("densenet121", "densenet169", "densenet201", "densenet161")

ENCODERS: dict[str, EncoderSpec] = {}
for _name, _layers in _VGG_DEPTHS.items():
    ENCODERS[_name] = EncoderSpec(_name, "vgg", f"VGG-{_layers} (64-512 channels)")
    ENCODERS[f"{_name}_bn"] = EncoderSpec(f"{_name}_bn", "vgg", f"VGG-{_layers} with batch norm")
for _name in _DENSENET_DEPTHS:
    ENCODERS[_name] = EncoderSpec(_name, "densenet", f"DenseNet-{_name[8:]} (growth rate "
                                  f"{_smp_encoders[_name]['params']['growth_rate']})")
ENCODERS["vgg11_bn_slim"] = EncoderSpec(
    "vgg11_bn_slim", "vgg", "narrow VGG-11-BN, 16-32-64-128-128 channels", COMPACT_DECODER)
ENCODERS["vgg11_bn_micro"] = EncoderSpec(
    "vgg11_bn_micro", "vgg", "very narrow VGG-11-BN, 8-16-32-64-64 channels (tests, quick CPU runs)",
    MICRO_DECODER)
ENCODERS["densenet_slim"] = EncoderSpec(
    "densenet_slim", "densenet", "small DenseNet-BC, growth rate 12, blocks 2-4-8-6", COMPACT_DECODER)

DEFAULT_ENCODER = "vgg11_bn_slim"


def encoder_names() -> list[str]:
    """All registered encoder names, in registry order."""
    return list(ENCODERS)


def get_spec(encoder: str) -> EncoderSpec:
    """Look an encoder up by name; an unknown name gets an error listing the valid ones."""
    try:
        return ENCODERS[encoder]
    except KeyError:
        raise ValueError(
            f"unknown encoder {encoder!r}; choose one of: {', '.join(ENCODERS)} "
            "(`emseg models` lists them with their size and cost)"
        ) from None


class FullResolutionUnetDecoder(UnetDecoder):
    """smp's U-Net decoder whose last block also takes the encoder's full-resolution features.

    smp's decoder drops the encoder's first feature map (it assumes that map is the input image) and
    upsamples its last block from half resolution without a skip. For the VGG encoders that map is the
    first convolution block, at full resolution, which the U-Net paper concatenates into its last
    up-block: without it the network places every edge from half-resolution features. With it, the
    last block sees ``encoder_channels[0]`` more channels (for DenseNet encoders, the input itself).
    """

    def __init__(self, encoder_channels, decoder_channels, *, add_center_block: bool,
                 interpolation_mode: str = "nearest"):
        super().__init__(encoder_channels, decoder_channels, n_blocks=len(decoder_channels),
                         add_center_block=add_center_block, interpolation_mode=interpolation_mode)
        last = self.blocks[-1]
        self.blocks[-1] = type(last)(decoder_channels[-2], encoder_channels[0], decoder_channels[-1],
                                     interpolation_mode=interpolation_mode)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        shapes = [f.shape[2:] for f in features][::-1]
        skips = features[:-1][::-1]  # half the resolution of the head's, down to full resolution
        x = self.center(features[-1])
        for block, shape, skip in zip(self.blocks, shapes[1:], skips):
            x = block(x, *shape, skip_connection=skip)
        return x


def build_unet(encoder: str, classes: int, *, in_channels: int = 1,
               decoder_channels: tuple[int, ...] | None = None,
               full_resolution_skip: bool = True, upsampling: str = "nearest", regression: bool = False) -> nn.Module:
    """Build a randomly initialised U-Net with the named encoder.

    Args:
        encoder: a name from :data:`ENCODERS`.
        classes: number of output classes (logits), at least 2; with ``regression`` the number of output
            channels (1: the restored image of ``emseg pretrain``).
        in_channels: input channels (1 for grey EM).
        decoder_channels: override the decoder widths paired with the encoder.
        full_resolution_skip: feed the encoder's full-resolution features to the decoder's last block,
            as the U-Net paper does (:class:`FullResolutionUnetDecoder`); False builds smp's own decoder,
            which leaves them out (the layout of model files of card format 1).
        upsampling: how each decoder block doubles its input's size, ``"bilinear"`` or ``"nearest"``
            (smp's default; model files of card formats 1 and 2). The weights are the same either way.
    """
    spec = get_spec(encoder)
    if classes < (1 if regression else 2):
        raise ValueError(f"a model needs at least 2 classes (background and one more), got {classes}")
    if upsampling not in DECODER_UPSAMPLING:
        raise ValueError(f"unknown decoder upsampling {upsampling!r}; choose one of: {', '.join(DECODER_UPSAMPLING)}")
    channels = tuple(decoder_channels or spec.decoder_channels)
    net = smp.Unet(
        encoder_name=spec.smp_name,
        encoder_weights=None,
        in_channels=in_channels,
        classes=classes,
        decoder_channels=channels,
        decoder_interpolation=upsampling,
    )
    if full_resolution_skip:
        net.decoder = FullResolutionUnetDecoder(net.encoder.out_channels, channels,
                                                add_center_block=isinstance(net.decoder.center, UnetCenterBlock),
                                                interpolation_mode=upsampling)
        initialize_decoder(net.decoder)
    return net
