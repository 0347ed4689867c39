"""The implicit hypergradient of BiSSL: ``mu (H + mu I)^-1 v`` with ``mu = lam + damping``.

The lower level solves ``min_theta L_P(theta) + lam/2 ||theta - phi||^2``. At its solution
``d theta*/d phi = lam (H + lam I)^-1`` (``H`` the Hessian of ``L_P`` w.r.t. ``theta``), so an upper-level
gradient ``v = grad_theta L_D`` reaches ``phi`` as ``lam (H + lam I)^-1 v``. The damping is added to ``lam``
to regularise the solve (the paper's code uses 10), giving ``mu (H + mu I)^-1 v``, computed as the solution
``x`` of ``(I + H/mu) x = v`` by a solver from :data:`bissl.bilevel.solvers.SOLVERS`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from bissl.bilevel.hvp import DEFAULT_HVP_METHOD, HessianOperator, HVPMethod, flatten, unflatten
from bissl.bilevel.solvers import DEFAULT_RECYCLE_VECTORS, SOLVERS, RecycleSpace, SolveInfo
from bissl.utils.errors import ConfigError

logger = logging.getLogger("bissl.bilevel")


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
    lower_loss: Callable[[], Tensor] | None,
    params: Sequence[Tensor],
    vector: Sequence[Tensor],
    lam: float,
    damping: float = 0.0,
    solver: str = "cg",
    iters: int = 5,
    tol: float | None = None,
    *,
    hvp: HVPMethod = DEFAULT_HVP_METHOD,
    x0: Sequence[Tensor] | None = None,
    module: nn.Module | None = None,
    operator: HessianOperator | None = None,
    recycle_vectors: int = DEFAULT_RECYCLE_VECTORS,
) -> tuple[tuple[Tensor, ...], SolveInfo]:
    """Approximate ``mu (H + mu I)^-1 vector``, ``mu = lam + damping``, ``H`` the Hessian of ``lower_loss``.

    Args:
        lower_loss: zero-argument callable returning the scalar lower-level loss WITHOUT the proximal term, at
            the current ``params`` and on a fixed batch. ``None`` when ``operator`` is given.
        params: the tensors ``H`` is taken over (e.g. the backbone parameters; a pretext head stays fixed).
        vector: the right-hand side, shapes of ``params`` (e.g. ``grad_theta L_D``).
        lam, damping: ``mu = lam + damping``; ``lam <= 0`` or ``mu <= 0`` raise :class:`ConfigError`.
        solver: a name in ``SOLVERS`` (``cg``, ``neumann``, ``identity``, ``exact``, ``layerwise``, or yours).
        iters: the solver's ``maxiter`` (ignored by ``identity`` and ``exact``).
        tol: relative-residual target ``rtol``; ``None`` runs exactly ``iters`` iterations.
        hvp: Hessian-vector product method of the operator built here (see :mod:`bissl.bilevel.hvp`).
        x0: warm start, shapes of ``params`` (e.g. the previous solution for the same operator).
        module: module(s) ``lower_loss`` runs, e.g. ``nn.ModuleList([backbone, pretext_method])``: its
            BatchNorm running statistics and other buffers are left bit-identical by the solve (and the ``func``
            method finds ``params`` in it).
        operator: a :class:`HessianOperator` built earlier for the same ``params``, to share one first-order
            graph between several solves (e.g. the upper steps of a BiSSL cycle); then ``lower_loss``,
            ``hvp`` and ``module`` are not used. A solver with a ``recycle`` keyword (``recycled_cg``) gets the
            :class:`~bissl.bilevel.solvers.RecycleSpace` kept in ``operator.cache`` for this ``mu``, so the
            solves that share the operator share their Krylov directions (a new operator starts empty).
        recycle_vectors: how many directions that space keeps (the newest; two parameter-sized vectors each).

    Returns:
        The solution with the shapes of ``params`` (detached) and the :class:`SolveInfo`; ``info.matvecs`` is
        the number of Hessian-vector products. The operator is built only if the solver asks for a product.
    """
    mu = proximal_mu(lam, damping)
    params = tuple(params)
    if (lower_loss is None) == (operator is None):
        raise ValueError("pass exactly one of lower_loss and operator")
    if operator is not None and operator.shapes != tuple(p.shape for p in params):
        raise ValueError("operator was built for parameters of other shapes than params")
    shapes = tuple(p.shape for p in params)
    if tuple(v.shape for v in vector) != shapes:
        raise ValueError("vector must have the shapes of params, in the same order")
    solve = SOLVERS.get(solver)
    b = flatten(vector).to(params[0].dtype)
    op = operator

    def matvec(x: Tensor) -> Tensor:
        """``(I + H/mu) x``; the operator is built on the first call (never, for ``identity``)."""
        nonlocal op
        if op is None:
            op = HessianOperator(lower_loss, params, method=hvp, module=module)  # type: ignore[arg-type]
        return op.matvec(x).div_(mu).add_(x)

    accepts = inspect.signature(solve).parameters
    extra: dict[str, object] = {"blocks": tuple(p.numel() for p in params)} if "blocks" in accepts else {}
    if "recycle" in accepts:  # one space per operator and mu (stored products are of (I + H/mu))
        space = RecycleSpace(recycle_vectors)
        extra["recycle"] = space if operator is None else operator.cache.setdefault(("recycle", mu), space)
    x, info = solve(matvec, b, x0=None if x0 is None else flatten(x0).to(b.dtype), maxiter=iters, rtol=tol, **extra)
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
