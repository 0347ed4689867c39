"""The backbone interface and registry.

A backbone is any ``nn.Module`` mapping images ``[B, C, H, W]`` to features ``[B, D]`` with an int
attribute ``feature_dim = D``. Built-ins register a builder ``(in_channels, small_images, **kwargs) -> module``
in :data:`BACKBONES`; a user's module plugs in through :func:`as_backbone` or by registering its builder::

    @BACKBONES.register("my_net")
    def my_net(*, in_channels: int, small_images: bool, image_size: int, width: int = 64) -> nn.Module: ...

Dense tasks (detection) need feature maps as well. A backbone that serves them also declares

* ``feature_maps(x, last=None) -> OrderedDict[str, Tensor]``: the maps of its stages, in order (finest first),
  stopping after stage ``last`` when given (a C4 detector runs the trunk up to ``layer3`` only);
* ``feature_map_channels: dict[str, int]``: the channels of each map, same keys and order;
* ``feature_stage(name) -> nn.Module``: the module that computes stage ``name`` from the previous stage's map (a C4
  detector runs the last stage on pooled regions).

The pooled ``forward`` path is untouched by these. The built-ins declare them: the ResNets (``layer1`` .. ``layer4``)
and ``small_cnn`` (``stage1`` .. ``stage<depth>``); :func:`feature_map_channels_of` checks a backbone has them.

A builder that declares ``image_size`` (or takes ``**kwargs``) also receives the side of the square input images
(the run's ``data.image_size``); one that does not is called without it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bissl.utils.errors import ConfigError
from bissl.utils.registry import Registry

BackboneBuilder = Callable[..., nn.Module]
BACKBONES: Registry[BackboneBuilder] = Registry("backbone")


def build_backbone(
    name: str, *, in_channels: int, small_images: bool = True, image_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """Build the registered backbone ``name``; extra ``kwargs`` go to its builder (e.g. ``width`` of small_cnn),
    ``image_size`` too when the builder accepts it."""
    builder = BACKBONES.get(name)
    if image_size is not None and _accepts(builder, "image_size"):
        kwargs = {**kwargs, "image_size": image_size}
    try:
        inspect.signature(builder).bind(in_channels=in_channels, small_images=small_images, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"backbone {name!r}: {exc}; check backbone.kwargs") from None
    try:
        module = builder(in_channels=in_channels, small_images=small_images, **kwargs)
    except ValueError as exc:  # a builder's own check of its arguments (e.g. width=0)
        raise ConfigError(f"backbone {name!r}: {exc}; check backbone.kwargs") from None
    feature_dim_of(module)
    return module


def _accepts(builder: BackboneBuilder, keyword: str) -> bool:
    """Whether ``builder`` takes the keyword argument ``keyword`` (by name or through ``**kwargs``)."""
    params = inspect.signature(builder).parameters
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def feature_dim_of(module: nn.Module) -> int:
    """The declared feature dimension ``D`` of a backbone (its ``feature_dim`` attribute)."""
    dim = getattr(module, "feature_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ConfigError(
            f"backbone {type(module).__name__} declares no positive int `feature_dim` (got {dim!r}); set "
            "`self.feature_dim = D` in its __init__ or wrap it with bissl.models.as_backbone(module, feature_dim=D)"
        )
    return dim


def feature_map_channels_of(module: nn.Module) -> dict[str, int]:
    """The declared feature maps ``{name: channels}`` of a backbone that serves dense tasks (module docstring)."""
    channels = getattr(module, "feature_map_channels", None)
    if not isinstance(channels, dict) or not channels or not callable(getattr(module, "feature_maps", None)):
        raise ConfigError(
            f"backbone {type(module).__name__} declares no feature maps; a dense task (detection) needs "
            "`feature_maps(x, last=None) -> OrderedDict[str, Tensor]` and `feature_map_channels: dict[str, int]` "
            "(bissl.models.backbones)"
        )
    return dict(channels)


def as_backbone(
    module: nn.Module, feature_dim: int | None = None, *, example_input: torch.Tensor | None = None
) -> nn.Module:
    """Declare (or, with ``feature_dim=None``, validate) a user module's ``feature_dim`` and return the module.

    With ``example_input`` the module is also run once (eval mode, no grad) to check it returns ``[B, D]``.
    """
    if feature_dim is not None:
        declared = getattr(module, "feature_dim", None)
        if declared is not None and declared != feature_dim:
            raise ConfigError(f"{type(module).__name__} declares feature_dim={declared!r} but {feature_dim} was given")
        module.feature_dim = feature_dim
    dim = feature_dim_of(module)
    if example_input is not None:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            out = module(example_input)
        module.train(was_training)
        expected = (example_input.shape[0], dim)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"{type(module).__name__} must map images to features of shape [B, feature_dim] = {list(expected)}, "
                f"got {got}; flatten/pool its output or fix feature_dim"
            )
    return module
