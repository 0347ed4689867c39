"""The bilevel machinery: Hessian-vector products, linear solvers and the implicit hypergradient."""

from bissl.bilevel.hvp import DEFAULT_HVP_METHOD, HessianOperator, flatten, preserve_buffers, unflatten
from bissl.bilevel.implicit import implicit_gradient, proximal_mu
from bissl.bilevel.mfac import GradientWindow, MFACInverse
from bissl.bilevel.solvers import SOLVERS, SolveInfo, Solver
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer, RankSync

__all__ = [
    "DEFAULT_HVP_METHOD",
    "SOLVERS",
    "BiSSLTrainer",
    "BilevelSettings",
    "GradientWindow",
    "HessianOperator",
    "MFACInverse",
    "RankSync",
    "SolveInfo",
    "Solver",
    "flatten",
    "implicit_gradient",
    "preserve_buffers",
    "proximal_mu",
    "unflatten",
]
