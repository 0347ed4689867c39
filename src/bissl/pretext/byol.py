"""BYOL (Grill et al., 2020): online projector + predictor regress an EMA target's projections."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bissl.pretext.base import PRETEXT_METHODS, PretextMethod
from bissl.pretext.heads import ProjectorConfig, prediction_head, projection_head


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``mean_i (2 - 2 cos(p_i, z_i))``: squared distance of the L2-normalised prediction and target."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


def cosine_momentum(k: int, total_steps: int, base: float) -> float:
    """``tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2``: ``base`` at ``k = 0``, rising to 1 at ``k = K``."""
    progress = min(max(k / max(total_steps, 1), 0.0), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    for param in target.parameters():
        param.requires_grad_(False)
        param.grad = None
    return target


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


class BYOLConfig(ProjectorConfig):
    predictor_dims: list[PositiveInt] = Field(default_factory=lambda: [512, 128], min_length=1)
    momentum_base: float = Field(0.99, ge=0, le=1)  # tau_base of the EMA target (paper: 0.996 at batch 4096)

    @model_validator(mode="after")
    def _predictor_matches_projector(self) -> BYOLConfig:
        if self.predictor_dims[-1] != self.projector_dims[-1]:
            raise ValueError(
                f"predictor_dims must end with the projector's output dim {self.projector_dims[-1]}, "
                f"got {self.predictor_dims}"
            )
        return self


@PRETEXT_METHODS.register("byol")
class BYOL(PretextMethod):
    """``loss = l(q(g(f(x1))), g'(f'(x2))) + l(q(g(f(x2))), g'(f'(x1)))`` with ``l`` = :func:`byol_loss`.

    Online backbone ``f``, projector ``g``, predictor ``q``; the target ``f', g'`` (created by :meth:`setup`,
    no gradients) follows ``xi <- tau_k xi + (1 - tau_k) theta`` after every step (:meth:`on_step_end`).
    Call :meth:`setup` before ``load_state_dict``: the target is part of this module's state.
    """

    Config = BYOLConfig
    augmentation = "byol"
    config: BYOLConfig

    def __init__(self, feature_dim: int, config: BYOLConfig | None = None) -> None:
        super().__init__(feature_dim, config)
        self.projector = projection_head(feature_dim, self.config.projector_dims, last_bn=False)
        self.predictor = prediction_head(self.config.projector_dims[-1], self.config.predictor_dims)
        self.target_backbone: nn.Module | None = None
        self.target_projector: nn.Module | None = None
        self.momentum = self.config.momentum_base  # tau used by the latest target update

    def setup(self, backbone: nn.Module) -> None:
        """(Re)initialise the target as frozen copies of ``backbone`` and the online projector."""
        self.target_backbone = _frozen_copy(_unwrap(backbone))
        self.target_projector = _frozen_copy(self.projector)

    def _targets(self) -> tuple[nn.Module, nn.Module]:
        if self.target_backbone is None or self.target_projector is None:
            raise RuntimeError("BYOL has no target network yet; call setup(backbone) first")
        return self.target_backbone, self.target_projector

    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        self.check_views(views)
        target_backbone, target_projector = self._targets()
        p1, p2 = (self.predictor(self.projector(backbone(view))) for view in views)
        with torch.no_grad():
            z1, z2 = (target_projector(target_backbone(view)) for view in views)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    @torch.no_grad()
    def on_step_end(self, backbone: nn.Module, step: int, total_steps: int) -> None:
        """EMA update after the finished step ``step`` (1-based), with ``tau_{step - 1}`` (``tau_base`` first)."""
        target_backbone, target_projector = self._targets()
        self.momentum = cosine_momentum(step - 1, total_steps, self.config.momentum_base)
        online = [*_unwrap(backbone).parameters(), *self.projector.parameters()]
        target = [*target_backbone.parameters(), *target_projector.parameters()]
        if len(online) != len(target):
            raise RuntimeError("the backbone's parameters changed since BYOL.setup; call setup(backbone) again")
        for t, o in zip(target, online, strict=True):
            t.lerp_(o, 1 - self.momentum)
