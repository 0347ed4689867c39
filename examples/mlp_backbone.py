"""An MLP backbone plug-in: flattens the image, so its input layer is sized by ``image_size``.

bissl pretrain --plugin examples/mlp_backbone.py backbone.name=example_mlp data.image_size=8
"""

from __future__ import annotations

from torch import nn

from bissl.models import BACKBONES


@BACKBONES.register("example_mlp")
def example_mlp(
    *, in_channels: int, small_images: bool, image_size: int, hidden: int = 128, depth: int = 2
) -> nn.Module:
    """``depth`` x (Linear -> BatchNorm -> ReLU) on the flattened image; ``small_images`` does not apply."""
    width = in_channels * image_size * image_size
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    net = nn.Sequential(*layers)
    net.feature_dim = hidden  # the one attribute a backbone must declare
    return net
