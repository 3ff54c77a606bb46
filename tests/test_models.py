import pytest
import torch
from segmentation_models_pytorch.encoders.densenet import DenseNetEncoder
from segmentation_models_pytorch.encoders.vgg import VGGEncoder

from emseg.model.networks import DEFAULT_ENCODER, ENCODERS, build_unet, encoder_names, get_spec

REQUIRED = ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
            "densenet121", "densenet169", "densenet201", "densenet161"]


def test_registry_holds_both_families_and_compact_members():
    names = encoder_names()
    assert set(REQUIRED) <= set(names)
    compact = [n for n in names if n not in REQUIRED]
    assert {ENCODERS[n].family for n in compact} == {"vgg", "densenet"}
    assert DEFAULT_ENCODER in names


def test_unknown_encoder_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        get_spec("resnet50")
    message = str(info.value)
    assert "resnet50" in message
    for name in REQUIRED:
        assert name in message


@pytest.mark.parametrize("encoder", ["vgg11_bn_micro", "vgg11_bn_slim", "densenet_slim"])
@pytest.mark.parametrize("shape", [(64, 64), (96, 160)])
def test_compact_unets_map_grey_input_to_class_logits(encoder, shape):
    net = build_unet(encoder, 3).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 3, *shape)


def test_compact_members_are_much_smaller_than_their_family():
    def params(name):
        with torch.device("meta"):
            return sum(p.numel() for p in build_unet(name, 2).parameters())
    assert params("vgg11_bn_slim") < params("vgg11_bn") / 8
    assert params("densenet_slim") < params("densenet121") / 8


def test_full_size_encoders_build_on_meta():
    for name in REQUIRED:
        with torch.device("meta"):
            net = build_unet(name, 2)
        assert isinstance(net.encoder, (VGGEncoder, DenseNetEncoder))
        assert name.startswith("densenet") or net.decoder.center.__class__.__name__ == "UnetCenterBlock"


def test_at_least_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_unet("vgg11_bn_micro", 1)


def test_width_study_encoders_register_and_build_at_their_width():
    from emseg.model.networks import register_narrow_vgg
    name = register_narrow_vgg((12, 24, 48, 96, 96), (96, 48, 24, 12, 12))
    assert name == "vgg11_bn_w12-24-48-96-96" and name in ENCODERS
    net = build_unet(name, 2).eval()
    first_conv = next(m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.out_channels == 12
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    assert register_narrow_vgg((12, 24, 48, 96, 96), (96, 48, 24, 12, 12)) == name  # idempotent
    deeper = register_narrow_vgg((12, 24, 48, 96, 96), (96, 48, 24, 16, 16), (2, 2, 2, 2, 2))
    assert deeper == "vgg13_bn_w12-24-48-96-96_d96-48-24-16-16"
    net = build_unet(deeper, 2)
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs[:2]] == [12, 12] and len(convs) == 10  # two per block
    assert net.decoder.blocks[-1].conv2[0].out_channels == 16
    with pytest.raises(ValueError, match="5 encoder widths"):
        register_narrow_vgg((8, 16), (16, 8))


def _last_block_skip(net: torch.nn.Module, x: torch.Tensor):
    seen = {}
    hook = net.decoder.blocks[-1].register_forward_hook(
        lambda module, args, kwargs, out: seen.update(skip=kwargs.get("skip_connection")), with_kwargs=True)
    with torch.no_grad():
        out = net(x)
    hook.remove()
    return out, seen["skip"]


@pytest.mark.parametrize("encoder", ["vgg11_bn_micro", "densenet_slim"])
def test_full_resolution_skip_feeds_the_encoders_first_features_to_the_last_block(encoder):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64, 96)
    plain = build_unet(encoder, 2, full_resolution_skip=False).eval()
    _, skip = _last_block_skip(plain, x)
    assert skip is None  # smp's decoder: the last block upsamples from half resolution alone
    net = build_unet(encoder, 2).eval()  # the default
    out, skip = _last_block_skip(net, x)
    assert out.shape == (1, 2, 64, 96)
    with torch.no_grad():
        first = net.encoder(x)[0]
    assert first.shape[2:] == x.shape[2:]
    torch.testing.assert_close(skip, first)
    # the other blocks take the same skips as smp's decoder, so only the last block's input widens
    widths = [b.conv1[0].in_channels for b in net.decoder.blocks]
    assert widths[:-1] == [b.conv1[0].in_channels for b in plain.decoder.blocks][:-1]
    assert widths[-1] == plain.decoder.blocks[-1].conv1[0].in_channels + net.encoder.out_channels[0]


@pytest.mark.parametrize("skip", [True, False])
def test_bilinear_upsampling_changes_the_output_not_the_weights(skip):
    torch.manual_seed(0)
    nearest = build_unet("vgg11_bn_micro", 2, full_resolution_skip=skip).eval()  # the default (smp's)
    bilinear = build_unet("vgg11_bn_micro", 2, full_resolution_skip=skip, upsampling="bilinear").eval()
    assert [b.interpolation_mode for b in nearest.decoder.blocks] == ["nearest"] * len(nearest.decoder.blocks)
    assert [b.interpolation_mode for b in bilinear.decoder.blocks] == ["bilinear"] * len(bilinear.decoder.blocks)
    bilinear.load_state_dict(nearest.state_dict())  # the same layout: only the resampling differs
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a, b = nearest(x), bilinear(x)
    assert a.shape == b.shape == (1, 2, 64, 64)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="unknown decoder upsampling 'cubic'"):
        build_unet("vgg11_bn_micro", 2, upsampling="cubic")
