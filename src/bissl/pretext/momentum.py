"""The shape BYOL and MoCo v3 share: an online branch (backbone, projector, predictor) against a momentum (EMA) copy
of the backbone and projector, the target. A method of this family declares its loss of one prediction and one
target (:meth:`MomentumPair.pair_loss`), whether its heads end in BatchNorm, the names of its target modules (their
state-dict prefixes) and where its momentum schedule starts; the base owns the heads, the target, the cosine
momentum schedule and the EMA update."""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bissl.pretext.base import PretextMethod
from bissl.pretext.heads import MLPHead, ProjectorConfig, projection_head


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


class MomentumPairConfig(ProjectorConfig):
    """Projector and predictor widths and the momentum at step 0 (it follows :func:`cosine_momentum` up to 1)."""

    predictor_dims: list[PositiveInt] = Field(default_factory=lambda: [512, 128], min_length=1)
    momentum_base: float = Field(0.99, ge=0, le=1)

    @model_validator(mode="after")
    def _predictor_matches_projector(self) -> MomentumPairConfig:
        if self.predictor_dims[-1] != self.projector_dims[-1]:
            raise ValueError(
                f"predictor_dims must end with the projector's output dim {self.projector_dims[-1]}, "
                f"got {self.predictor_dims}"
            )
        return self


class MomentumPair(PretextMethod):
    """``loss = pair_loss(q(g(f(x1))), g'(f'(x2))) + pair_loss(q(g(f(x2))), g'(f'(x1)))``.

    Online backbone ``f``, projector ``g``, predictor ``q``; the target ``f', g'`` (created by :meth:`setup` as
    frozen copies, evaluated under ``no_grad``: constants for gradients and for BiSSL's Hessian) follows
    ``xi <- tau xi + (1 - tau) theta`` after every step (:meth:`on_step_end`), so :meth:`loss` changes no parameter.
    Call :meth:`setup` before ``load_state_dict``: the target is part of this module's state.
    """

    #: BatchNorm after the last layer of the projector and of the predictor (MoCo v3: yes; BYOL: no)
    heads_last_bn: ClassVar[bool]
    #: attribute names of the target backbone and projector: their state-dict prefixes
    target_names: ClassVar[tuple[str, str]] = ("target_backbone", "target_projector")
    #: the update after the finished step ``s`` (1-based) uses ``tau`` of schedule step ``s + momentum_step_offset``
    momentum_step_offset: ClassVar[int]

    config: MomentumPairConfig

    def __init__(self, feature_dim: int, config: MomentumPairConfig | None = None) -> None:
        super().__init__(feature_dim, config)
        dims = self.config.projector_dims
        self.projector = projection_head(feature_dim, dims, last_bn=self.heads_last_bn)
        self.predictor = MLPHead([dims[-1], *self.config.predictor_dims], last_bn=self.heads_last_bn)
        for name in self.target_names:
            setattr(self, name, None)
        self.momentum = self.config.momentum_base  # tau used by the latest target update

    def setup(self, backbone: nn.Module) -> None:
        """(Re)initialise the target as frozen copies of ``backbone`` and the online projector."""
        for name, online in zip(self.target_names, (_unwrap(backbone), self.projector), strict=True):
            setattr(self, name, _frozen_copy(online))

    def _target(self) -> tuple[nn.Module, nn.Module]:
        backbone, projector = (getattr(self, name) for name in self.target_names)
        if backbone is None or projector is None:
            raise RuntimeError(f"{type(self).__name__} has no target network yet; call setup(backbone) first")
        return backbone, projector

    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        self.check_views(views)
        target_backbone, target_projector = self._target()
        p1, p2 = (self.predictor(self.projector(backbone(view))) for view in views)
        with torch.no_grad():
            z1, z2 = (target_projector(target_backbone(view)) for view in views)
        return self.pair_loss(p1, z2) + self.pair_loss(p2, z1)

    @abc.abstractmethod
    def pair_loss(self, p: Tensor, z: Tensor) -> Tensor:
        """The scalar loss of the online predictions ``p`` of one view and the targets ``z`` of the other (``[B, D]``,
        row ``i`` of each from the same image)."""

    @torch.no_grad()
    def on_step_end(self, backbone: nn.Module, step: int, total_steps: int) -> None:
        """EMA update of the target after the finished step ``step`` (1-based)."""
        target_backbone, target_projector = self._target()
        self.momentum = cosine_momentum(step + self.momentum_step_offset, total_steps, self.config.momentum_base)
        online = [*_unwrap(backbone).parameters(), *self.projector.parameters()]
        target = [*target_backbone.parameters(), *target_projector.parameters()]
        if len(online) != len(target):
            raise RuntimeError(
                f"the backbone's parameters changed since {type(self).__name__}.setup; call setup(backbone) again"
            )
        for t, o in zip(target, online, strict=True):
            t.lerp_(o, 1 - self.momentum)
