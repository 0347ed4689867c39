"""Gradient clipping and finiteness checks shared by every training loop."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from bissl.utils.errors import NonFiniteError


def require_finite(value: Tensor, what: str, fix: str) -> None:
    """Raise a one-line :class:`NonFiniteError` naming ``what`` and the ``fix`` when ``value`` holds NaN/inf."""
    if not torch.isfinite(value).all():
        shown = value.detach().flatten()[~torch.isfinite(value.detach().flatten())][0].item()
        raise NonFiniteError(f"{what} became {shown}; {fix}")


def global_norm(tensors: Sequence[Tensor]) -> float:
    """``sqrt(sum_i ||t_i||^2)`` over a list of tensors."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([t.detach().norm() for t in tensors])))


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm (when ``max_norm`` is set); returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if max_norm is None or not params:
        return global_norm([p.grad for p in params])
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
