"""L2-SP (Li et al., 2018): a pull of fine-tuned weights toward the weights fine-tuning started from.

The penalty ``alpha / 2 * sum_i ||w_i - w0_i||^2`` has gradient ``alpha * (w_i - w0_i)``; :meth:`L2SP.add_gradient`
adds that gradient to ``.grad`` after the task's backward, which equals back-propagating the penalty with the loss
but needs no autograd graph and is the same on every rank (every rank holds the same weights).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class L2SP:
    """The L2-SP term of ``params``, anchored at their values when this object is made."""

    def __init__(self, params: Iterable[nn.Parameter], alpha: float) -> None:
        if alpha < 0:
            raise ValueError(f"the L2-SP weight must be >= 0, got {alpha}")
        self.params = list(params)
        self.anchor = [p.detach().clone() for p in self.params]
        self.alpha = alpha

    def penalty(self) -> Tensor:
        """``alpha / 2 * sum ||w - w0||^2`` (differentiable in the weights)."""
        total = sum(((p - w0) ** 2).sum() for p, w0 in zip(self.params, self.anchor, strict=True))
        return 0.5 * self.alpha * torch.as_tensor(total)

    @torch.no_grad()
    def add_gradient(self) -> None:
        """``grad += alpha * (w - w0)`` for every parameter (a missing ``.grad`` is set to it)."""
        for p, w0 in zip(self.params, self.anchor, strict=True):
            pull = (p - w0).mul_(self.alpha)
            if p.grad is None:
                p.grad = pull
            else:
                p.grad.add_(pull)
