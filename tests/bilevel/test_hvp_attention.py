"""Hessian-vector products through scaled-dot-product attention: the fused kernels have no double backward, so the
operator must force the math kernel (timm ViT with fused attention on; a module calling SDPA directly)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bissl.bilevel.hvp import HVP_METHODS, HessianOperator, flatten, math_attention


def fd_hvp(loss_fn, params: list[Tensor], v: Tensor, eps: float = 1e-5) -> Tensor:
    """Central finite differences of the gradient, float64: ``(g(p + eps v) - g(p - eps v)) / 2 eps`` (error
    ``O(eps^2 ||v||^2)``: pass a unit ``v``)."""
    grads = []
    offsets = v.split([p.numel() for p in params])
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, d in zip(params, offsets, strict=True):
                p.add_(sign * eps * d.view_as(p))
        with math_attention():
            grads.append(flatten(torch.autograd.grad(loss_fn(), params)))
        with torch.no_grad():
            for p, d in zip(params, offsets, strict=True):
                p.sub_(sign * eps * d.view_as(p))
    return (grads[0] - grads[1]) / (2 * eps)


class DirectSDPA(nn.Module):
    """A user's attention module calling ``F.scaled_dot_product_attention`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)
        return self.out(y.mean(1))


@pytest.mark.parametrize("method", HVP_METHODS)
def test_hvp_through_a_direct_sdpa_call(method: str) -> None:
    torch.manual_seed(0)
    model = DirectSDPA().double()
    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.arange(4) % 3
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="not implemented"):  # the fused kernel really is the default here
        (g,) = torch.autograd.grad(loss(), [params[0]], create_graph=True)
        torch.autograd.grad(g.sum(), params[0])
    op = HessianOperator(loss, params, method=method, module=model)  # type: ignore[arg-type]
    v = F.normalize(torch.randn(op.numel, dtype=torch.float64), dim=0)
    assert torch.allclose(op.matvec(v), fd_hvp(loss, params, v), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", HVP_METHODS)
def test_hvp_through_a_tiny_vit_matches_finite_differences(method: str) -> None:
    pytest.importorskip("timm")
    from bissl.models import build_backbone

    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", in_channels=1, image_size=8, embed_dim=16, depth=2, num_heads=2).double()
    assert vit.blocks[0].attn.fused_attn  # fused attention stays on for training
    head = nn.Linear(16, 3).double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.arange(4) % 3
    loss = lambda: F.cross_entropy(head(vit(x)), y)  # noqa: E731
    params = [p for p in vit.parameters() if p.requires_grad]
    op = HessianOperator(loss, params, method=method, module=vit)  # type: ignore[arg-type]
    vs = [F.normalize(torch.randn(op.numel, dtype=torch.float64), dim=0) for _ in range(2)]  # FD error ~ ||v||^2
    hvs = [op.matvec(v) for v in vs]  # before the finite differences move the parameters in place
    for v, hv in zip(vs, hvs, strict=True):
        fd = fd_hvp(loss, params, v)
        assert torch.linalg.vector_norm(hv - fd) <= 1e-6 * torch.linalg.vector_norm(fd)
