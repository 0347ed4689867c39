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

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat
from torch import Tensor

from bissl.pretext.base import PRETEXT_METHODS
from bissl.pretext.momentum import MomentumPair, MomentumPairConfig


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
        from bissl.distributed import all_gather_rows, rank

        k, offset = all_gather_rows(k), rank() * q.shape[0]
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCoV3Config(MomentumPairConfig):
    temperature: PositiveFloat = 0.2  # the reference's ResNet setting
    gather_distributed: bool = False  # contrast with the keys of every rank (no-op on one process)


@PRETEXT_METHODS.register("mocov3")
class MoCoV3(MomentumPair):
    """:class:`~bissl.pretext.momentum.MomentumPair` with ``pair_loss`` = :func:`moco_contrastive_loss` of queries
    and keys, BatchNorm after the heads' last layers, the momentum encoder ``momentum_backbone``,
    ``momentum_projector``, and the update after step ``k`` (1-based) with ``m_k``: the reference applies ``m_k``
    at the start of iteration ``k`` (0-based), i.e. right after step ``k`` (1-based) here.

    Views: the BYOL augmentation (asymmetric blur and solarisation), as in the paper.
    """

    Config = MoCoV3Config
    augmentation = "byol"
    config: MoCoV3Config
    heads_last_bn = True
    target_names = ("momentum_backbone", "momentum_projector")
    momentum_step_offset = 0

    def pair_loss(self, p: Tensor, z: Tensor) -> Tensor:
        return moco_contrastive_loss(p, z, self.config.temperature, gather_distributed=self.config.gather_distributed)
