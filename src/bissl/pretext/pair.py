"""The shape SimCLR, VICReg and Barlow Twins share: two views through the backbone and one projector, then a loss of
the two embeddings. A method of this family declares its loss (:meth:`ProjectedPair.pair_loss`) and whether its
projector ends in BatchNorm; the base owns the projector and the forward passes."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

from bissl.pretext.base import PretextConfig, PretextMethod
from bissl.pretext.heads import projection_head


class ProjectedPair(PretextMethod):
    """``loss = pair_loss(g(f(x1)), g(f(x2)))`` with backbone ``f`` and projector ``g``; each view is its own batch."""

    #: BatchNorm after the projector's last layer (SimCLR v2: yes; VICReg and Barlow Twins: no)
    projector_last_bn: ClassVar[bool] = True

    def __init__(self, feature_dim: int, config: PretextConfig | None = None) -> None:
        super().__init__(feature_dim, config)
        self.projector = projection_head(feature_dim, self.config.projector_dims, last_bn=self.projector_last_bn)  # type: ignore[attr-defined]

    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        self.check_views(views)
        z1, z2 = (self.projector(backbone(view)) for view in views)
        return self.pair_loss(z1, z2)

    @abc.abstractmethod
    def pair_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The scalar loss of the two views' embeddings ``[B, D]`` (row ``i`` of each from the same image)."""
