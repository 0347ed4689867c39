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
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer, RankSync

__all__ = [
    "DEFAULT_HVP_METHOD",
    "INVERSES",
    "PAPER_SOLVER",
    "SOLVERS",
    "BiSSLTrainer",
    "BilevelSettings",
    "GradientWindow",
    "HessianOperator",
    "InverseOperator",
    "LinearOperator",
    "MFACInverse",
    "RankSync",
    "SolveContext",
    "SolveInfo",
    "Solver",
    "SolverSpec",
    "flatten",
    "implicit_gradient",
    "preserve_buffers",
    "proximal_mu",
    "unflatten",
]
