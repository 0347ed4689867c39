"""Dense float64 references for the bilevel maths: Hessians by autograd, solves by ``torch.linalg.solve``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def dense_hessian(loss: Callable[[], Tensor], params: Sequence[Tensor]) -> Tensor:
    """``d^2 loss / d params^2`` as an ``n x n`` matrix, one row per parameter entry by plain double backward
    (reference only: ``n`` backward passes; wrap in ``preserve_buffers`` if the loss updates BatchNorm statistics)."""
    grads = torch.autograd.grad(loss(), list(params), create_graph=True)
    flat_grad = flat(grads)
    rows = [torch.autograd.grad(flat_grad[i], list(params), retain_graph=True) for i in range(flat_grad.numel())]
    return torch.stack([flat(row) for row in rows])


def dense_implicit(h: Tensor, v: Tensor, mu: float) -> Tensor:
    """``mu (H + mu I)^-1 v`` by a dense solve: what ``implicit_gradient`` approximates."""
    return mu * torch.linalg.solve(h + mu * torch.eye(h.shape[0], dtype=h.dtype), v)


def spd_system(eigenvalues: Tensor, mu: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``A = I + H/mu`` with ``H = Q diag(eigenvalues) Q^T`` (float64, random orthogonal ``Q``), and a random ``b``;
    ``A`` is positive definite iff every eigenvalue exceeds ``-mu``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(eigenvalues.double()) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return torch.eye(n, dtype=torch.float64) + h / mu, b


class CountedMatVec:
    """``x -> A x`` for a dense ``A`` (computed in float64, returned in ``x``'s dtype), counting its calls."""

    def __init__(self, a: Tensor) -> None:
        self.a = a
        self.calls = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        return (self.a @ x.double()).to(x.dtype)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(x: Tensor, ref: Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64."""
    return float(torch.linalg.vector_norm(x.double() - ref.double()) / torch.linalg.vector_norm(ref.double()))


def random_like(params: Sequence[Tensor], seed: int = 3) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def true_residual(a: Tensor, x: Tensor, b: Tensor) -> float:
    """``||b - A x|| / ||b||`` in float64, from the dense ``A``."""
    return float(torch.linalg.vector_norm(b - a @ x.double()) / torch.linalg.vector_norm(b))
