"""SimCLR (Chen et al., 2020): a projector and the NT-Xent contrastive loss between two views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat
from torch import Tensor

from bissl.pretext.base import PRETEXT_METHODS
from bissl.pretext.heads import ProjectorConfig
from bissl.pretext.pair import ProjectedPair


def gather_across_ranks(x: Tensor) -> tuple[Tensor, int, int]:
    """``(cat of every rank's x, rank, world size)``; ``(x, 0, 1)`` without an initialised process group.

    Uses :func:`bissl.distributed.all_gather_rows`, whose backward (a sum over ranks) is itself
    differentiable, so gradients and Hessian-vector products flow to every rank's embeddings.
    """
    from bissl.distributed import all_gather_rows, rank, world

    return all_gather_rows(x), rank(), world()


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5, *, gather_distributed: bool = False) -> Tensor:
    """NT-Xent of two views' embeddings ``z1, z2`` of shape ``[B, D]`` (row ``i`` of each from the same image).

    With cosine similarities ``s`` over the ``2B`` embeddings and ``p(i)`` the other view of anchor ``i``::

        loss = mean_i -log( exp(s(i, p(i)) / T) / sum_{k != i} exp(s(i, k) / T) )

    With ``gather_distributed`` under a process group of ``W > 1`` ranks, the local ``2B`` anchors are
    contrasted with all ``2WB`` embeddings (every rank must pass the same ``B``); the mean of the ranks'
    losses then equals the single-process loss on the concatenated batch.
    """
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    anchors = torch.cat([z1, z2])
    batch = z1.shape[0]
    rank, world = 0, 1
    if gather_distributed:
        all1, rank, world = gather_across_ranks(z1)
        all2, _, _ = gather_across_ranks(z2)
        candidates = torch.cat([all1, all2])
    else:
        candidates = anchors
    logits = anchors @ candidates.T / temperature  # [2B, 2WB]
    local = torch.arange(batch, device=z1.device) + rank * batch
    self_idx = torch.cat([local, local + world * batch])  # where each anchor sits among the candidates
    positive_idx = torch.cat([local + world * batch, local])
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * batch, device=z1.device), self_idx] = True
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), positive_idx)


class SimCLRConfig(ProjectorConfig):
    temperature: PositiveFloat = 0.5
    gather_distributed: bool = False  # contrast with the negatives of every rank (no-op on one process)


@PRETEXT_METHODS.register("simclr")
class SimCLR(ProjectedPair):
    """``loss = NT-Xent(g(f(x1)), g(f(x2)))`` with backbone ``f`` and projector ``g``; each view is its own batch."""

    Config = SimCLRConfig
    augmentation = "simclr"
    config: SimCLRConfig

    def pair_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent_loss(z1, z2, self.config.temperature, gather_distributed=self.config.gather_distributed)
