import pytest
import torch
import torchvision
from torch import nn

from bissl.models import BACKBONES, SmallCNN, as_backbone, build_backbone, feature_dim_of
from bissl.utils.errors import ConfigError


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_shapes_and_torchvision_keys(name: str, dim: int) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).state_dict()
    expected = {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}
    for small in (True, False):
        backbone = build_backbone(name, in_channels=3, small_images=small)
        assert backbone.feature_dim == dim
        shapes = {k: v.shape for k, v in backbone.state_dict().items()}
        assert shapes.keys() == expected.keys()
        stem = (64, 3, 3, 3) if small else (64, 3, 7, 7)
        assert shapes.pop("conv1.weight") == stem
        assert shapes == {k: v for k, v in expected.items() if k != "conv1.weight"}
        assert isinstance(backbone.maxpool, nn.Identity) == small
    backbone.eval()
    assert backbone(torch.rand(2, 3, 32, 32)).shape == (2, dim)


def test_resnet_small_images_keeps_resolution_and_in_channels() -> None:
    small = build_backbone("resnet18", in_channels=1, small_images=True)
    assert small.conv1.weight.shape == (64, 1, 3, 3) and small.conv1.stride == (1, 1)
    large = build_backbone("resnet18", in_channels=1, small_images=False)
    assert large.conv1.weight.shape == (64, 1, 7, 7) and large.conv1.stride == (2, 2)
    small.eval()
    assert small(torch.rand(2, 1, 16, 16)).shape == (2, 512)
    # the small stem keeps 16 px until layer2, the ImageNet stem divides by 4 at once
    assert small.layer1(small.relu(small.bn1(small.conv1(torch.rand(1, 1, 16, 16))))).shape[-1] == 16


@pytest.mark.parametrize(("width", "depth", "size"), [(8, 3, 16), (16, 2, 32), (32, 4, 32)])
def test_small_cnn_shapes(width: int, depth: int, size: int) -> None:
    backbone = build_backbone("small_cnn", in_channels=3, width=width, depth=depth)
    assert isinstance(backbone, SmallCNN)
    assert backbone.feature_dim == width * 2 ** (depth - 1)
    assert backbone(torch.rand(4, 3, size, size)).shape == (4, backbone.feature_dim)


def test_small_cnn_large_images_downsamples_in_first_block() -> None:
    small = build_backbone("small_cnn", in_channels=1, width=4, depth=2)
    large = build_backbone("small_cnn", in_channels=1, width=4, depth=2, small_images=False)
    x = torch.rand(2, 1, 32, 32)
    assert small.features(x).shape[-1] == 16 and large.features(x).shape[-1] == 8


def test_small_cnn_is_twice_differentiable() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=3, width=4, depth=2)
    params = list(backbone.parameters())
    loss = backbone(torch.rand(8, 3, 8, 8)).square().sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * torch.ones_like(g)).sum() for g in grads), params)
    assert any(h.abs().sum() > 0 for h in hvp)


def test_unknown_backbone_and_bad_kwargs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet7'.*small_cnn"):
        build_backbone("resnet7", in_channels=3)
    with pytest.raises(ConfigError, match="widht"):
        build_backbone("small_cnn", in_channels=3, widht=8)


def test_user_backbone_registers_like_builtins() -> None:
    @BACKBONES.register("test_user_mlp", overwrite=True)
    def user_mlp(*, in_channels: int, small_images: bool = True, hidden: int = 5) -> nn.Module:
        return as_backbone(nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden)), feature_dim=hidden)

    backbone = build_backbone("test_user_mlp", in_channels=1, hidden=7)
    assert backbone(torch.rand(3, 1, 4, 4)).shape == (3, 7)
    assert "test_user_mlp" in BACKBONES


def test_feature_dim_is_required_with_a_clear_message() -> None:
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=r"feature_dim.*as_backbone"):
        feature_dim_of(module)
    assert feature_dim_of(as_backbone(module, feature_dim=3)) == 3
    with pytest.raises(ConfigError, match="declares feature_dim=3"):
        as_backbone(module, feature_dim=4)


def test_as_backbone_checks_the_output_shape() -> None:
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert as_backbone(module, 3, example_input=torch.rand(2, 1, 2, 2)) is module
    with pytest.raises(ConfigError, match=r"\[2, 5\]"):
        as_backbone(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), 5, example_input=torch.rand(2, 1, 2, 2))


def test_builders_receive_image_size_only_when_they_accept_it() -> None:
    seen: dict[str, object] = {}

    def sized(*, in_channels: int, small_images: bool, image_size: int) -> nn.Module:
        seen["sized"] = image_size
        return as_backbone(nn.Flatten(), feature_dim=in_channels * image_size**2)

    def open_kwargs(*, in_channels: int, small_images: bool, **kwargs: object) -> nn.Module:
        seen["open"] = kwargs
        return as_backbone(nn.Flatten(), feature_dim=1)

    for name, builder in (("test_sized", sized), ("test_open", open_kwargs)):
        BACKBONES.register(name, overwrite=True)(builder)
    assert build_backbone("test_sized", in_channels=1, image_size=8).feature_dim == 64
    build_backbone("test_open", in_channels=1, image_size=8)
    assert seen == {"sized": 8, "open": {"image_size": 8}}
    assert build_backbone("small_cnn", in_channels=1, image_size=8, width=4).feature_dim == 16  # no image_size param
