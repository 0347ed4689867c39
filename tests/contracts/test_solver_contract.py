"""The contract of every registered solver (:data:`bissl.bilevel.SOLVERS`), built from a spec as a config builds it:
``solver(matvec, b, x0) -> (x, SolveInfo)`` against a dense float64 ``torch.linalg.solve``, honest product counts,
NaN/inf refused, ``b = 0`` solved by ``x = 0`` without a product."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bissl.bilevel.solvers import SOLVERS, SolveContext, SolveInfo, SolverSpec
from bissl.utils.errors import NonFiniteError
from helpers.dense import CountedMatVec, rel_err, spd_system

N = 24


def build(name: str) -> object:
    """The solver ``name`` as ``implicit_gradient`` builds it, with a budget that lets an iterative one converge."""
    return SolverSpec(name, maxiter=60, rtol=1e-7).build(SolveContext(blocks=(N,)))


@pytest.fixture
def spd() -> tuple[Tensor, Tensor]:
    """``A = I + H/mu``, ``H``'s eigenvalues in ``[-1, 2]``, ``mu = 4`` (condition 1.75: Neumann converges too)."""
    return spd_system(torch.linspace(-1.0, 2.0, N), mu=4.0)


@pytest.mark.parametrize("name", SOLVERS.names())
def test_solver_matches_the_dense_solve_or_says_it_did_not_solve(name: str, spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    mv = CountedMatVec(a)
    x, info = build(name)(mv, b, None)  # type: ignore[operator]
    assert isinstance(info, SolveInfo) and x.shape == b.shape and x.dtype == b.dtype
    assert info.matvecs == mv.calls
    if info.reason == "no_solve":  # the identity ablation: x = b, no product
        assert torch.equal(x, b) and mv.calls == 0
        return
    assert info.converged and rel_err(x, torch.linalg.solve(a, b)) < 1e-6
    assert info.residual == pytest.approx(rel_err(a @ x, b), rel=1e-3, abs=1e-12)


@pytest.mark.parametrize("name", SOLVERS.names())
def test_solver_refuses_a_non_finite_right_hand_side(name: str, spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    b = b.clone()
    b[0] = math.inf
    with pytest.raises(NonFiniteError, match="right-hand side"):
        build(name)(CountedMatVec(a), b, None)  # type: ignore[operator]


@pytest.mark.parametrize("name", SOLVERS.names())
def test_solver_refuses_a_non_finite_product(name: str, spd: tuple[Tensor, Tensor]) -> None:
    a, b = spd
    calls = []

    def bad(x: Tensor) -> Tensor:
        calls.append(1)
        y = a @ x
        y[3] = math.nan
        return y

    try:
        build(name)(bad, b, None)  # type: ignore[operator]
    except NonFiniteError as exc:
        assert "NaN" in str(exc)
    else:
        assert not calls, "a solver that uses a NaN product must raise NonFiniteError"


@pytest.mark.parametrize("name", SOLVERS.names())
def test_solver_solves_a_zero_right_hand_side_without_a_product(name: str, spd: tuple[Tensor, Tensor]) -> None:
    a, _ = spd
    mv = CountedMatVec(a)
    x, info = build(name)(mv, torch.zeros(N, dtype=torch.float64), None)  # type: ignore[operator]
    assert not x.any() and mv.calls == info.matvecs == 0
    assert info.converged or info.reason == "no_solve"
