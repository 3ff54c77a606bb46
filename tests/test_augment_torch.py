"""Training's GPU path, tested on the CPU: batches augmented on the device (emseg.train.augment_device) against
the albumentations reference, the fused moving average of the weights against torch's AveragedModel,
and a run whose batches are made on the training device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from emseg.analysis.metrics import IGNORE
from emseg.train.augment import ELASTIC_ALPHA, ELASTIC_SIGMA, AugmentConfig, EdgeSafeElastic, build_transform
from emseg.train.augment_device import DeviceCropSampler
from emseg.train.data import Annotated

GEOMETRY_ONLY = AugmentConfig(intensity=0, noise=0, blur=0)
INTENSITY_ONLY = AugmentConfig(flips=False, elastic=0, affine=0)


def blobs(shape=(300, 340), seed=0) -> np.ndarray:
    """Three classes in large smooth blobs (so that few pixels lie on a boundary)."""
    from scipy import ndimage as ndi
    field = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 12)
    field = (field - field.mean()) / field.std()
    return np.digitize(field, [-0.5, 0.5]).astype(np.uint8)


def test_image_and_target_move_together_under_every_geometric_transform():
    """The image encodes the target (class / 2); after flips, rotations, affine and elastic warps the
    bilinear image still reads as the nearest-sampled target everywhere but on class boundaries."""
    target = blobs()
    page = Annotated(target.astype(np.float32) / 2, target, "blobs")
    sampler = DeviceCropSampler([page], 128, config=GEOMETRY_ONLY, device="cpu", seed=1, bias=0.0)
    images, targets, weights = sampler.batch(16)
    assert images.shape == (16, 1, 128, 128) and targets.shape == (16, 128, 128) and weights is None
    assert targets.dtype == torch.uint8 and set(torch.unique(targets).tolist()) <= {0, 1, 2}
    read = torch.round(images[:, 0] * 2).to(torch.uint8)
    agree = (read == targets).float().mean().item()
    assert agree > 0.97, agree
    # the check can fail: a target one pixel off its image is caught
    shifted = torch.roll(targets, shifts=3, dims=2)
    assert (read == shifted).float().mean().item() < agree - 0.02
    # the warps did happen: crops are not plain cuts of the page (rotations, flips, deformation)
    assert not all(any(np.array_equal(t.numpy(), target[y:y + 128, x:x + 128]) for y in range(0, 173, 1)
                       for x in (0,)) for t in targets[:4])


def test_unannotated_pixels_stay_unannotated_and_weights_follow_the_target():
    target = blobs()
    target[:, :150] = IGNORE  # the left half is not annotated
    weight = np.where(target == 1, 5.0, 1.0).astype(np.float32)
    page = Annotated(np.random.default_rng(0).random(target.shape, dtype=np.float32), target, "half")
    sampler = DeviceCropSampler([page], 96, config=GEOMETRY_ONLY, device="cpu", seed=2, bias=0.0,
                                border_maps=[weight])
    _, targets, weights = sampler.batch(12)
    assert set(torch.unique(targets).tolist()) <= {0, 1, 2, IGNORE} and (targets == IGNORE).any()
    assert torch.equal(weights == 5.0, targets == 1)  # nearest sampling keeps them aligned


def _displacements_reference(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    t = EdgeSafeElastic(alpha=ELASTIC_ALPHA, sigma=ELASTIC_SIGMA, p=1.0)
    t.set_random_seed(0)
    yy, xx = np.mgrid[:size, :size]
    fields = []
    for _ in range(n):
        p = t.get_params_dependent_on_data({"shape": (size, size)}, {})
        fields.append(np.stack([p["map_y"] - yy, p["map_x"] - xx]))
    return np.stack(fields)  # (n, 2, size, size)


def _field_statistics(fields: np.ndarray) -> tuple[float, float]:
    """Mean within-crop standard deviation of a displacement, and its correlation 20 px apart."""
    std = float(np.mean([f.std() for crop in fields for f in crop]))
    a, b = fields[..., :, :-20].ravel(), fields[..., :, 20:].ravel()
    return std, float(np.corrcoef(a, b)[0, 1])


def test_elastic_field_has_the_references_size_and_smoothness():
    ours = DeviceCropSampler([Annotated(np.zeros((256, 256), np.float32), np.zeros((256, 256), np.uint8), "z")],
                             256, config=AugmentConfig(), device="cpu", seed=3)._elastic(12)
    ours = ours.permute(0, 3, 1, 2).numpy()
    ref_std, ref_corr = _field_statistics(_displacements_reference(12, 256))
    std, corr = _field_statistics(ours)
    assert 2.5 < ref_std < 3.5  # the reference's scale, as documented (ELASTIC_STD_PX)
    assert abs(std - ref_std) < 0.15 * ref_std, (std, ref_std)
    assert abs(corr - ref_corr) < 0.1, (corr, ref_corr)


def test_intensity_changes_follow_the_references_distribution():
    """Brightness/contrast, gamma, blur and noise on a flat grey page: the spread of crop means (the
    brightness, contrast and gamma draws) and of crop standard deviations (the noise draws)."""
    n, side = 400, 48
    flat = np.full((side, side), 0.5, np.float32)
    reference = build_transform(INTENSITY_ONLY, seed=0)
    ref = np.stack([reference(image=flat, mask=np.zeros((side, side), np.uint8))["image"] for _ in range(n)])
    page = Annotated(np.full((200, 200), 0.5, np.float32), np.zeros((200, 200), np.uint8), "flat")
    sampler = DeviceCropSampler([page], side, config=INTENSITY_ONLY, device="cpu", seed=4, bias=0.0)
    ours = torch.cat([sampler.batch(50)[0][:, 0] for _ in range(n // 50)]).numpy()
    for stat in (lambda a: a.reshape(n, -1).mean(1), lambda a: a.reshape(n, -1).std(1)):
        r, o = stat(ref), stat(ours)
        assert abs(r.mean() - o.mean()) < 0.01 + 0.1 * abs(r.mean()), (r.mean(), o.mean())
        assert abs(r.std() - o.std()) < 0.2 * r.std() + 1e-3, (r.std(), o.std())
        for q in (10, 50, 90):
            assert abs(np.percentile(r, q) - np.percentile(o, q)) < 0.02, q
    assert 0.0 <= ours.min() and ours.max() <= 1.0


def test_flips_and_rotations_are_drawn_evenly():
    """The eight D4 elements appear about equally often (each crop of a unique pattern is one of them)."""
    rng = np.random.default_rng(5)
    image = rng.random((32, 32), dtype=np.float32)
    page = Annotated(image, np.zeros((32, 32), np.uint8), "pattern")
    sampler = DeviceCropSampler([page], 32, config=AugmentConfig(elastic=0, affine=0, intensity=0, noise=0, blur=0),
                                device="cpu", seed=6, bias=0.0)
    variants = [np.rot90(image, k) for k in range(4)] + [np.rot90(image[:, ::-1], k) for k in range(4)]
    counts = np.zeros(8, int)
    for crop in torch.cat([sampler.batch(100)[0][:, 0] for _ in range(8)]).numpy():
        hits = [i for i, v in enumerate(variants) if np.allclose(crop, v, atol=1e-5)]
        assert len(hits) == 1
        counts[hits[0]] += 1
    assert counts.min() > 60, counts  # 100 expected each of 800


def test_pages_smaller_than_the_crop_are_grown_as_the_cpu_sampler_does():
    target = np.ones((20, 30), np.uint8)
    page = Annotated(np.random.default_rng(0).random((20, 30), dtype=np.float32), target, "small")
    sampler = DeviceCropSampler([page], 64, config=AugmentConfig(flips=False, elastic=0, affine=0, intensity=0,
                                                                 noise=0, blur=0), device="cpu", seed=7)
    _, targets, _ = sampler.batch(2)
    assert targets.shape == (2, 64, 64)
    assert (targets[:, :20, :30] == 1).all() and (targets[:, 20:, :] == IGNORE).all()


def test_fused_moving_average_equals_torchs_averaged_model():
    from torch.optim.swa_utils import AveragedModel

    from emseg.train.loop import WeightAverage
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    cap = 0.9

    def ema(averaged, current, n):
        if not averaged.is_floating_point():
            return current
        return torch.lerp(current, averaged, torch.clamp((1 + n) / (10 + n), max=cap).to(averaged.dtype))

    reference = AveragedModel(net, avg_fn=ema, use_buffers=True)
    fused = WeightAverage(net, cap)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(30):
        loss = net(torch.randn(4, 1, 16, 16)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference.update_parameters(net)
        fused.update_parameters(net)
    ours, theirs = fused.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()  # checkpoints of either resume into the other
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    again = WeightAverage(net, cap)
    again.load_state_dict(theirs)
    assert again._count == 30


def test_a_run_with_batches_made_on_the_device(tmp_path):
    """The whole training loop with DeviceCropSampler batches (here on the CPU), border weights
    included; it learns and writes a resumable checkpoint."""
    from emseg.model.card import Normalization
    from emseg.synthetic import make_em_stack
    from emseg.train.data import mask_to_target, normalise01
    from emseg.train.loop import TrainConfig, train
    images, masks = make_em_stack(pages=2, height=128, width=128, seed=0)
    items = [Annotated(normalise01(im, Normalization()), mask_to_target(m, sparse=False, name="m"), f"p{i}")
             for i, (im, m) in enumerate(zip(images, masks))]
    config = TrainConfig(encoder="vgg11_bn_micro", classes=("background", "membrane", "mitochondrion"),
                         tile_size=64, batch_size=4, steps=40, val_every=20, augment_on="device", device="cpu")
    result = train(items, config, tmp_path / "run")
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "checkpoint" / "state.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch")
def test_batches_are_made_on_the_gpu_aligned():
    target = blobs()
    page = Annotated(target.astype(np.float32) / 2, target, "blobs")
    sampler = DeviceCropSampler([page], 128, config=GEOMETRY_ONLY, device="cuda", seed=1, bias=0.0)
    images, targets, _ = sampler.batch(16)
    assert images.is_cuda and targets.is_cuda
    assert (torch.round(images[:, 0] * 2).to(torch.uint8) == targets).float().mean().item() > 0.97


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible to torch")
def test_a_short_gpu_run_learns():
    from emseg.model.card import Normalization
    from emseg.synthetic import make_em_stack
    from emseg.train.data import mask_to_target, normalise01
    from emseg.train.loop import TrainConfig, train
    images, masks = make_em_stack(pages=2, height=128, width=128, seed=0)
    items = [Annotated(normalise01(im, Normalization()), mask_to_target(m, sparse=False, name="m"), f"p{i}")
             for i, (im, m) in enumerate(zip(images, masks))]
    config = TrainConfig(encoder="vgg11_bn_micro", classes=("background", "membrane", "mitochondrion"),
                         tile_size=64, batch_size=8, steps=100, val_every=50, device="cuda")
    result = train(items, config)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
