"""Hessian-vector products against the dense float64 Hessian; BatchNorm buffers; graph reuse."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bissl.bilevel.hvp import HVP_METHODS, HessianOperator, flatten, preserve_buffers, unflatten
from bissl.utils.errors import ConfigError, NonFiniteError
from helpers.dense import dense_hessian
from helpers.models import ConvNet


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def setup(kind: str) -> tuple[nn.Module, list[str], Callable[[nn.Module], Tensor]]:
    """A float64 model in train mode, the names of the parameters ``H`` is taken over, and its loss."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = mlp().double(), torch.randn(16, 6, dtype=torch.float64)
        y = torch.arange(16) % 4
        names = [n for n, _ in model.named_parameters()]
        return model, names, lambda m: F.cross_entropy(m(x), y)
    model, x = ConvNet().double(), torch.randn(8, 3, 8, 8, dtype=torch.float64)
    y = torch.arange(8) % 5
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    return model, names, lambda m: F.cross_entropy(m(x), y)


@pytest.mark.parametrize("method", HVP_METHODS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_hvp_matches_dense_hessian(kind: str, method: str) -> None:
    model, names, loss = setup(kind)
    params = [dict(model.named_parameters())[n] for n in names]
    with preserve_buffers(model):
        h = dense_hessian(lambda: loss(model), params)
    op = HessianOperator(lambda: loss(model), params, method=method, module=model)  # type: ignore[arg-type]
    assert op.numel == h.shape[0]
    for i in range(3):
        v = torch.randn(op.numel, dtype=torch.float64)
        hv = op.matvec(v)
        assert torch.allclose(hv, h @ v, rtol=1e-9, atol=1e-11)
        assert op.num_hvps == i + 1
    assert torch.allclose(h, h.T, atol=1e-10)


@pytest.mark.parametrize("method", HVP_METHODS)
def test_hvp_leaves_batchnorm_buffers_bit_identical(method: str) -> None:
    model, names, loss = setup("conv")
    model(torch.randn(8, 3, 8, 8, dtype=torch.float64))  # non-trivial running statistics
    before = {n: b.clone() for n, b in model.named_buffers()}
    params = [dict(model.named_parameters())[n] for n in names]
    op = HessianOperator(lambda: loss(model), params, method=method, module=model)  # type: ignore[arg-type]
    for _ in range(3):
        op.matvec(torch.randn(op.numel, dtype=torch.float64))
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_func_falls_back_where_forward_mode_through_the_backward_fails() -> None:
    """``mse_loss``'s backward has no usable forward-mode formula (its constant target's zero tangent is written
    into: "ZeroTensors are immutable"): ``func`` must still give ``H v`` (by reverse-over-reverse), and say so."""
    torch.manual_seed(0)
    model, x, y = mlp().double(), torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    loss = lambda m: F.mse_loss(m(x), y)  # noqa: E731
    h = dense_hessian(lambda: loss(model), list(model.parameters()))
    op = HessianOperator(lambda: loss(model), list(model.parameters()), method="func", module=model)
    with pytest.warns(RuntimeWarning, match="reverse-over-reverse"):
        first = op.matvec(v := torch.randn(op.numel, dtype=torch.float64))
    assert torch.allclose(first, h @ v, rtol=1e-9, atol=1e-11)
    second = op.matvec(w := torch.randn(op.numel, dtype=torch.float64))
    assert torch.allclose(second, h @ w, rtol=1e-9, atol=1e-11) and op.num_hvps == 2


def test_double_backward_builds_the_graph_once() -> None:
    model, names, loss = setup("conv")
    calls = []

    def counted() -> Tensor:
        calls.append(1)
        return loss(model)

    params = [dict(model.named_parameters())[n] for n in names]
    op = HessianOperator(counted, params, method="double_backward", module=model)
    for _ in range(5):
        op.matvec(torch.randn(op.numel, dtype=torch.float64))
    assert len(calls) == 1 and op.num_hvps == 5


def test_preserve_buffers_restores_everything() -> None:
    model = ConvNet()
    model(torch.randn(4, 3, 8, 8))
    before = {n: b.clone() for n, b in model.named_buffers()}
    ids = {n: id(b) for n, b in model.named_buffers()}
    with preserve_buffers(model):
        model(torch.randn(4, 3, 8, 8))
        model.backbone[1].running_mean = torch.zeros(4)  # even a replaced buffer comes back
        assert not torch.equal(model.backbone[4].running_var, before["backbone.4.running_var"])
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]) and id(b) == ids[n], n
    assert int(model.backbone[1].num_batches_tracked) == 1


def test_unused_and_linear_parameters_have_zero_curvature() -> None:
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    linear = torch.randn(2, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    op = HessianOperator(lambda: (w**3).sum() + linear.sum(), [w, linear, unused])
    v = torch.randn(9, dtype=torch.float64)
    expected = torch.cat([6 * w.detach() * v[:3], torch.zeros(6, dtype=torch.float64)])
    assert torch.allclose(op.matvec(v), expected)
    only_linear = HessianOperator(lambda: linear.sum(), [linear])
    assert not only_linear.matvec(torch.ones(2, dtype=torch.float64)).any()


def test_non_finite_loss_or_product_raises() -> None:
    w = torch.randn(3, requires_grad=True)
    lazy = HessianOperator(lambda: (w * math.nan).sum(), [w])  # nothing runs before the first product
    with pytest.raises(NonFiniteError, match="NaN"):
        lazy.matvec(torch.ones(3))
    op = HessianOperator(lambda: (w.exp() ** 3).sum(), [w])
    with pytest.raises(NonFiniteError, match="Hessian-vector product"):
        op.matvec(torch.tensor([1.0, math.inf, 0.0]))


def test_func_method_needs_the_owning_module() -> None:
    model, _, loss = setup("mlp")
    params = list(model.parameters())
    with pytest.raises(ConfigError, match="module"):
        HessianOperator(lambda: loss(model), params, method="func")
    with pytest.raises(ValueError, match="not parameters of module"):
        HessianOperator(lambda: loss(model), [torch.zeros(2, requires_grad=True)], method="func", module=model)
    with pytest.raises(ConfigError, match="double_backward"):
        HessianOperator(lambda: loss(model), params, method="bogus")  # type: ignore[arg-type]


def test_func_refuses_a_loss_that_reads_params_without_calling_the_module() -> None:
    """``functional_call`` substitutes parameters only inside the module's forward: a closure that reads them
    directly would get ``H = 0`` from ``func`` (``double_backward`` differentiates it correctly)."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    params = weight, bias = list(layer.parameters())

    def direct() -> Tensor:
        return (x @ weight.T + bias).pow(4).sum()  # the captured tensors, not layer(x)

    op = HessianOperator(direct, params, method="func", module=layer)
    with pytest.raises(ConfigError, match=r"reads params \[0, 1\] directly.*call the module inside loss_fn"):
        op.matvec(torch.ones(op.numel, dtype=torch.float64))
    v = torch.randn(op.numel, dtype=torch.float64)
    reference = HessianOperator(direct, params, method="double_backward").matvec(v)
    assert reference.abs().max() > 1  # the curvature func would have missed
    through_module = HessianOperator(lambda: layer(x).pow(4).sum(), params, method="func", module=layer)
    assert torch.allclose(through_module.matvec(v), reference, rtol=1e-10, atol=1e-10)


def test_mean_averages_every_product() -> None:
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    calls = []

    def halve(tensors: Sequence[Tensor]) -> None:  # a stand-in for the all-reduce mean over two ranks
        calls.append(len(tensors))
        for t in tensors:
            t.mul_(0.5)

    v = torch.randn(3, dtype=torch.float64)
    op = HessianOperator(lambda: (w**3).sum(), [w], mean=halve)
    assert torch.allclose(op.matvec(v), 3 * w.detach() * v) and calls == [1]


def test_flatten_unflatten_roundtrip() -> None:
    tensors = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    flat = flatten(tensors)
    assert flat.shape == (12,)
    back = unflatten(flat, [t.shape for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(back, tensors, strict=True))
    with pytest.raises(ValueError, match="12 elements"):
        unflatten(flat[:-1], [t.shape for t in tensors])
