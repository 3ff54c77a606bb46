"""Shared fixtures: tiny models and small synthetic pages, so the suite stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test saying the data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"optional real data {path} is absent (it lives beside the checkout in ../shared/data)")
    return path


@pytest.fixture
def tiny_model():
    """A randomly initialised 3-class U-Net with the very narrow VGG encoder (0.4 M parameters)."""
    import torch

    from emseg.model.card import ModelCard
    from emseg.model.modelfile import Model
    torch.manual_seed(0)
    card = ModelCard(encoder="vgg11_bn_micro", classes=("background", "membrane", "mitochondrion"),
                     tile_size=64, overlap=16)
    return Model.new(card)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
