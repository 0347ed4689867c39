"""BYOL (Grill et al., 2020): online projector + predictor regress an EMA target's projections."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bissl.pretext.base import PRETEXT_METHODS
from bissl.pretext.momentum import MomentumPair, MomentumPairConfig


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``mean_i (2 - 2 cos(p_i, z_i))``: squared distance of the L2-normalised prediction and target."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


class BYOLConfig(MomentumPairConfig):
    """BYOL's settings: ``momentum_base`` is ``tau_base`` of the EMA target (the paper: 0.996 at batch 4096)."""


@PRETEXT_METHODS.register("byol")
class BYOL(MomentumPair):
    """:class:`~bissl.pretext.momentum.MomentumPair` with ``pair_loss`` = :func:`byol_loss`, no BatchNorm after the
    heads' last layers, the target ``target_backbone``, ``target_projector``, and the update after step ``k``
    (1-based) with ``tau_{k - 1}`` (``tau_base`` first)."""

    Config = BYOLConfig
    augmentation = "byol"
    heads_last_bn = False
    momentum_step_offset = -1

    def pair_loss(self, p: Tensor, z: Tensor) -> Tensor:
        return byol_loss(p, z)
