"""MoCo v3 (Chen, Xie & He, 2021): a query branch with predictor contrasts against a momentum encoder's keys.

Defaults follow the paper and its reference code (``facebookresearch/moco-v3``, ``main_moco.py``:
``--moco-m 0.99`` with ``--moco-m-cos``, ``--moco-t 0.2`` as its README sets for ResNet-50 (the argparse default is
1.0), ``--moco-dim 256 --moco-mlp-dim 4096``: projector ``2048 -> 4096 -> 4096 -> 256`` and predictor
``256 -> 4096 -> 256``, both with BN after every layer). The CPU defaults: projector and predictor ``[512, 128]``.
The reference's last BN layers have no affine parameters; ours have.

The reference ``forward`` also updates the momentum encoder; here that update runs only in :meth:`on_step_end`,
so :meth:`loss` (also used for Hessian-vector products) changes no parameter. The keys come from the momentum
encoder under ``no_grad``: constants for gradients and for BiSSL's Hessian. With ``gather_distributed`` (switched
on under DDP) the keys of every rank are gathered, as the reference's ``concat_all_gather`` does (no gradient
needed: they are constants), and each rank's queries are contrasted with all of them, the positives offset by the
rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import Tensor, nn

from bissl.pretext.base import PRETEXT_METHODS, PretextMethod
from bissl.pretext.byol import _frozen_copy, _unwrap, cosine_momentum
from bissl.pretext.heads import MLPHead, ProjectorConfig, projection_head


def moco_contrastive_loss(
    q: Tensor, k: Tensor, temperature: float = 0.2, *, gather_distributed: bool = False
) -> Tensor:
    """``CE(normalize(q) normalize(k)^T / T, arange(B)) * 2 T``; ``k`` is detached (keys are constants).

    With ``gather_distributed`` under ``W > 1`` ranks the local queries are contrasted with the keys of every rank
    (every rank passes the same ``B``; query ``i`` of rank ``r`` matches key ``r B + i``); the mean of the ranks'
    losses then equals the single-process loss on the concatenated batch.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    offset = 0
    if gather_distributed:
        from bissl.dist import all_gather_rows, rank

        k, offset = all_gather_rows(k), rank() * q.shape[0]
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCoV3Config(ProjectorConfig):
    predictor_dims: list[PositiveInt] = Field(default_factory=lambda: [512, 128], min_length=1)
    temperature: PositiveFloat = 0.2  # the reference's ResNet setting
    momentum_base: float = Field(0.99, ge=0, le=1)  # m at step 0, cosine schedule up to 1
    gather_distributed: bool = False  # contrast with the keys of every rank (no-op on one process)

    @model_validator(mode="after")
    def _predictor_matches_projector(self) -> MoCoV3Config:
        if self.predictor_dims[-1] != self.projector_dims[-1]:
            raise ValueError(
                f"predictor_dims must end with the projector's output dim {self.projector_dims[-1]}, "
                f"got {self.predictor_dims}"
            )
        return self


@PRETEXT_METHODS.register("mocov3")
class MoCoV3(PretextMethod):
    """``loss = ctr(q(g(f(x1))), g'(f'(x2))) + ctr(q(g(f(x2))), g'(f'(x1)))``, ``ctr`` = :func:`moco_contrastive_loss`.

    Backbone ``f``, projector ``g``, predictor ``q``; the momentum encoder ``f', g'`` (created by :meth:`setup`, no
    gradients) follows ``xi <- m_k xi + (1 - m_k) theta`` after every step (:meth:`on_step_end`), with
    ``m_k = 1 - (1 - m_0)(cos(pi k / K) + 1) / 2`` at the finished step ``k``: the reference applies ``m_k`` at the
    start of iteration ``k`` (0-based), i.e. right after step ``k`` (1-based) here. Call :meth:`setup` before
    ``load_state_dict``: the momentum encoder is part of this module's state.

    Views: the BYOL augmentation (asymmetric blur and solarisation), as in the paper.
    """

    Config = MoCoV3Config
    augmentation = "byol"
    config: MoCoV3Config

    def __init__(self, feature_dim: int, config: MoCoV3Config | None = None) -> None:
        super().__init__(feature_dim, config)
        dims = self.config.projector_dims
        self.projector = projection_head(feature_dim, dims, last_bn=True)
        self.predictor = MLPHead([dims[-1], *self.config.predictor_dims], last_bn=True)
        self.momentum_backbone: nn.Module | None = None
        self.momentum_projector: nn.Module | None = None
        self.momentum = self.config.momentum_base  # m used by the latest update

    def setup(self, backbone: nn.Module) -> None:
        """(Re)initialise the momentum encoder as frozen copies of ``backbone`` and the projector."""
        self.momentum_backbone = _frozen_copy(_unwrap(backbone))
        self.momentum_projector = _frozen_copy(self.projector)

    def _momentum_encoder(self) -> tuple[nn.Module, nn.Module]:
        if self.momentum_backbone is None or self.momentum_projector is None:
            raise RuntimeError("MoCoV3 has no momentum encoder yet; call setup(backbone) first")
        return self.momentum_backbone, self.momentum_projector

    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        self.check_views(views)
        momentum_backbone, momentum_projector = self._momentum_encoder()
        q1, q2 = (self.predictor(self.projector(backbone(view))) for view in views)
        with torch.no_grad():
            k1, k2 = (momentum_projector(momentum_backbone(view)) for view in views)
        t, gather = self.config.temperature, self.config.gather_distributed
        return moco_contrastive_loss(q1, k2, t, gather_distributed=gather) + moco_contrastive_loss(
            q2, k1, t, gather_distributed=gather
        )

    @torch.no_grad()
    def on_step_end(self, backbone: nn.Module, step: int, total_steps: int) -> None:
        """Momentum update after the finished step ``step`` (1-based), with ``m_step``."""
        momentum_backbone, momentum_projector = self._momentum_encoder()
        self.momentum = cosine_momentum(step, total_steps, self.config.momentum_base)
        online = [*_unwrap(backbone).parameters(), *self.projector.parameters()]
        target = [*momentum_backbone.parameters(), *momentum_projector.parameters()]
        if len(online) != len(target):
            raise RuntimeError("the backbone's parameters changed since MoCoV3.setup; call setup(backbone) again")
        for t, o in zip(target, online, strict=True):
            t.lerp_(o, 1 - self.momentum)
