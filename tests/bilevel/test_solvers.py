"""The solvers against dense float64 ``torch.linalg.solve`` on synthetic ``A = I + H/mu``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor

from bissl.bilevel.solvers import (
    CG,
    SOLVERS,
    Exact,
    Identity,
    Layerwise,
    Neumann,
    RecycledCG,
    RecycleSpace,
    SolveContext,
    SolveInfo,
    SolverSpec,
)
from bissl.utils.errors import ConfigError
from helpers.dense import CountedMatVec, rel_err, spd_system, true_residual

N = 40


@pytest.fixture
def spd() -> tuple[Tensor, Tensor]:
    """An SPD system with condition number ~5 (Hessian eigenvalues in [-3, 12], mu = 4)."""
    return spd_system(torch.linspace(-3.0, 12.0, N), mu=4.0)


def test_registry_holds_the_builtins() -> None:
    assert set(SOLVERS.names()) >= {"cg", "neumann", "identity", "exact", "layerwise", "recycled_cg"}
    with pytest.raises(ConfigError, match="unknown solver"):
        SOLVERS.get("nope")


def test_cg_matches_dense_solve(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    mv = CountedMatVec(a)
    x, info = CG(maxiter=N)(mv, b)
    assert rel_err(x, torch.linalg.solve(a, b)) < 1e-10
    assert info.matvecs == mv.calls == info.iterations
    assert info.residual == pytest.approx(true_residual(a, x, b), abs=1e-12)


def test_cg_rtol_stops_at_the_first_iterate_that_meets_it(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    for rtol in (1e-2, 1e-4, 1e-8):
        x, info = CG(maxiter=N, rtol=rtol)(CountedMatVec(a), b)
        assert info.converged and info.reason == "converged"
        assert info.residual <= rtol
        assert true_residual(a, x, b) == pytest.approx(info.residual, rel=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, before = CG(maxiter=info.iterations - 1, rtol=rtol)(CountedMatVec(a), b)
        assert before.residual > rtol


def test_cg_atol(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    x, info = CG(maxiter=N, atol=1e-3)(CountedMatVec(a), b)
    assert info.converged and float(torch.linalg.vector_norm(b - a @ x)) <= 1e-3


def test_cg_warm_start_from_the_solution() -> None:
    a, b = spd_system(torch.linspace(-3.0, 12.0, N), mu=4.0)
    solution = torch.linalg.solve(a, b)
    mv = CountedMatVec(a)
    x, info = CG(maxiter=10, rtol=1e-8)(mv, b, solution)
    assert info.iterations == 0 and info.matvecs == mv.calls == 1 and info.converged
    assert torch.equal(x, solution) and x is not solution
    _, near = CG(maxiter=10, rtol=1e-6)(CountedMatVec(a), b, solution + 1e-7 * torch.randn(N, dtype=torch.float64))
    assert near.iterations <= 1 and near.converged


def test_cg_negative_curvature_warns_and_returns_last_iterate() -> None:
    a, b = spd_system(torch.linspace(-3.0, 12.0, N), mu=0.5)  # I + H/mu indefinite
    mv = CountedMatVec(a)
    with pytest.warns(RuntimeWarning, match="damping"):
        x, info = CG(maxiter=N)(mv, b)
    assert info.reason == "negative_curvature" and not info.converged
    assert torch.isfinite(x).all() and x.abs().sum() > 0
    assert info.residual == pytest.approx(true_residual(a, x, b), rel=1e-8)


def test_cg_negative_curvature_at_the_first_step_returns_b_not_zeros() -> None:
    eig = torch.linspace(-3.0, 12.0, N)
    a, _ = spd_system(eig, mu=0.5)
    evals, evecs = torch.linalg.eigh(a)
    b = evecs[:, 0]  # direction of negative curvature: p.Ap < 0 at the first step
    assert evals[0] < 0
    with pytest.warns(RuntimeWarning, match="raise damping"):
        x, info = CG(maxiter=5)(CountedMatVec(a), b)
    assert torch.equal(x, b) and info.iterations == 0 and info.matvecs == 1
    assert info.residual == pytest.approx(true_residual(a, x, b), rel=1e-10)


def test_cg_warns_when_maxiter_misses_rtol_and_not_without_target(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    with pytest.warns(RuntimeWarning, match="missed the target"):
        _, info = CG(maxiter=2, rtol=1e-10)(CountedMatVec(a), b)
    assert info.reason == "maxiter" and not info.converged and info.iterations == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = CG(maxiter=2)(CountedMatVec(a), b)
    assert info.reason == "maxiter" and info.matvecs == 2


@pytest.mark.parametrize("name", ["cg", "neumann", "layerwise", "recycled_cg"])
def test_zero_iterations_is_refused_when_built(name: str) -> None:
    with pytest.raises(ConfigError, match="identity"):
        SolverSpec(name, maxiter=0).build(SolveContext(blocks=(N,)))


def test_negative_rtol_is_refused(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    with pytest.raises(ConfigError, match="rtol"):
        CG(maxiter=3, rtol=-1.0)(CountedMatVec(a), b)


def test_neumann_matches_where_it_converges() -> None:
    a, b = spd_system(torch.linspace(-2.0, 2.0, N), mu=4.0)  # ||H/mu|| = 0.5
    x, info = Neumann(maxiter=200, rtol=1e-12)(CountedMatVec(a), b)
    assert info.converged and rel_err(x, torch.linalg.solve(a, b)) < 1e-10
    assert info.iterations <= 45  # rate 0.5 per product
    assert info.residual == pytest.approx(true_residual(a, x, b), rel=1e-6)


def test_neumann_is_the_truncated_series() -> None:
    a, b = spd_system(torch.linspace(-2.0, 2.0, N), mu=4.0)
    x, info = Neumann(maxiter=4)(CountedMatVec(a), b)
    m = torch.eye(N, dtype=torch.float64) - a
    series = sum(torch.linalg.matrix_power(m, j) @ b for j in range(4))
    assert torch.allclose(x, series, atol=1e-12) and info.matvecs == 4


def test_neumann_diverging_warns_and_keeps_the_best_iterate() -> None:
    a, b = spd_system(torch.linspace(-3.0, 12.0, N), mu=4.0)  # ||H/mu|| = 3
    with pytest.warns(RuntimeWarning, match="diverges"):
        x, info = Neumann(maxiter=20)(CountedMatVec(a), b)
    assert info.reason == "diverging" and torch.isfinite(x).all() and x.abs().sum() > 0
    assert info.residual == pytest.approx(true_residual(a, x, b), rel=1e-8)


def test_identity_uses_no_products(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    mv = CountedMatVec(a)
    x, info = Identity()(mv, b)
    assert torch.equal(x, b) and mv.calls == 0 and info.matvecs == 0 and math.isnan(info.residual)


def test_exact_matches_and_refuses_large_systems(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    mv = CountedMatVec(a)
    x, info = Exact()(mv, b.float())
    assert x.dtype == torch.float32 and rel_err(x, torch.linalg.solve(a, b)) < 1e-5
    assert info.matvecs == mv.calls == N and info.converged and info.residual < 1e-6
    with pytest.raises(ConfigError, match="cg"):
        Exact(max_size=N - 1)(mv, b)


def test_layerwise_single_block_is_cg(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    x_cg, _ = CG(maxiter=5)(CountedMatVec(a), b)
    x_lw, info = Layerwise(blocks=(N,), maxiter=5)(CountedMatVec(a), b)
    assert torch.allclose(x_lw, x_cg, rtol=1e-9, atol=1e-12)
    assert info.matvecs == 6  # 5 iterations + 1 for the true residual


def test_layerwise_is_exact_without_coupling_and_worse_with_it() -> None:
    blocks = (10, 10, 20)
    gen = torch.Generator().manual_seed(1)
    eig = torch.linspace(-3.0, 12.0, N)
    diag_blocks = []
    start = 0
    for size in blocks:
        q, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
        diag_blocks.append(q @ torch.diag(eig[start : start + size].double()) @ q.T)
        start += size
    a_uncoupled = torch.eye(N, dtype=torch.float64) + torch.block_diag(*diag_blocks) / 4.0
    b = torch.randn(N, generator=gen, dtype=torch.float64)
    x, info = Layerwise(blocks=blocks, maxiter=15)(CountedMatVec(a_uncoupled), b)
    assert rel_err(x, torch.linalg.solve(a_uncoupled, b)) < 1e-6 and info.residual < 1e-6

    a, b = spd_system(eig, mu=4.0, seed=2)
    x_lw, info_lw = Layerwise(blocks=blocks, maxiter=5)(CountedMatVec(a), b)
    _, info_cg = CG(maxiter=5)(CountedMatVec(a), b)
    assert info_lw.residual == pytest.approx(true_residual(a, x_lw, b), rel=1e-10)  # the TRUE residual
    assert info_lw.residual > 2 * info_cg.residual


def test_layerwise_rejects_wrong_blocks(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    with pytest.raises(ValueError, match="blocks"):
        Layerwise(blocks=(N - 1,), maxiter=3)(CountedMatVec(a), b)


def test_cg_low_precision_vectors_keep_float64_scalars(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    x, info = CG(maxiter=N, rtol=1e-2)(CountedMatVec(a), b.to(torch.bfloat16))
    assert x.dtype == torch.bfloat16 and info.converged
    assert rel_err(x, torch.linalg.solve(a, b)) < 5e-2


def test_solve_info_is_a_frozen_record() -> None:
    info = SolveInfo("cg", 1, 1, 0.5, False, "maxiter")
    with pytest.raises(AttributeError):
        info.iterations = 2  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- recycled CG
def outlier_system(seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """``A = I + H/mu`` with a bulk of small eigenvalues and a few outliers, and 8 unrelated right-hand sides."""
    gen = torch.Generator().manual_seed(seed)
    eig = torch.cat([torch.linspace(-0.5, 0.5, N - 6), torch.tensor([-3.0, -2.0, 4.0, 6.0, 8.0, 9.0])])
    a, _ = spd_system(eig, mu=10.0, seed=seed)
    return a, [torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(8)]


def test_recycled_cg_without_a_space_is_cg(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    for rtol in (None, 1e-2):
        x_cg, i_cg = CG(maxiter=12, rtol=rtol)(CountedMatVec(a), b)
        x_rc, i_rc = RecycledCG(maxiter=12, rtol=rtol)(CountedMatVec(a), b)
        assert rel_err(x_rc, x_cg) < 1e-9 and i_rc.iterations == i_cg.iterations and i_rc.matvecs == i_cg.matvecs


def test_recycled_cg_matches_dense_solve_for_a_sequence_of_right_hand_sides() -> None:
    """Every solve of a sequence sharing one space converges to the dense solution, with true residuals."""
    a, rhs = outlier_system()
    space = RecycleSpace(max_vectors=12)
    for i, b in enumerate(rhs):
        mv = CountedMatVec(a)
        x, info = RecycledCG(maxiter=N, rtol=1e-10, space=space)(mv, b)
        assert info.converged and info.matvecs == mv.calls == info.iterations
        assert rel_err(x, torch.linalg.solve(a, b)) < 1e-8, i
        assert true_residual(a, x, b) == pytest.approx(info.residual, rel=1e-3, abs=1e-13)
    assert len(space) == 12 and space.count > 12


def test_recycled_cg_saves_products_on_later_solves_and_is_exact_in_the_stored_space() -> None:
    a, rhs = outlier_system()
    space = RecycleSpace(max_vectors=16)
    cold = [CG(maxiter=N, rtol=1e-6)(CountedMatVec(a), b)[1].matvecs for b in rhs]
    warm = [RecycledCG(maxiter=N, rtol=1e-6, space=space)(CountedMatVec(a), b)[1].matvecs for b in rhs]
    assert warm[0] == cold[0] and sum(warm[1:]) < sum(cold[1:])
    # a solution inside the stored directions' span is found by the Galerkin start alone: no product
    x_in = space._rows()[0].T @ torch.randn(len(space), dtype=torch.float64)
    mv = CountedMatVec(a)
    x, info = RecycledCG(maxiter=N, rtol=1e-8, space=space)(mv, a @ x_in)
    assert mv.calls == info.matvecs == 0 and info.converged and rel_err(x, x_in) < 1e-8


def test_recycle_space_keeps_the_newest_directions_and_rejects_bad_input() -> None:
    space = RecycleSpace(max_vectors=2)
    for k in range(3):
        space.add(torch.full((4,), k + 1.0), torch.full((4,), 2 * k + 2.0), 4.0 * (k + 1.0) ** 2)
    assert len(space) == 2 and space.count == 3
    w, aw, d = space._rows()  # stored at unit norm: w = 0.5, aw = 2 w, d = w.aw = 1
    assert (
        torch.allclose(w, torch.full((2, 4), 0.5))
        and torch.allclose(aw, 2 * w)
        and torch.allclose(d, torch.ones(2, dtype=torch.float64))
    )
    with pytest.raises(ValueError, match="curvature"):
        space.add(torch.ones(4), torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="4-vectors"):
        space.add(torch.ones(5), torch.ones(5), 1.0)
    with pytest.raises(ConfigError, match="max_vectors"):
        RecycleSpace(0)


def test_recycled_cg_warm_start_and_negative_curvature(spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    ref = torch.linalg.solve(a, b)
    x, info = RecycledCG(maxiter=5, rtol=1e-8, space=RecycleSpace(4))(CountedMatVec(a), b, ref)
    assert info.iterations == 0 and info.matvecs == 1 and rel_err(x, ref) < 1e-12
    indefinite, b2 = spd_system(torch.linspace(-20.0, 10.0, N), mu=4.0)
    with pytest.warns(RuntimeWarning, match="non-positive curvature"):
        x, info = RecycledCG(maxiter=N, space=RecycleSpace(4))(CountedMatVec(indefinite), b2)
    assert info.reason == "negative_curvature" and x.abs().sum() > 0
