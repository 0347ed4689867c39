"""torchvision ResNets as backbones: ``fc`` replaced by ``Identity``, optional small-image stem.

State-dict keys are exactly torchvision's (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...; no
``fc``), so torchvision and timm ResNet checkpoints load with :func:`bissl.models.load_backbone_weights`.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from bissl.models.backbones import BACKBONES


def _resnet(
    factory: Callable[..., torchvision.models.ResNet],
    *,
    in_channels: int,
    small_images: bool,
    zero_init_residual: bool,
) -> torchvision.models.ResNet:
    """A randomly initialised ResNet mapping ``[B, C, H, W]`` to ``[B, feature_dim]``.

    ``small_images`` (CIFAR-style, for inputs of ~16-64 px): 3x3 stride-1 ``conv1`` and no max-pool, so the
    stem keeps the full resolution instead of dividing it by 4. Otherwise the ImageNet stem (7x7 stride 2 +
    max-pool), with ``conv1`` rebuilt only when ``in_channels != 3``.
    """
    model = factory(weights=None, zero_init_residual=zero_init_residual)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if small_images:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's own init
    return model


@BACKBONES.register("resnet18")
def resnet18(*, in_channels: int, small_images: bool = True, zero_init_residual: bool = False) -> nn.Module:
    """ResNet-18, ``feature_dim = 512``."""
    return _resnet(
        torchvision.models.resnet18,
        in_channels=in_channels,
        small_images=small_images,
        zero_init_residual=zero_init_residual,
    )


@BACKBONES.register("resnet50")
def resnet50(*, in_channels: int, small_images: bool = True, zero_init_residual: bool = False) -> nn.Module:
    """ResNet-50, ``feature_dim = 2048``."""
    return _resnet(
        torchvision.models.resnet50,
        in_channels=in_channels,
        small_images=small_images,
        zero_init_residual=zero_init_residual,
    )
