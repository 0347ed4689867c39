"""Backbones for dense tasks: feature maps and their channels, the pooled path unchanged."""

import pytest
import torch

from bissl.models import build_backbone
from bissl.models.backbones import feature_map_channels_of


@pytest.mark.parametrize(
    ("name", "kwargs", "names"),
    [
        ("resnet18", {}, ["layer1", "layer2", "layer3", "layer4"]),
        ("small_cnn", {"width": 4}, ["stage1", "stage2", "stage3"]),
    ],
)
def test_feature_maps_match_declared_channels_and_pooled_forward(name, kwargs, names):
    backbone = build_backbone(name, in_channels=3, **kwargs).eval()
    x = torch.rand(2, 3, 16, 16)
    maps = backbone.feature_maps(x)
    channels = feature_map_channels_of(backbone)
    assert list(maps) == list(channels) == names
    assert all(maps[k].shape[1] == channels[k] for k in names)
    torch.testing.assert_close(backbone(x), maps[names[-1]].mean(dim=(2, 3)))  # forward = pool of the last map
    assert list(backbone.feature_maps(x, last=names[1])) == names[:2]
    torch.testing.assert_close(backbone.feature_stage(names[-1])(maps[names[-2]]), maps[names[-1]])
    assert "fc.weight" not in backbone.state_dict()
