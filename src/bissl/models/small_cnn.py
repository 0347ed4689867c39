"""A small conv net for CPU-sized experiments (16-32 px images)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bissl.models.backbones import BACKBONES


class SmallCNN(nn.Module):
    """``depth`` blocks of 3x3 conv -> BatchNorm -> ReLU, widths ``width * 2**i``, then global average pooling.

    Every block but the first halves the resolution (the first too when ``small_images`` is False), so
    ``feature_dim = width * 2**(depth - 1)``.
    """

    def __init__(self, in_channels: int, *, width: int = 32, depth: int = 3, small_images: bool = True) -> None:
        super().__init__()
        if width <= 0 or depth <= 0:
            raise ValueError(f"small_cnn needs width > 0 and depth > 0, got width={width}, depth={depth}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2**i
            stride = 1 if i == 0 and small_images else 2
            layers += [nn.Conv2d(channels, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self.feature_map_channels = {f"stage{i + 1}": width * 2**i for i in range(depth)}

    def feature_stage(self, name: str) -> nn.Module:
        """Block ``name`` (``stage<i>``): conv, BatchNorm, ReLU (sharing this module's parameters)."""
        i = list(self.feature_map_channels).index(name)
        return self.features[3 * i : 3 * i + 3]

    def feature_maps(self, x: torch.Tensor, last: str | None = None) -> OrderedDict[str, torch.Tensor]:
        """The output of every block, up to block ``last`` (all by default)."""
        maps: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.feature_map_channels:
            x = maps[name] = self.feature_stage(name)(x)
            if name == last:
                break
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


@BACKBONES.register("small_cnn")
def small_cnn(*, in_channels: int, small_images: bool = True, width: int = 32, depth: int = 3) -> nn.Module:
    return SmallCNN(in_channels, width=width, depth=depth, small_images=small_images)
