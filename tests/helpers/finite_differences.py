"""The Hessian-vector product of a pretext loss w.r.t. a backbone's parameters against central differences."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bissl.bilevel.hvp import HessianOperator, math_attention, preserve_buffers
from bissl.pretext import PretextMethod


def _set(params: Sequence[Tensor], flat: Tensor) -> None:
    with torch.no_grad():
        for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.copy_(chunk.view_as(p))


def _grad_at(method: PretextMethod, backbone: nn.Module, loss: Callable[[], Tensor], flat: Tensor) -> Tensor:
    params = list(backbone.parameters())
    _set(params, flat)
    with preserve_buffers(nn.ModuleList([backbone, method])), math_attention():  # twice-differentiable attention
        grads = torch.autograd.grad(loss(), params)
    return torch.cat([g.reshape(-1) for g in grads])


def assert_hvp_matches_finite_differences(
    method: PretextMethod,
    backbone: nn.Module,
    views: Sequence[Tensor],
    *,
    hvp_method: str,
    eps: float = 1e-6,
    fd_loss: Callable[[], Tensor] | None = None,
) -> None:
    """``H v`` of ``method.loss`` w.r.t. the backbone's parameters equals ``(g(w + eps v) - g(w - eps v)) / 2 eps``.

    ``g`` is the gradient of ``fd_loss`` (default ``method.loss``): methods with stop-gradient targets that depend
    on the backbone pass the loss with those targets frozen at their current values.
    """
    loss = fd_loss if fd_loss is not None else (lambda: method.loss(backbone, views))
    params = list(backbone.parameters())
    op = HessianOperator(
        lambda: method.loss(backbone, views),
        params,
        method=hvp_method,  # type: ignore[arg-type]
        module=nn.ModuleList([backbone, method]),
    )
    w0 = torch.nn.utils.parameters_to_vector(params).detach().clone()
    state = {k: v.clone() for k, v in nn.ModuleList([backbone, method]).state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    vs = [torch.randn(op.numel, dtype=torch.float64, generator=generator) for _ in range(2)]
    hvs = [op.matvec(v) for v in vs]  # before the finite differences write into the parameters
    for v, hv in zip(vs, hvs, strict=True):
        plus = _grad_at(method, backbone, loss, w0 + eps * v)
        minus = _grad_at(method, backbone, loss, w0 - eps * v)
        _set(params, w0)
        fd = (plus - minus) / (2 * eps)
        assert hv.norm() > 0
        rel = ((hv - fd).norm() / fd.norm()).item()
        assert rel < 1e-5, f"relative error of H v vs finite differences: {rel:.2e}"
    after = nn.ModuleList([backbone, method]).state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "the HVP changed parameters or buffers"
