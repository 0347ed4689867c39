"""Config sections -> the objects every stage builds the same way: datasets, backbones, pretext methods, view
augmentations, optimizers with their schedule."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bissl.config import BackboneConfig, DataConfig, OptimConfig, PretextSection
from bissl.data.augment import ViewPipeline, build_view_augmentation
from bissl.data.base import DatasetInfo
from bissl.distributed import world
from bissl.engine.checkpoint import backbone_spec
from bissl.engine.optim import ParamGroup, build_optimizer, cosine_with_warmup
from bissl.models import build_backbone
from bissl.models.lora import apply_lora, lora_spec
from bissl.models.weights import load_backbone_weights
from bissl.pretext import PRETEXT_METHODS, build_pretext
from bissl.pretext.base import PretextMethod
from bissl.utils.errors import ConfigError


def data_kwargs(cfg: DataConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`bissl.data.build_dataset` a data section sets (besides name, split, seed)."""
    return {"root": cfg.root, "image_size": cfg.image_size, "download": cfg.download}


def build_backbone_from_config(
    cfg: BackboneConfig, in_channels: int, image_size: int | None = None, plugins: Sequence[str] = ()
) -> tuple[nn.Module, dict[str, Any]]:
    """The configured backbone (optionally initialised from local weights) and its rebuild spec (which records
    ``image_size`` and the plug-ins a later stage must import to rebuild it)."""
    backbone = build_backbone(
        cfg.name, in_channels=in_channels, small_images=cfg.small_images, image_size=image_size, **cfg.kwargs
    )
    if cfg.weights is not None:
        load_backbone_weights(backbone, cfg.weights)
    spec = backbone_spec(cfg.name, in_channels, cfg.small_images, cfg.kwargs, image_size=image_size, plugins=plugins)
    return add_lora(backbone, spec, cfg.lora)


def add_lora(
    backbone: nn.Module, spec: dict[str, Any], lora: Mapping[str, Any] | None
) -> tuple[nn.Module, dict[str, Any]]:
    """``backbone`` with LoRA adapters ``lora`` added (base frozen) and its spec recording them; unchanged when
    ``lora`` is None or the backbone already carries these adapters (a file written by ``align`` with LoRA)."""
    wanted = lora_spec(lora)
    if wanted is None or spec.get("lora") == wanted:
        return backbone, spec
    if spec.get("lora") is not None:
        raise ConfigError(f"the backbone already has LoRA adapters {spec['lora']}; remove `lora` or set it equal")
    return apply_lora(backbone, wanted), {**spec, "lora": wanted}


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters that require gradients (a LoRA backbone's adapters, not its frozen base)."""
    return [p for p in params if p.requires_grad]


def distributed_pretext_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` of pretext method ``name``, with ``gather_distributed`` switched on under DDP (more than one
    process) for a method that has that setting, unless ``params`` sets it."""
    params = dict(params)
    if world() > 1 and "gather_distributed" in PRETEXT_METHODS.get(name).Config.model_fields:
        params.setdefault("gather_distributed", True)
    return params


def build_pretext_on(name: str, params: Mapping[str, Any], backbone: nn.Module) -> PretextMethod:
    """Pretext method ``name`` set up on ``backbone``; under DDP a method with a ``gather_distributed`` setting
    contrasts with every rank's samples unless ``params`` says otherwise."""
    method = build_pretext(name, backbone.feature_dim, distributed_pretext_params(name, params))
    method.setup(backbone)
    return method


def view_augmentation(
    section: PretextSection | None, method: PretextMethod, data: DataConfig, info: DatasetInfo
) -> ViewPipeline:
    """The pretext views: the section's augmentation (else the method's own) with its parameters, for ``data``."""
    return build_view_augmentation(
        (section.augmentation if section is not None else None) or method.augmentation,
        image_size=data.image_size, channels=info.channels, mean=info.mean, std=info.std,
        **(section.augmentation_params if section is not None else {}),
    )  # fmt: skip


def build_optimization(
    cfg: OptimConfig, params: Sequence[nn.Parameter] | Sequence[ParamGroup], total_steps: int, steps_per_epoch: int = 1
) -> tuple[Optimizer, LambdaLR]:
    """The configured optimizer over ``params`` (or param groups, e.g. with their own ``lr``) and its cosine
    schedule (warm-up given in epochs; it scales every group's lr alike)."""
    optimizer = configured_optimizer(cfg, params)
    return optimizer, configured_schedule(cfg, optimizer, total_steps, steps_per_epoch)


def configured_optimizer(cfg: OptimConfig, params: Sequence[nn.Parameter] | Sequence[ParamGroup]) -> Optimizer:
    """The optimizer an ``optim`` section names, over ``params`` (or param groups)."""
    return build_optimizer(cfg.name, params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def configured_schedule(cfg: OptimConfig, optimizer: Optimizer, total_steps: int, steps_per_epoch: int = 1) -> LambdaLR:
    """The cosine schedule of an ``optim`` section over ``total_steps`` (warm-up given in epochs)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return cosine_with_warmup(optimizer, warmup, total_steps, min_lr_ratio=cfg.min_lr_ratio)
