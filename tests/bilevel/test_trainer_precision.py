"""BiSSLTrainer with bf16 forward passes (``forward_context``): fp32 backward passes, products and solves.

torch autocasts to bfloat16 on a CPU too, so the mixed-precision path runs here without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bissl.bilevel.implicit import SolverSpec
from bissl.bilevel.solvers import SolveInfo
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer, CycleOperator
from bissl.pretext.base import PretextMethod
from helpers.models import ConvNet, TinyClassify


def bf16() -> contextlib.AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


class TinyConvBackbone(nn.Module):
    """The conv part of :class:`ConvNet` (two convolutions with BatchNorm), 6 features."""

    feature_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.net = ConvNet().backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ClassifyViewPretext(PretextMethod):
    """Predict a class (view 2) from view 1's features; records the dtype of the features it saw."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.head = nn.Linear(feature_dim, 4)
        self.feature_dtypes: list[torch.dtype] = []

    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        features = backbone(views[0])
        self.feature_dtypes.append(features.dtype)
        return F.cross_entropy(self.head(features), views[1])


class RecordingTrainer(BiSSLTrainer):
    """Records the solve's right-hand side and solution (flat), the dtypes of every product's input and output,
    and whether autocast was on while a product ran."""

    def solve_implicit(
        self, v_theta: Sequence[Tensor], operator: CycleOperator
    ) -> tuple[tuple[Tensor, ...], SolveInfo]:
        self.rhs = _flat(v_theta)
        self.seen: dict[str, list] = {"rhs": [v.dtype for v in v_theta], "inputs": [], "products": [], "autocast": []}
        matvec = operator.matvec

        def recording(v: Tensor) -> Tensor:
            self.seen["inputs"].append(v.dtype)
            self.seen["autocast"].append(torch.is_autocast_enabled("cpu"))
            product = matvec(v)
            self.seen["products"].append(product.dtype)
            return product

        operator.matvec = recording  # type: ignore[method-assign]
        x, info = super().solve_implicit(v_theta, operator)
        self.seen["solution"] = [t.dtype for t in x]
        self.solution = _flat(x)
        return x, info


def _trainer(
    forward_context: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
    *,
    solver: str = "cg",
    hvp: str | None = None,
) -> RecordingTrainer:
    torch.manual_seed(0)
    backbone = TinyConvBackbone()
    pretext = ClassifyViewPretext(6)
    task = TinyClassify()
    head = task.build_head(6)
    settings = BilevelSettings(lam=0.5, damping=2.0, solver=SolverSpec(solver, maxiter=20, rtol=None), hvp=hvp)
    sgd = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
    trainer = RecordingTrainer(
        backbone=backbone, pretext=pretext, task=task, head=head, settings=settings,
        make_lower_optimizer=sgd, make_upper_optimizer=sgd, forward_context=forward_context,
    )  # fmt: skip
    with torch.no_grad():  # phi != theta, as after some lower steps
        for p in trainer.phi:
            p.add_(0.05 * torch.randn_like(p))
    return trainer


def _batches() -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)]
    down = (torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g))
    return views, down


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _relative(got: Tensor, want: Tensor) -> float:
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


@pytest.mark.parametrize(
    "hvp",
    # torch 2.14's forward-mode AD fails on autocast's casts; "func" warns and uses reverse-over-reverse
    ["double_backward", pytest.param("func", marks=pytest.mark.filterwarnings("ignore:HVP method 'func'"))],
)
def test_bf16_forwards_give_an_fp32_hypergradient_close_to_fp32(hvp):
    views, batch = _batches()
    reference = _trainer(hvp=hvp)
    expected, _ = reference.hypergradient(batch, views)
    trainer = _trainer(bf16, hvp=hvp)
    grads, stats = trainer.hypergradient(batch, views)

    assert torch.bfloat16 in trainer.pretext.feature_dtypes  # the Hessian's forward ran under autocast
    assert torch.float32 not in trainer.pretext.feature_dtypes
    assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
    seen = trainer.seen
    assert stats["solver_hvps"] >= 2 and len(seen["products"]) == stats["solver_hvps"]
    assert set(seen["rhs"]) | set(seen["inputs"]) | set(seen["products"]) | set(seen["solution"]) == {torch.float32}
    assert not any(seen["autocast"])  # every product (its autograd.grad) runs outside autocast

    got, want = _flat(grads), _flat(expected)
    relative = _relative(got, want)
    cosine = float(F.cosine_similarity(got, want, dim=0))
    rhs_rel = _relative(trainer.rhs, reference.rhs)
    solution_rel = _relative(trainer.solution, reference.solution)
    print(
        f"hvp={hvp}: bf16 vs fp32 hypergradient relative error {relative:.2e}, cosine {cosine:.6f}; "
        f"right-hand side {rhs_rel:.2e}, implicit term {solution_rel:.2e}"
    )
    assert 0 < relative < 5e-2  # > 0: bf16 did change the forward passes
    assert cosine > 0.99
    assert solution_rel < 1.25 * rhs_rel  # the fp32 solve adds little to the error of its bf16 inputs


def test_bf16_lower_step_keeps_fp32_gradients_and_is_close_to_fp32():
    views, _ = _batches()
    results = []
    for context in (contextlib.nullcontext, bf16):
        trainer = _trainer(context)
        losses = trainer.lower_step(views, total_lower_steps=1)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainer.lower_params)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
        results.append((losses, _flat([p.detach() for p in trainer.theta]), trainer.pretext.feature_dtypes))
    (fp32_losses, fp32_theta, fp32_seen), (bf16_losses, bf16_theta, bf16_seen) = results
    assert fp32_seen == [torch.float32] and bf16_seen == [torch.bfloat16]
    assert bf16_losses["pretext_loss"] == pytest.approx(fp32_losses["pretext_loss"], rel=2e-2)
    assert torch.allclose(bf16_theta, fp32_theta, rtol=0, atol=1e-3)


def test_solver_without_products_runs_no_hessian_forward():
    views, batch = _batches()
    trainer = _trainer(bf16, solver="identity")
    trainer.hypergradient(batch, views)
    assert trainer.pretext.feature_dtypes == [] and trainer.seen["products"] == []
