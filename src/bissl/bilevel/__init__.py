"""The bilevel machinery: Hessian-vector products, linear solvers, inverse operators and the implicit hypergradient.

``implicit_gradient(operator, rhs, *, mu, solver=SolverSpec(...))`` computes ``mu (H + mu I)^-1 rhs``: a
:class:`HessianOperator` (or any :class:`LinearOperator`) is solved as ``(I + H/mu) x = rhs`` by a solver of
:data:`SOLVERS`; an :class:`InverseOperator` such as :class:`MFACInverse` is applied directly.
"""

from bissl.bilevel.hvp import DEFAULT_HVP_METHOD, HessianOperator, flatten, preserve_buffers, unflatten
from bissl.bilevel.implicit import (
    PAPER_SOLVER,
    InverseOperator,
    LinearOperator,
    SolverSpec,
    implicit_gradient,
    proximal_mu,
)
from bissl.bilevel.mfac import INVERSES, GradientWindow, MFACInverse
from bissl.bilevel.solvers import SOLVERS, SolveContext, SolveInfo, Solver
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer, CycleData, NonFiniteStepError, RankSync, StepHook

__all__ = [
    "DEFAULT_HVP_METHOD",
    "INVERSES",
    "PAPER_SOLVER",
    "SOLVERS",
    "BiSSLTrainer",
    "BilevelSettings",
    "CycleData",
    "GradientWindow",
    "HessianOperator",
    "InverseOperator",
    "LinearOperator",
    "MFACInverse",
    "NonFiniteStepError",
    "RankSync",
    "SolveContext",
    "SolveInfo",
    "Solver",
    "SolverSpec",
    "StepHook",
    "flatten",
    "implicit_gradient",
    "preserve_buffers",
    "proximal_mu",
    "unflatten",
]
