"""The contract of every registered backbone (:data:`bissl.models.BACKBONES`): built from a config's keywords, it
declares ``feature_dim`` and maps an image batch ``[B, C, H, W]`` to pooled features ``[B, feature_dim]``."""

from __future__ import annotations

import pytest
import torch

from bissl.models import BACKBONES, build_backbone, feature_dim_of

TINY_VIT = {"embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4}
SMALL = {"small_cnn": {"width": 4}, "vit_tiny": TINY_VIT, "vit_small": TINY_VIT, "vit_base": TINY_VIT}
"""Keywords that keep the built-ins small here; a user's backbone is built with its defaults."""


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_declares_feature_dim_and_returns_pooled_features(name: str, in_channels: int) -> None:
    if name.startswith("vit_"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = build_backbone(name, in_channels=in_channels, image_size=16, **SMALL.get(name, {})).eval()
    dim = feature_dim_of(backbone)
    assert isinstance(dim, int) and dim > 0 and backbone.feature_dim == dim
    with torch.no_grad():
        features = backbone(torch.rand(2, in_channels, 16, 16))
    assert features.shape == (2, dim) and torch.isfinite(features).all()
