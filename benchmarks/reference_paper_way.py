"""The straightforward implicit hypergradient, done the way the BiSSL paper's public code does it (our own code).

It solves ``(I + H/mu) x = v`` (``mu = lam + damping``) with a fixed number of CG iterations, and every
iteration rebuilds what the product needs: a forward pass of the lower loss, its first-order gradient with
``create_graph=True``, then the Hessian-vector product ``d/dtheta <grad, d>`` by a second backward pass. Nothing
is shared between iterations or between the ``N_U`` solves of a cycle. Two iteration rules:

- ``layerwise=True`` (the paper code's default): every parameter tensor ``i`` gets its own step sizes
  ``alpha_i = r_i.r_i / (d_i.(A d)_i + 1e-12)`` and ``beta_i``, while ``A d`` couples all tensors; not conjugate
  gradients (see ``bissl.bilevel.solvers.Layerwise``).
- ``layerwise=False``: true CG over the whole parameter vector, with the same per-iteration rebuild. (The paper
  code's non-layer-wise branch sums per-tensor ratios into its step size; we benchmark correct CG instead, which
  costs the same.)

BatchNorm buffers are restored after each product (the paper's code lets them drift; the cost is the same).
This file is the baseline of ``benchmarks/hypergradient.py``, not part of the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bissl.bilevel import BiSSLTrainer, SolveInfo, preserve_buffers, proximal_mu

PAPER_ITERS = 5


def rebuilt_hvp(
    lower_loss: Callable[[], Tensor], params: Sequence[Tensor], vecs: Sequence[Tensor], module: nn.Module
) -> tuple[Tensor, ...]:
    """``H d``: forward, first-order graph and second backward, all rebuilt for this one product."""
    with torch.enable_grad(), preserve_buffers(module):
        grads = torch.autograd.grad(lower_loss(), params, create_graph=True)
        inner = sum((g * v).sum() for g, v in zip(grads, vecs, strict=True))
        return torch.autograd.grad(inner, params)


def paper_solve(
    lower_loss: Callable[[], Tensor],
    params: Sequence[Tensor],
    vector: Sequence[Tensor],
    mu: float,
    module: nn.Module,
    *,
    iters: int = PAPER_ITERS,
    layerwise: bool = True,
) -> tuple[Tensor, ...]:
    """``x ~ mu (H + mu I)^-1 vector`` by ``iters`` CG iterations from ``x = 0``, each with a rebuilt product."""
    xs = [torch.zeros_like(v) for v in vector]
    rs = [v.detach().clone() for v in vector]
    ds = [r.clone() for r in rs]
    rr = [(r * r).sum() for r in rs]
    for _ in range(iters):
        hds = rebuilt_hvp(lower_loss, params, ds, module)
        ads = [d + hd / mu for d, hd in zip(ds, hds, strict=True)]
        if layerwise:
            alphas = [r_r / ((d * ad).sum() + 1e-12) for r_r, d, ad in zip(rr, ds, ads, strict=True)]
        else:
            alpha = sum(rr) / sum((d * ad).sum() for d, ad in zip(ds, ads, strict=True))
            alphas = [alpha] * len(ds)
        for x, r, d, ad, a in zip(xs, rs, ds, ads, alphas, strict=True):
            x.add_(a * d)
            r.sub_(a * ad)
        rr_new = [(r * r).sum() for r in rs]
        if layerwise:
            betas = [new / (old + 1e-12) for new, old in zip(rr_new, rr, strict=True)]
        else:
            betas = [sum(rr_new) / sum(rr)] * len(ds)
        for d, r, b in zip(ds, rs, betas, strict=True):
            d.mul_(b).add_(r)
        rr = rr_new
    return tuple(xs)


class PaperWayTrainer(BiSSLTrainer):
    """A :class:`BiSSLTrainer` whose upper steps compute the implicit term with :func:`paper_solve`.

    Lower steps, the downstream terms, clipping and optimiser steps are the library's, so a cycle of this trainer
    differs from the library's cycle only in how ``mu (H + mu I)^-1 v`` is obtained.
    """

    def __init__(self, *, layerwise: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layerwise = layerwise
        self._views: Sequence[Tensor] = ()

    def begin_cycle(self, hessian_views: Sequence[Tensor]) -> None:
        super().begin_cycle(hessian_views)  # the library's operator is built lazily and never used here
        self._views = hessian_views

    def solve_implicit(self, v_theta: Sequence[Tensor], operator: Any) -> tuple[tuple[Tensor, ...], SolveInfo]:
        s = self.settings
        x = paper_solve(
            lambda: self.pretext.loss(self.lower_backbone, self._views),
            self.theta,
            v_theta,
            proximal_mu(s.lam, s.damping),
            self._lower_modules,
            iters=s.solver.maxiter,
            layerwise=self.layerwise,
        )
        name = "paper-layerwise" if self.layerwise else "paper-cg"
        return x, SolveInfo(name, s.solver.maxiter, s.solver.maxiter, math.nan, False, "maxiter")
