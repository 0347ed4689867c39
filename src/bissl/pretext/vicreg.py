"""VICReg (Bardes, Ponce & LeCun, 2022): variance-invariance-covariance regularisation of two views' embeddings.

Defaults follow the paper and its reference code (``facebookresearch/vicreg``, ``main_vicreg.py``:
``--sim-coeff 25 --std-coeff 25 --cov-coeff 1 --mlp 8192-8192-8192``). The expander defaults to ``[512, 128]``
(the CPU size SimCLR uses); the paper's is ``[8192, 8192, 8192]``. Like the reference, the expander has
``Linear -> BN -> ReLU`` hidden layers and a plain last ``Linear`` (ours keeps its bias; the reference drops it).

Every term is differentiable, so the Hessian BiSSL takes is exact. With ``gather_distributed`` (switched on under
DDP) the variance and covariance are taken over the global batch, as the reference's ``FullGatherLayer`` does,
through :func:`bissl.distributed.all_gather_rows`, whose backward is itself differentiable: gradients and Hessian-vector
products then equal one process's on the concatenated batch. The invariance term stays local (a mean over rows:
the mean of the ranks' terms is the global one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, PositiveFloat
from torch import Tensor

from bissl.pretext.base import PRETEXT_METHODS
from bissl.pretext.heads import ProjectorConfig
from bissl.pretext.pair import ProjectedPair


def off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of the square matrix ``m``, flattened."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    *,
    gather_distributed: bool = False,
) -> Tensor:
    """VICReg of embeddings ``z1, z2`` of shape ``[B, D]`` (``B >= 2``), as in the reference code::

        inv = mean_{b,d} (z1 - z2)^2
        var = (mean_d relu(1 - sqrt(Var_b z1_d + eps)) + mean_d relu(1 - sqrt(Var_b z2_d + eps))) / 2
        cov = (sum_{i != j} C(z1)_ij^2 + sum_{i != j} C(z2)_ij^2) / D
        loss = sim_coeff inv + std_coeff var + cov_coeff cov

    with the unbiased variance ``Var_b`` and covariance ``C(z) = (z - mean_b z)^T (z - mean_b z) / (B - 1)``.

    With ``gather_distributed`` under a process group of ``W > 1`` ranks, ``var`` and ``cov`` are computed on every
    rank's rows (every rank must pass the same ``B``; the result is the same on every rank) and ``inv`` on the local
    rows; the mean of the ranks' losses then equals the single-process loss on the concatenated batch.
    """
    invariance = F.mse_loss(z1, z2)
    if gather_distributed:
        from bissl.distributed import all_gather_rows

        z1, z2 = all_gather_rows(z1), all_gather_rows(z2)
    batch, dim = z1.shape
    if batch < 2:
        raise ValueError(f"VICReg needs a batch of at least 2 (variance over the batch), got {batch}")
    z1 = z1 - z1.mean(dim=0)
    z2 = z2 - z2.mean(dim=0)
    std1 = torch.sqrt(z1.var(dim=0) + eps)
    std2 = torch.sqrt(z2.var(dim=0) + eps)
    variance = F.relu(1 - std1).mean() / 2 + F.relu(1 - std2).mean() / 2
    cov1 = z1.T @ z1 / (batch - 1)
    cov2 = z2.T @ z2 / (batch - 1)
    covariance = off_diagonal(cov1).pow(2).sum() / dim + off_diagonal(cov2).pow(2).sum() / dim
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


class VICRegConfig(ProjectorConfig):
    """``projector_dims`` is VICReg's expander (paper: ``[8192, 8192, 8192]``)."""

    sim_coeff: NonNegativeFloat = 25.0  # lambda: invariance (MSE)
    std_coeff: NonNegativeFloat = 25.0  # mu: variance hinge
    cov_coeff: NonNegativeFloat = 1.0  # nu: covariance
    eps: PositiveFloat = 1e-4  # inside the square root of the variance
    gather_distributed: bool = False  # variance and covariance over every rank's batch (no-op on one process)


@PRETEXT_METHODS.register("vicreg")
class VICReg(ProjectedPair):
    """``loss = vicreg_loss(h(f(x1)), h(f(x2)))`` with backbone ``f`` and expander ``h``; each view is its own batch.

    Views: the BYOL augmentation (asymmetric blur and solarisation), as in the paper.
    """

    Config = VICRegConfig
    augmentation = "byol"
    config: VICRegConfig
    projector_last_bn = False

    def pair_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        c = self.config
        return vicreg_loss(
            z1, z2, c.sim_coeff, c.std_coeff, c.cov_coeff, c.eps, gather_distributed=c.gather_distributed
        )
