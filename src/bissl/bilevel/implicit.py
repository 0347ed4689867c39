"""The implicit hypergradient of BiSSL: ``x = mu (H + mu I)^-1 v`` with ``mu = lam + damping``.

The lower level solves ``min_theta L_P(theta) + lam/2 ||theta - phi||^2``. At its solution
``d theta*/d phi = lam (H + lam I)^-1`` (``H`` the Hessian of ``L_P`` w.r.t. ``theta``), so an upper-level
gradient ``v = grad_theta L_D`` reaches ``phi`` as ``lam (H + lam I)^-1 v``. The damping is added to ``lam``
to regularise the solve (the paper's code uses 10), giving ``mu (H + mu I)^-1 v``.

Three swappable pieces, as in torchopt/jaxopt (operator, linear solve, settings)::

    x, info = implicit_gradient(operator, v, mu=proximal_mu(lam, damping), solver=SolverSpec("cg", maxiter=10))

``operator`` is the curvature, in one of two shapes:

- a :class:`LinearOperator` (``matvec(v) -> H v``, e.g. :class:`~bissl.bilevel.hvp.HessianOperator`): ``x`` is
  the solution of ``(I + H/mu) x = v`` by the solver of :data:`~bissl.bilevel.solvers.SOLVERS` that ``solver``
  names;
- an :class:`InverseOperator` (``inverse(v, mu) -> (mu (H + mu I)^-1 v, SolveInfo)``, e.g. M-FAC's
  :class:`~bissl.bilevel.mfac.MFACInverse`): applied directly; ``solver`` is not used.

Both are protocols: a user's curvature approximation plugs in by defining the one method.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from bissl.bilevel.hvp import flatten, unflatten
from bissl.bilevel.solvers import SolveContext, SolveInfo, SolverSpec
from bissl.utils.errors import ConfigError

logger = logging.getLogger("bissl.bilevel")


@runtime_checkable
class LinearOperator(Protocol):
    """``v -> H v`` on flat vectors. An optional ``cache: dict`` attribute keeps solver state per operator."""

    def matvec(self, v: Tensor) -> Tensor: ...


@runtime_checkable
class InverseOperator(Protocol):
    """Applies ``mu (H + mu I)^-1`` to a flat vector directly, returning the solution and its :class:`SolveInfo`."""

    def inverse(self, v: Tensor, mu: float) -> tuple[Tensor, SolveInfo]: ...


DEFAULT_SOLVER = SolverSpec()
"""The ``bilevel.solver`` config defaults."""

PAPER_SOLVER = SolverSpec(name="cg", maxiter=5, rtol=None)
"""The paper's public code: exactly 5 CG iterations, no tolerance."""


def proximal_mu(lam: float, damping: float) -> float:
    """``mu = lam + damping``, validated: ``lam > 0`` and ``mu > 0``."""
    if not lam > 0:
        raise ConfigError(
            f"lam={lam} must be > 0 (the weight of the proximal term lam/2 ||theta - phi||^2; the paper uses 0.001)"
        )
    mu = lam + damping
    if not mu > 0:
        raise ConfigError(f"mu = lam + damping = {mu} must be > 0; raise damping={damping} (the paper uses 10)")
    return mu


def implicit_gradient(
    operator: LinearOperator | InverseOperator,
    rhs: Sequence[Tensor],
    *,
    mu: float,
    solver: SolverSpec = DEFAULT_SOLVER,
    x0: Sequence[Tensor] | None = None,
) -> tuple[tuple[Tensor, ...], SolveInfo]:
    """``x = mu (H + mu I)^-1 rhs``, solved as ``(I + H/mu) x = rhs`` (or applied by an inverse operator).

    Args:
        operator: the curvature ``H`` (module docstring), e.g. ``HessianOperator(loss_fn, params, module=m)``.
        rhs: the right-hand side, e.g. ``grad_theta L_D`` (tensors of any shapes, ``H``'s size in all).
        mu: ``lam + damping`` (see :func:`proximal_mu`); must be > 0.
        solver: which solver, its budget and target (:class:`SolverSpec`); unused by an inverse operator. It is
            built for this system (:class:`~bissl.bilevel.solvers.SolveContext`): the sizes of the ``rhs`` tensors
            as ``blocks`` (``layerwise``), and as ``state`` a dict kept in ``operator.cache`` for this ``mu``, so the
            solves that share an operator share solver state (``recycled_cg``'s Krylov directions).
        x0: warm start, shapes of ``rhs`` (e.g. the previous solution).

    Returns:
        The solution with the shapes of ``rhs`` (detached) and the :class:`SolveInfo`; ``info.matvecs`` is the
        number of products with ``H``.
    """
    if not mu > 0:
        raise ConfigError(f"mu = lam + damping = {mu} must be > 0")
    shapes = tuple(t.shape for t in rhs)
    numel = getattr(operator, "numel", None)
    if numel is not None and numel != sum(s.numel() for s in shapes):
        raise ValueError(f"rhs has {sum(s.numel() for s in shapes)} entries, the operator acts on {numel}")
    b = flatten(rhs)
    if isinstance(operator, InverseOperator):
        x, info = operator.inverse(b, mu)
    else:
        x, info = _solve(operator, b, mu, solver, None if x0 is None else flatten(x0).to(b.dtype), shapes)
    logger.debug(
        "implicit solve (%s, mu=%g): %d iterations, %d HVPs, relative residual %.3g, %s",
        info.solver,
        mu,
        info.iterations,
        info.matvecs,
        info.residual,
        info.reason,
    )
    return unflatten(x, shapes), info


def _solve(
    operator: LinearOperator, b: Tensor, mu: float, spec: SolverSpec, x0: Tensor | None, shapes: Sequence
) -> tuple[Tensor, SolveInfo]:
    """``(I + H/mu) x = b`` by the solver ``spec`` names (a product is spent only when the solver asks for one)."""
    cache = getattr(operator, "cache", None)
    # one state per operator and mu: what a solver stores (recycled_cg: products with A) is valid for this A only
    state: dict[object, object] = {} if cache is None else cache.setdefault(("solver_state", mu), {})
    solve = spec.build(SolveContext(blocks=tuple(s.numel() for s in shapes), state=state))
    # A = I + H/mu = (H + mu I)/mu: the division by mu applies both the shift mu I and the prefactor mu of
    # x = mu (H + mu I)^-1 b, since (I + H/mu)^-1 = mu (H + mu I)^-1
    return solve(lambda x: operator.matvec(x).div_(mu).add_(x), b, x0)
