"""``implicit_gradient`` against dense exact solves, closed forms and finite differences."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bissl.bilevel import SOLVERS, HessianOperator, SolveInfo, SolverSpec, implicit_gradient, proximal_mu
from bissl.bilevel.hvp import HVP_METHODS, preserve_buffers
from bissl.bilevel.solvers import CG, SolveContext
from bissl.utils.errors import ConfigError
from helpers.dense import dense_hessian, dense_implicit, flat, random_like, rel_err
from helpers.models import conv_problem

LAM = 1e-3


def mlp_problem() -> tuple[nn.Module, list[Tensor], Callable[[], Tensor]]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.arange(16) % 4
    return model, list(model.parameters()), lambda: F.cross_entropy(model(x), y)


@pytest.fixture(scope="module")
def conv_dense() -> tuple[Tensor, Tensor]:
    """Dense Hessian of the conv problem (computed once) and a right-hand side."""
    model, params, loss = conv_problem()
    with preserve_buffers(model):
        h = dense_hessian(loss, params)
    return h, flat(tuple(random_like(params)))


@pytest.mark.parametrize("problem", ["mlp", "conv"])
@pytest.mark.parametrize("method", HVP_METHODS)
def test_cg_matches_dense_exact(problem: str, method: str) -> None:
    model, params, loss = mlp_problem() if problem == "mlp" else conv_problem()
    with preserve_buffers(model):
        h = dense_hessian(loss, params)
    v = random_like(params)
    for damping in (10.0, 3.0):  # H's eigenvalues lie in [-2.1, 0.4] (conv) and [-0.2, 0.5] (mlp)
        mu = LAM + damping
        op = HessianOperator(loss, params, method=method, module=model)  # type: ignore[arg-type]
        x, info = implicit_gradient(op, v, mu=mu, solver=SolverSpec("cg", maxiter=100, rtol=1e-10))
        assert rel_err(flat(x), dense_implicit(h, flat(tuple(v)), mu)) < 1e-4
        assert info.converged and [t.shape for t in x] == [p.shape for p in params]


def test_exact_and_neumann_match(conv_dense: tuple[Tensor, Tensor]) -> None:
    h, v_flat = conv_dense
    model, params, loss = conv_problem()
    v = [t.view_as(p) for t, p in zip(v_flat.split([p.numel() for p in params]), params, strict=True)]
    op = HessianOperator(loss, params, module=model)
    x, info = implicit_gradient(op, v, mu=LAM + 10.0, solver=SolverSpec("exact"))
    assert rel_err(flat(x), dense_implicit(h, v_flat, LAM + 10.0)) < 1e-10 and info.matvecs == v_flat.numel()
    norm_h = float(torch.linalg.matrix_norm(h, ord=2))
    damping = 2 * norm_h  # ||H/mu|| ~ 1/2: the series converges
    op = HessianOperator(loss, params, module=model)
    x, info = implicit_gradient(op, v, mu=LAM + damping, solver=SolverSpec("neumann", maxiter=60, rtol=1e-9))
    assert info.converged and rel_err(flat(x), dense_implicit(h, v_flat, LAM + damping)) < 1e-8


def test_batchnorm_running_stats_are_bit_identical_after_a_solve() -> None:
    for method in HVP_METHODS:
        model, params, loss = conv_problem()
        loss()  # non-trivial running statistics
        before = {n: b.clone() for n, b in model.named_buffers()}
        op = HessianOperator(loss, params, method=method, module=model)  # type: ignore[arg-type]
        implicit_gradient(op, random_like(params), mu=LAM + 10.0, solver=SolverSpec("cg", maxiter=5, rtol=None))
        assert all(torch.equal(b, before[n]) for n, b in model.named_buffers()), method


@pytest.mark.parametrize("method", HVP_METHODS)
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_solve_through_a_batchnorm_in_either_mode_matches_the_dense_solve(method: str, bn_mode: str) -> None:
    """An eval-mode BatchNorm saves its running statistics for backward: the solve must not write them (it used to
    copy them back in place, failing the products); train mode must not move them. Both: H matches the dense one."""
    model, params, loss = conv_problem()
    loss()  # non-trivial running statistics
    model.backbone[4].train(bn_mode == "train")  # the second BatchNorm; the first stays in train mode
    before = {n: b.clone() for n, b in model.named_buffers()}
    with preserve_buffers(model):
        h = dense_hessian(loss, params)
    v = random_like(params)
    op = HessianOperator(loss, params, method=method, module=model)  # type: ignore[arg-type]
    for damping in (10.0, 3.0):  # two solves share the operator (and its graph, for double_backward)
        x, info = implicit_gradient(op, v, mu=LAM + damping, solver=SolverSpec("cg", maxiter=100, rtol=1e-10))
        assert info.converged and rel_err(flat(x), dense_implicit(h, flat(tuple(v)), LAM + damping)) < 1e-8
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert model.backbone[4].training == (bn_mode == "train")


def test_first_order_graph_is_built_once_per_solve_and_shared_by_an_operator() -> None:
    model, params, loss = conv_problem()
    calls = []

    def counted() -> Tensor:
        calls.append(1)
        return loss()

    op = HessianOperator(counted, params, method="double_backward", module=model)
    assert not calls and not op.built  # lazy: nothing runs before the first product
    fixed = SolverSpec("cg", maxiter=5, rtol=None)
    solutions = [implicit_gradient(op, random_like(params, s), mu=LAM + 10.0, solver=fixed) for s in range(3)]
    assert len(calls) == 1 and op.built and op.num_hvps == sum(i.matvecs for _, i in solutions) == 15


def test_recycled_cg_shares_its_directions_through_the_operator(conv_dense: tuple[Tensor, Tensor]) -> None:
    """Solves sharing one operator share one recycle space (``operator.cache``): each matches the dense solve, and
    together they use fewer products than independent CG solves; a new operator starts from an empty space."""
    h, _ = conv_dense
    model, params, loss = conv_problem()
    damping = 3.0
    rhs = [random_like(params, seed) for seed in range(6)]
    used = {}
    for solver in ("cg", "recycled_cg"):
        op = HessianOperator(loss, params, module=model)
        for v in rhs:
            x, info = implicit_gradient(op, v, mu=LAM + damping, solver=SolverSpec(solver, maxiter=50, rtol=1e-6))
            assert info.converged and rel_err(flat(x), dense_implicit(h, flat(tuple(v)), LAM + damping)) < 1e-5
        used[solver] = op.num_hvps
    assert used["recycled_cg"] < used["cg"]
    assert list(op.cache) == [("solver_state", LAM + damping)]
    assert len(op.cache[("solver_state", LAM + damping)]["recycle"]) > 0
    fresh = HessianOperator(loss, params, module=model)
    recycled = SolverSpec("recycled_cg", maxiter=50, rtol=1e-6)
    _, first = implicit_gradient(fresh, rhs[0], mu=LAM + damping, solver=recycled)
    cold_op = HessianOperator(loss, params, module=model)
    _, cold = implicit_gradient(cold_op, rhs[0], mu=LAM + damping, solver=SolverSpec("cg", maxiter=50, rtol=1e-6))
    assert first.matvecs == cold.matvecs


def test_recycle_vectors_bounds_the_shared_space() -> None:
    model, params, loss = conv_problem()
    op = HessianOperator(loss, params, module=model)
    spec = SolverSpec("recycled_cg", maxiter=20, rtol=1e-8, recycle_vectors=3)
    for seed in range(3):
        implicit_gradient(op, random_like(params, seed), mu=LAM + 3.0, solver=spec)
    space = op.cache[("solver_state", LAM + 3.0)]["recycle"]
    assert space.max_vectors == 3 and len(space) == 3 and space.count > 3


def test_identity_uses_no_hessian_vector_products_and_no_forward() -> None:
    _, params, loss = conv_problem()
    calls = []
    v = random_like(params)
    op = HessianOperator(lambda: calls.append(1) or loss(), params)
    x, info = implicit_gradient(op, v, mu=LAM + 10.0, solver=SolverSpec("identity"))
    assert not op.built
    assert info.matvecs == 0 and not calls and all(torch.equal(a, b) for a, b in zip(x, v, strict=True))


def test_warm_start_from_the_solution(conv_dense: tuple[Tensor, Tensor]) -> None:
    model, params, loss = conv_problem()
    v = random_like(params)
    op = HessianOperator(loss, params, module=model)
    x, _ = implicit_gradient(op, v, mu=LAM + 3.0, solver=SolverSpec("cg", maxiter=100, rtol=1e-12))
    _, info = implicit_gradient(op, v, mu=LAM + 3.0, solver=SolverSpec("cg", maxiter=100, rtol=1e-8), x0=x)
    assert info.iterations == 0 and info.matvecs == 1 and info.converged


def ridge(n: int = 30, d: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(4)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)


def test_ridge_regression_closed_form() -> None:
    """Lower loss 0.5 ||X theta - y||^2: H = X^T X exactly."""
    x_mat, y = ridge()
    theta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64)
    mu = LAM + 0.5
    expected = mu * torch.linalg.solve(x_mat.T @ x_mat + mu * torch.eye(6, dtype=torch.float64), v)
    op = HessianOperator(lambda: 0.5 * (x_mat @ theta - y).pow(2).sum(), [theta])
    (x,), info = implicit_gradient(op, [v], mu=mu, solver=SolverSpec("cg", maxiter=6, rtol=None))
    assert rel_err(x, expected) < 1e-10 and info.matvecs == 6


def test_finite_difference_of_the_lower_solution() -> None:
    """d F(theta*(phi)) / d phi = lam (H + lam I)^-1 grad F(theta*) on a strongly convex lower level."""
    x_mat, y = ridge()
    t = torch.randn(6, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)

    def theta_star(phi: Tensor) -> Tensor:
        return torch.linalg.solve(x_mat.T @ x_mat + LAM * eye, x_mat.T @ y + LAM * phi)

    def upper(phi: Tensor) -> Tensor:
        return 0.5 * (theta_star(phi) - t).pow(2).sum()

    phi = torch.randn(6, dtype=torch.float64)
    eps = 1e-4
    fd = torch.stack([(upper(phi + eps * e) - upper(phi - eps * e)) / (2 * eps) for e in eye])
    theta = theta_star(phi).requires_grad_()
    op = HessianOperator(lambda: 0.5 * (x_mat @ theta - y).pow(2).sum(), [theta])
    (x,), _ = implicit_gradient(op, [theta.detach() - t], mu=LAM, solver=SolverSpec("cg", maxiter=50, rtol=1e-13))
    assert rel_err(x, fd) < 1e-6


def test_invalid_lam_and_mu_raise_config_errors() -> None:
    _, params, loss = conv_problem()
    v = random_like(params)
    with pytest.raises(ConfigError, match=r"lam=0\.0 must be > 0"):
        proximal_mu(0.0, 10.0)
    with pytest.raises(ConfigError, match=r"raise damping=-1\.0"):
        proximal_mu(LAM, -1.0)
    op = HessianOperator(loss, params)
    with pytest.raises(ConfigError, match=r"mu = lam \+ damping = 0 must be > 0"):
        implicit_gradient(op, v, mu=0)
    with pytest.raises(ValueError, match="the operator acts on"):
        implicit_gradient(op, v[:-1], mu=LAM)


def test_user_solver_factory_receives_the_spec_and_the_blocks_and_layerwise_runs() -> None:
    _, params, loss = conv_problem()
    seen = []

    @SOLVERS.register("test_blocks", overwrite=True)
    def make_recording(spec: SolverSpec, context: SolveContext) -> CG:
        seen.append((spec.maxiter, context.blocks))
        return CG(maxiter=spec.maxiter, rtol=spec.rtol)

    op = HessianOperator(loss, params)
    _, info = implicit_gradient(op, random_like(params), mu=LAM + 10.0, solver=SolverSpec("test_blocks", maxiter=2))
    assert seen == [(2, tuple(p.numel() for p in params))] and info.solver == "cg" and info.matvecs == 2
    layerwise = SolverSpec("layerwise", maxiter=5, rtol=None)
    _, info = implicit_gradient(HessianOperator(loss, params), random_like(params), mu=LAM + 10.0, solver=layerwise)
    assert info.solver == "layerwise" and info.matvecs == 6 and math.isfinite(info.residual)


def test_every_solve_logs_its_residual(caplog: pytest.LogCaptureFixture) -> None:
    _, params, loss = conv_problem()
    with caplog.at_level(logging.DEBUG, logger="bissl.bilevel"):
        _, info = implicit_gradient(HessianOperator(loss, params), random_like(params), mu=LAM + 10.0)
    assert f"relative residual {info.residual:.3g}" in caplog.text


def test_cg_error_table(conv_dense: tuple[Tensor, Tensor]) -> None:
    """Relative error of CG vs the dense exact solve at 1, 5, 20 iterations (printed; run with -s)."""
    h, v_flat = conv_dense
    model, params, loss = conv_problem()
    v = [t.view_as(p) for t, p in zip(v_flat.split([p.numel() for p in params]), params, strict=True)]
    op = HessianOperator(loss, params, module=model)
    eig = torch.linalg.eigvalsh(h)
    print(f"\nconv net ({h.shape[0]} backbone params), H eigenvalues in [{eig[0]:.3g}, {eig[-1]:.3g}], lam={LAM}")
    errors: dict[tuple[float, int], tuple[float, SolveInfo]] = {}
    for damping in (10.0, 3.0, 1.0, 0.1, 0.01):
        exact = dense_implicit(h, v_flat, LAM + damping)
        for iters in (1, 5, 20):
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                spec = SolverSpec("cg", maxiter=iters, rtol=None)
                x, info = implicit_gradient(op, v, mu=LAM + damping, solver=spec)
            errors[damping, iters] = rel_err(flat(x), exact), info
            print(
                f"damping={damping:<5} iters={iters:<3} rel_err={errors[damping, iters][0]:.2e} "
                f"residual={info.residual:.2e} iterations={info.iterations} reason={info.reason}"
            )
    assert errors[10.0, 20][0] < 1e-4
    assert errors[10.0, 1][0] > errors[10.0, 5][0] > errors[10.0, 20][0]
