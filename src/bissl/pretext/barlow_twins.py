"""Barlow Twins (Zbontar et al., 2021): drive the cross-correlation of two views' embeddings to the identity.

Defaults follow the paper and its reference code (``facebookresearch/barlowtwins``, ``main.py``:
``--lambd 0.0051 --projector 8192-8192-8192``). The projector defaults to ``[512, 128]`` (the CPU size SimCLR
uses); the paper's is ``[8192, 8192, 8192]``. Like the reference, it has ``Linear -> BN -> ReLU`` hidden layers
and a plain last ``Linear`` (ours keeps its bias; the reference drops it, and the normalisation below cancels it).

The reference normalises with ``BatchNorm1d(affine=False)`` in train mode; here the same batch statistics
(biased variance, ``eps = 1e-5``) are computed directly, so there are no running statistics to keep. Every term
is differentiable, so the Hessian BiSSL takes is exact. With ``gather_distributed`` (switched on under DDP) the
normalisation uses the global batch's statistics and ``c`` is summed over ranks, as the reference does, but through
:func:`bissl.distributed.sum_across_ranks`, an all-reduce inside the graph whose backward is itself differentiable. (The
reference's plain ``all_reduce`` on ``c`` passes the gradient through unsummed, so its gradients are the
single-process ones divided by the number of processes.)
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeFloat, PositiveFloat
from torch import Tensor

from bissl.pretext.base import PRETEXT_METHODS
from bissl.pretext.heads import ProjectorConfig
from bissl.pretext.pair import ProjectedPair
from bissl.pretext.vicreg import off_diagonal


def batch_standardize(z: Tensor, eps: float = 1e-5, *, gather_distributed: bool = False) -> Tensor:
    """``(z - mean_b z) / sqrt(Var_b z + eps)`` per column, the biased variance (BatchNorm1d's train mode).

    With ``gather_distributed`` the mean and variance are those of every rank's rows (differentiably summed over
    ranks); this rank's rows are returned, standardised.
    """
    if not gather_distributed:
        centred = z - z.mean(dim=0)
        return centred / torch.sqrt(centred.pow(2).mean(dim=0) + eps)
    from bissl.distributed import sum_across_ranks

    count = sum_across_ranks(z.new_tensor(float(z.shape[0])))
    centred = z - sum_across_ranks(z.sum(dim=0)) / count
    return centred / torch.sqrt(sum_across_ranks(centred.pow(2).sum(dim=0)) / count + eps)


def barlow_twins_loss(
    z1: Tensor, z2: Tensor, lambd: float = 0.0051, eps: float = 1e-5, *, gather_distributed: bool = False
) -> Tensor:
    """Barlow Twins of embeddings ``z1, z2`` of shape ``[B, D]`` (``B >= 2``)::

        c = standardize(z1)^T standardize(z2) / B
        loss = sum_i (c_ii - 1)^2 + lambd sum_{i != j} c_ij^2

    With ``gather_distributed`` under ``W > 1`` ranks, the standardisation uses the global batch's statistics and
    ``c`` is the sum over ranks of the local products divided by the global batch size ``W B`` (every rank passes
    the same ``B``): every rank computes the single-process loss of the concatenated batch.
    """
    batch = z1.shape[0]
    if gather_distributed:
        from bissl.distributed import sum_across_ranks, world

        batch *= world()
        s1 = batch_standardize(z1, eps, gather_distributed=True)
        s2 = batch_standardize(z2, eps, gather_distributed=True)
        c = sum_across_ranks(s1.T @ s2) / batch
    else:
        c = batch_standardize(z1, eps).T @ batch_standardize(z2, eps) / batch
    if batch < 2:
        raise ValueError(f"Barlow Twins needs a batch of at least 2 (statistics over the batch), got {batch}")
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    return on_diag + lambd * off_diagonal(c).pow(2).sum()


class BarlowTwinsConfig(ProjectorConfig):
    lambd: NonNegativeFloat = 0.0051  # weight of the off-diagonal (redundancy reduction) term
    eps: PositiveFloat = 1e-5  # of the batch normalisation, as BatchNorm1d's default
    gather_distributed: bool = False  # statistics and cross-correlation over every rank's batch (no-op on one process)


@PRETEXT_METHODS.register("barlow_twins")
class BarlowTwins(ProjectedPair):
    """``loss = barlow_twins_loss(g(f(x1)), g(f(x2)))``, backbone ``f``, projector ``g``; each view is its own batch.

    Views: the BYOL augmentation (asymmetric blur and solarisation), as in the paper.
    """

    Config = BarlowTwinsConfig
    augmentation = "byol"
    config: BarlowTwinsConfig
    projector_last_bn = False

    def pair_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        c = self.config
        return barlow_twins_loss(z1, z2, c.lambd, c.eps, gather_distributed=c.gather_distributed)
