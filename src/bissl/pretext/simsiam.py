"""SimSiam (Chen & He, 2021): a predictor regresses the other view's projection under a stop-gradient.

Defaults follow the paper and its reference code (``facebookresearch/simsiam``, ``main_simsiam.py``:
``--dim 2048 --pred-dim 512``, projector ``2048 -> 2048 -> 2048`` with BN on every layer, bottleneck predictor
``2048 -> 512 -> 2048``). The CPU defaults keep the 4x bottleneck: projector ``[512, 128]``, predictor
``[32, 128]``. The reference's last projector BN has no affine parameters; ours (:func:`projection_head`) has.

Hessian: BiSSL differentiates ``loss = -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2`` twice with the stop-gradient
targets ``sg(z)`` held constant. That is the Hessian of this loss at fixed targets, NOT the Jacobian of SimSiam's
actual update field (whose targets move with the parameters): the two differ, by ~50 % measured on a toy
(``/work/shared/NOTES.md``). BiSSL's lower-level stationarity is stated for the loss, so this is the Hessian used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor, nn

from bissl.pretext.base import PRETEXT_METHODS, PretextMethod
from bissl.pretext.heads import ProjectorConfig, prediction_head, projection_head


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """``-(mean_i cos(p1_i, sg(z2_i)) + mean_i cos(p2_i, sg(z1_i))) / 2``; ``z1, z2`` are detached here."""
    cos1 = F.cosine_similarity(p1, z2.detach(), dim=1).mean()
    cos2 = F.cosine_similarity(p2, z1.detach(), dim=1).mean()
    return -(cos1 + cos2) / 2


class SimSiamConfig(ProjectorConfig):
    predictor_dims: list[PositiveInt] = Field(default_factory=lambda: [32, 128], min_length=1)

    @model_validator(mode="after")
    def _predictor_matches_projector(self) -> SimSiamConfig:
        if self.predictor_dims[-1] != self.projector_dims[-1]:
            raise ValueError(
                f"predictor_dims must end with the projector's output dim {self.projector_dims[-1]}, "
                f"got {self.predictor_dims}"
            )
        return self


@PRETEXT_METHODS.register("simsiam")
class SimSiam(PretextMethod):
    """``loss = simsiam_loss(q(g(f(x1))), q(g(f(x2))), g(f(x1)), g(f(x2)))``: backbone ``f``, projector ``g``
    (BN after every layer), predictor ``q``. No target network, so :meth:`on_step_end` does nothing.

    Views: the SimCLR augmentation, as in the paper (no solarisation).
    """

    Config = SimSiamConfig
    augmentation = "simclr"
    config: SimSiamConfig

    def __init__(self, feature_dim: int, config: SimSiamConfig | None = None) -> None:
        super().__init__(feature_dim, config)
        self.projector = projection_head(feature_dim, self.config.projector_dims, last_bn=True)
        self.predictor = prediction_head(self.config.projector_dims[-1], self.config.predictor_dims)

    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        self.check_views(views)
        z1, z2 = (self.projector(backbone(view)) for view in views)
        return simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2)
