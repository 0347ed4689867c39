"""torchvision ResNets as backbones: ``fc`` replaced by ``Identity``, optional small-image stem.

State-dict keys are exactly torchvision's (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...; no
``fc``), so torchvision and timm ResNet checkpoints load with :func:`bissl.models.load_backbone_weights`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torchvision
from torch import Tensor, nn

from bissl.models.backbones import BACKBONES

STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetBackbone(torchvision.models.ResNet):
    """torchvision's ResNet with the dense-task interface (:mod:`bissl.models.backbones`): maps ``layer1..4``."""

    feature_map_channels: dict[str, int]

    def feature_stage(self, name: str) -> nn.Module:
        """``layer<i>``."""
        if name not in STAGES:
            raise KeyError(f"no ResNet stage {name!r}; choose one of {STAGES}")
        return getattr(self, name)

    def feature_maps(self, x: Tensor, last: str | None = None) -> OrderedDict[str, Tensor]:
        """The outputs of the stem + ``layer1`` .. ``layer4`` (up to ``last``); ``forward`` (pooled) is unchanged."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps: OrderedDict[str, Tensor] = OrderedDict()
        for name in STAGES:
            x = maps[name] = getattr(self, name)(x)
            if name == last:
                break
        return maps


def _factory(block: type[nn.Module], layers: list[int]) -> Callable[..., torchvision.models.ResNet]:
    def build(weights: None = None, **kwargs: object) -> torchvision.models.ResNet:
        model = ResNetBackbone(block, layers, **kwargs)  # type: ignore[arg-type]
        model.feature_map_channels = {name: _out_channels(getattr(model, name)) for name in STAGES}
        return model

    return build


def _out_channels(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


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
        _factory(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
        in_channels=in_channels,
        small_images=small_images,
        zero_init_residual=zero_init_residual,
    )


@BACKBONES.register("resnet50")
def resnet50(*, in_channels: int, small_images: bool = True, zero_init_residual: bool = False) -> nn.Module:
    """ResNet-50, ``feature_dim = 2048``."""
    return _resnet(
        _factory(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
        in_channels=in_channels,
        small_images=small_images,
        zero_init_residual=zero_init_residual,
    )
