"""Solvers for ``A x = b`` on flat 1-D tensors that see ``A`` only through a matrix-vector product.

In BiSSL ``A = I + H/mu`` (``H`` the lower-level Hessian, ``mu = lam + damping``), so one product is one
Hessian-vector product; see :mod:`bissl.bilevel.implicit`. The solvers know nothing of networks.

A solver is a configured callable, as in jaxopt: its settings are fixed when it is built, and a solve is::

    x, info = solver(matvec, b, x0)        # e.g. CG(maxiter=5, rtol=None)(matvec, b, None)

returning ``x`` and a :class:`SolveInfo`. Iterative solvers aim at ``||b - A x|| <= max(rtol * ||b||, atol)``;
``rtol=None`` (and ``atol=0``) means no target: they then run exactly ``maxiter`` iterations (the paper's fixed
budget) without warning. ``x0`` (or ``None``: zeros) is the initial guess.

:data:`SOLVERS` maps a config name (``bilevel.solver.name``) to a FACTORY ``make(spec, context) -> solver``:
``spec`` is the :class:`SolverSpec` (``name``, ``maxiter``, ``rtol``, ...) and ``context`` the
:class:`SolveContext` of the system, which :func:`bissl.bilevel.implicit_gradient` fills in: ``blocks`` (the sizes
of the parameter tensors in ``b``, in order; ``layerwise`` solves per block) and ``state`` (a dict that lives as
long as the operator and ``mu``, i.e. as long as ``A``; ``recycled_cg`` keeps its :class:`RecycleSpace` there so
the ``N_U`` solves of a BiSSL cycle share their Krylov directions). Register your own::

    @SOLVERS.register("my_solver")
    def make_my_solver(spec: SolverSpec, context: SolveContext) -> Solver:
        return MySolver(maxiter=spec.maxiter)  # any callable (matvec, b, x0) -> (x, SolveInfo)

Rules shared by the built-ins: vectors stay in ``b``'s dtype, scalars are accumulated in float64; NaN/inf raise
:class:`~bissl.utils.errors.NonFiniteError`; a bad setting raises :class:`~bissl.utils.errors.ConfigError` when
the solver is built; a solver that must stop before its first step (non-positive curvature, divergence) returns
``b`` (the identity approximation) rather than zeros, and warns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from bissl.config import SolverConfig
from bissl.utils.errors import BisslError, ConfigError, NonFiniteError
from bissl.utils.registry import Registry

MatVec = Callable[[Tensor], Tensor]

EXACT_MAX_SIZE = 4096
"""Largest system the ``exact`` solver materialises (``n`` products and an ``n x n`` float64 matrix)."""

_DOT_CHUNK = 1 << 22

_DEFAULTS = SolverConfig()  # the one place each solver default lives: bissl.config.SolverConfig


@dataclass(frozen=True)
class SolveInfo:
    """What one solve did.

    Attributes:
        solver: registry name of the solver.
        iterations: iterations performed (0: the initial guess was returned).
        matvecs: products with ``A`` spent (Hessian-vector products in BiSSL), warm-start residual included.
        residual: relative residual ``||b - A x|| / ||b||`` of the returned ``x`` (0 for ``b = 0``; NaN where
            it is not computed, i.e. ``identity``). Each solver's docstring says how it obtains it.
        converged: whether ``||b - A x|| <= max(rtol ||b||, atol)`` holds; with no target (``rtol=None``,
            ``atol=0``) only an exact zero residual counts, except for the direct ``exact`` solve.
        reason: why it stopped: ``converged``, ``maxiter``, ``negative_curvature``, ``diverging``, ``direct``,
            ``zero_rhs`` or ``no_solve``.
    """

    solver: str
    iterations: int
    matvecs: int
    residual: float
    converged: bool
    reason: str


class Solver(Protocol):
    """A configured solver (see the module docstring)."""

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolveInfo]: ...


@dataclass(frozen=True)
class SolverSpec:
    """How to solve ``(I + H/mu) x = v``: a :data:`SOLVERS` name, its ``maxiter`` and relative-residual target
    ``rtol`` (``None``: exactly ``maxiter`` iterations), whether the trainer warm-starts each solve from the
    previous solution, and ``recycle_vectors`` (directions a ``recycled_cg`` space keeps per operator).

    Defaults are those of :class:`bissl.config.SolverConfig` (``bissl align``'s measured fast path); the paper's
    fixed budget is :data:`bissl.bilevel.PAPER_SOLVER`.
    """

    name: str = _DEFAULTS.name
    maxiter: int = _DEFAULTS.iters
    rtol: float | None = _DEFAULTS.tol
    warm_start: bool = _DEFAULTS.warm_start
    recycle_vectors: int = _DEFAULTS.recycle_vectors

    @classmethod
    def from_config(cls, cfg: SolverConfig) -> SolverSpec:
        """The spec of a ``bilevel.solver`` config section."""
        return cls(cfg.name, cfg.iters, cfg.tol, cfg.warm_start, cfg.recycle_vectors)

    def build(self, context: SolveContext | None = None) -> Solver:
        """The solver this spec names, configured for the system ``context`` describes (the one place a registry
        factory is called)."""
        return SOLVERS.get(self.name)(self, context if context is not None else SolveContext())


@dataclass(frozen=True)
class SolveContext:
    """What a solver factory may learn about the system besides the spec: ``blocks``, the sizes of the parameter
    tensors concatenated in ``b`` (in order), and ``state``, a dict that lives as long as ``A`` for solver state
    that later solves with the same ``A`` reuse."""

    blocks: tuple[int, ...] = ()
    state: dict[object, object] = field(default_factory=dict)


SolverFactory = Callable[[SolverSpec, SolveContext], Solver]

SOLVERS: Registry[SolverFactory] = Registry("solver")


def _dot(a: Tensor, b: Tensor) -> float:
    """``a . b`` accumulated in float64, in chunks so that no full-size float64 copy is made."""
    chunks = zip(a.split(_DOT_CHUNK), b.split(_DOT_CHUNK), strict=True)
    return float(sum(torch.dot(x.double(), y.double()) for x, y in chunks))


def _rhs_norm(name: str, b: Tensor) -> float:
    if b.dim() != 1:
        raise ValueError(f"{name}: b must be a flat 1-D tensor, got shape {tuple(b.shape)}")
    norm = math.sqrt(_dot(b, b))
    if not math.isfinite(norm):
        raise NonFiniteError(f"{name}: the right-hand side contains NaN/inf; check the upper-level gradient")
    return norm


def _start(name: str, matvec: MatVec, b: Tensor, x0: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """Initial iterate, its residual ``b - A x0`` and the products spent on it."""
    if x0 is None:
        return torch.zeros_like(b), b.clone(), 0
    if x0.shape != b.shape:
        raise ValueError(f"{name}: x0 has shape {tuple(x0.shape)}, b has {tuple(b.shape)}")
    x = x0.detach().to(dtype=b.dtype, device=b.device, copy=True)
    return x, b - matvec(x), 1


def _zero_rhs(name: str, b: Tensor) -> tuple[Tensor, SolveInfo]:
    return torch.zeros_like(b), SolveInfo(name, 0, 0, 0.0, True, "zero_rhs")


def _curvature(name: str, p: Tensor, ap: Tensor, iteration: int) -> float:
    """``p . A p``, refusing NaN/inf."""
    pap = _dot(p, ap)
    if not math.isfinite(pap):
        raise NonFiniteError(
            f"{name}: A p is NaN/inf at iteration {iteration}; the lower-level loss or its curvature is non-finite "
            "(lower the learning rate, check the data)"
        )
    return pap


def _squared_norm(name: str, r: Tensor, what: str) -> float:
    """``r . r``, refusing NaN/inf (``what`` says where the residual came from and what to check)."""
    rr = _dot(r, r)
    if not math.isfinite(rr):
        raise NonFiniteError(f"{name}: {what}")
    return rr


@dataclass(frozen=True)
class _Iterative:
    """Settings shared by the iterative solvers: an iteration budget and a residual target (module docstring)."""

    maxiter: int
    rtol: float | None = None
    atol: float = 0.0
    name: ClassVar[str]

    def __post_init__(self) -> None:
        if self.maxiter < 1:
            raise ConfigError(
                f"{self.name}: maxiter={self.maxiter} must be >= 1; use solver 'identity' to skip the solve"
            )
        if (self.rtol is not None and not self.rtol >= 0) or not self.atol >= 0:
            raise ConfigError(
                f"{self.name}: rtol={self.rtol} and atol={self.atol} must be >= 0 (rtol=None: fixed iteration budget)"
            )

    @classmethod
    def from_spec(cls, spec: SolverSpec, context: SolveContext) -> Solver:
        """The registry factory: budget and target from ``spec``."""
        return cls(maxiter=spec.maxiter, rtol=spec.rtol)

    def _tolerance(self, b_norm: float) -> float:
        """The absolute residual target ``max(rtol ||b||, atol)``."""
        return max(0.0 if self.rtol is None else self.rtol * b_norm, self.atol)

    def _info(self, iterations: int, matvecs: int, residual: float, converged: bool) -> SolveInfo:
        """The record of a solve that ran to its target or its budget; warns if a target was asked for and missed."""
        if not converged and (self.rtol is not None or self.atol > 0):
            warnings.warn(
                f"{self.name}: relative residual {residual:.3g} missed the target (rtol={self.rtol}, atol={self.atol}) "
                f"after {iterations} iterations; raise the iteration budget or the damping",
                RuntimeWarning,
                stacklevel=3,
            )
        return SolveInfo(self.name, iterations, matvecs, residual, converged, "converged" if converged else "maxiter")

    def _negative_curvature(
        self, pap: float, p: Tensor, iterations: int, matvecs: int, residual: float, returned: str
    ) -> SolveInfo:
        """Warn that ``p.A p <= 0`` (naming the growth of ``mu`` that makes ``A`` positive definite) and record it."""
        growth = 1.0 - pap / _dot(p, p)
        warnings.warn(
            f"{self.name}: non-positive curvature p.Ap = {pap:.3g} at iteration {iterations + 1} (indefinite system); "
            f"raise damping so that mu = lam + damping grows more than {growth:.3g}x; returning {returned} "
            f"(relative residual {residual:.3g})",
            RuntimeWarning,
            stacklevel=3,
        )
        return SolveInfo(self.name, iterations, matvecs, residual, False, "negative_curvature")


@dataclass(frozen=True)
class CG(_Iterative):
    """Conjugate gradients over the whole vector, for symmetric positive definite ``A``.

    ``x_{k+1} = x_k + alpha_k p_k``, ``r_{k+1} = r_k - alpha_k A p_k``, ``alpha_k = r_k.r_k / p_k.A p_k``,
    ``p_{k+1} = r_{k+1} + (r_{k+1}.r_{k+1} / r_k.r_k) p_k``: one product per iteration, one step size for all
    parameters. Stops when the residual target is met or after ``maxiter`` iterations (warning if a target was
    missed). If ``p.A p <= 0`` (``A`` indefinite: for ``A = I + H/mu`` the Hessian has an eigenvalue
    ``<= -mu``) it warns, naming the factor by which ``mu`` (the damping) must grow, and returns the last
    iterate it reached (``b`` if that is the zero start). The reported residual is the recurrence residual
    ``r_k``, which is ``b - A x_k`` for the returned ``x_k`` up to rounding.
    """

    name: ClassVar[str] = "cg"

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolveInfo]:
        b_norm = _rhs_norm(self.name, b)
        if b_norm == 0:
            return _zero_rhs(self.name, b)
        tol = self._tolerance(b_norm)
        x, r, matvecs = _start(self.name, matvec, b, x0)
        rr = _squared_norm(
            self.name, r, "the initial residual b - A x0 is NaN/inf; check x0 and the matrix-vector product"
        )
        p = r.clone()
        iterations = 0
        while math.sqrt(rr) > tol and iterations < self.maxiter:
            ap = matvec(p)
            matvecs += 1
            pap = _curvature(self.name, p, ap, iterations + 1)
            if pap <= 0:
                returned = f"iterate {iterations}"
                if iterations == 0 and x0 is None:  # never return zeros: x = b, residual b - A b
                    x, r, returned = b.clone(), b - ap, "b (no solve)"
                    rr = _dot(r, r)
                return x, self._negative_curvature(pap, p, iterations, matvecs, math.sqrt(rr) / b_norm, returned)
            alpha = rr / pap
            x.add_(p, alpha=alpha)
            r.sub_(ap, alpha=alpha)
            iterations += 1
            rr, rr_old = (
                _squared_norm(self.name, r, f"the residual overflowed at iteration {iterations}; raise damping"),
                rr,
            )
            p.mul_(rr / rr_old).add_(r)
        return x, self._info(iterations, matvecs, math.sqrt(rr) / b_norm, math.sqrt(rr) <= tol)


DEFAULT_RECYCLE_VECTORS = _DEFAULTS.recycle_vectors
"""Directions a :class:`RecycleSpace` keeps by default (it stores each with its product: ``2 x 16`` vectors)."""


RECYCLE_MIN_RESIDUAL = 1e3
"""``recycled_cg`` keeps a direction only while the relative residual is above this many machine epsilons
(float32: 1.2e-4): later directions are dominated by rounding and no longer A-conjugate to the stored ones."""


class RecycleSpace:
    """Search directions ``w_i`` of earlier CG solves with one fixed symmetric positive definite ``A``, with their
    products ``A w_i`` and curvatures ``d_i = w_i.A w_i``, for :class:`RecycledCG` (deflated CG) to reuse.

    The directions of one CG solve are mutually A-conjugate, and :class:`RecycledCG` makes every new direction
    A-conjugate to the stored ones, so ``W^T A W = diag(d)`` and the A-orthogonal projections onto ``span(W)`` need
    no product: the Galerkin start ``x0 = W diag(d)^-1 W^T b`` with residual ``b - (AW) diag(d)^-1 W^T b``, and
    ``z -> z - W diag(d)^-1 (AW)^T z``. Keeps the newest ``max_vectors`` directions (a ring of two
    ``max_vectors x n`` buffers, allocated at the first :meth:`add`). Valid for one ``A`` only: make a new space
    when the operator (parameters, batch or ``mu``) changes.
    """

    def __init__(self, max_vectors: int = DEFAULT_RECYCLE_VECTORS) -> None:
        if max_vectors < 1:
            raise ConfigError(f"recycle space: max_vectors={max_vectors} must be >= 1")
        self.max_vectors = max_vectors
        self._w: Tensor | None = None
        self._aw: Tensor | None = None
        self._d = torch.zeros(max_vectors, dtype=torch.float64)
        self.count = 0  # directions added so far (the space holds the last min(count, max_vectors))

    def __len__(self) -> int:
        return min(self.count, self.max_vectors)

    def _rows(self) -> tuple[Tensor, Tensor, Tensor]:
        k = len(self)
        assert self._w is not None and self._aw is not None
        return self._w[:k], self._aw[:k], self._d[:k]

    def add(self, w: Tensor, aw: Tensor, curvature: float) -> None:
        """Store one direction ``w`` with ``A w`` and ``w.A w > 0``, scaled to unit norm (replacing the oldest when
        full)."""
        if not curvature > 0:
            raise ValueError(f"recycle space: curvature {curvature} must be > 0 (A must be positive definite)")
        if self._w is None or self._aw is None:
            self._w = torch.empty(self.max_vectors, w.numel(), dtype=w.dtype, device=w.device)
            self._aw = torch.empty_like(self._w)
        elif self._w.shape[1] != w.numel():
            raise ValueError(f"recycle space: a {w.numel()}-vector added to a space of {self._w.shape[1]}-vectors")
        slot = self.count % self.max_vectors
        scale = 1.0 / math.sqrt(_dot(w, w))  # unit directions: d_i is a Rayleigh quotient of A, bounded by its spectrum
        torch.mul(w, scale, out=self._w[slot])
        torch.mul(aw, scale, out=self._aw[slot])
        self._d[slot] = curvature * scale * scale
        self.count += 1

    def galerkin(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """``(dx, A dx)``, ``dx = W diag(d)^-1 W^T r``: the correction of ``x`` that zeroes ``W^T`` of the residual."""
        w, aw, d = self._rows()
        c = (w @ r).double().div_(d.to(r.device)).to(r.dtype)
        return w.T @ c, aw.T @ c

    def project(self, z: Tensor) -> Tensor:
        """``z - W diag(d)^-1 (AW)^T z``, A-conjugate to every stored direction (in place)."""
        w, aw, d = self._rows()
        c = (aw @ z).double().div_(d.to(z.device)).to(z.dtype)
        return z.sub_(w.T @ c)


@dataclass(frozen=True)
class RecycledCG(_Iterative):
    """Deflated CG: :class:`CG` that reuses the directions of earlier solves with the same ``A`` (``space``).

    With an empty space it is :class:`CG`. Otherwise the iterate starts with the Galerkin correction over the
    stored directions ``W`` (``x0 + W diag(d)^-1 W^T r0``, no product) and every search direction is made
    A-conjugate to ``W`` (``p -> p - W diag(d)^-1 (AW)^T p``), so each iteration minimises the A-norm error over
    ``span(W)`` plus the Krylov space built so far. One product per iteration as in CG, plus ``2 len(W)``
    vector operations. The directions of this solve are then added to the space (the newest
    ``max_vectors`` are kept). Where ``A``'s spectrum seen by the right-hand sides is a continuum rather than a few
    outliers, this saves about one product per later solve (``benchmarks/README.md``). The stopping rule, the
    reported (recurrence) residual, negative-curvature and non-convergence handling are those of :class:`CG`.
    The registry factory takes the space from ``context.state`` (one per operator and ``mu``).
    """

    space: RecycleSpace = field(default_factory=RecycleSpace)
    name: ClassVar[str] = "recycled_cg"

    @classmethod
    def from_spec(cls, spec: SolverSpec, context: SolveContext) -> Solver:
        space = context.state.setdefault("recycle", RecycleSpace(spec.recycle_vectors))
        assert isinstance(space, RecycleSpace)
        return cls(maxiter=spec.maxiter, rtol=spec.rtol, space=space)

    def _deflate_residual(self, x: Tensor, r: Tensor) -> None:
        """``x += dx``, ``r -= A dx`` for the Galerkin correction ``dx`` over the stored directions (in place)."""
        dx, adx = self.space.galerkin(r)
        x.add_(dx)
        r.sub_(adx)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolveInfo]:
        b_norm = _rhs_norm(self.name, b)
        if b_norm == 0:
            return _zero_rhs(self.name, b)
        tol = self._tolerance(b_norm)
        x, r, matvecs = _start(self.name, matvec, b, x0)
        deflated = len(self.space) > 0
        if deflated:
            self._deflate_residual(x, r)
        rr = _squared_norm(
            self.name,
            r,
            "the initial residual b - A x0 is NaN/inf; check x0, the stored directions and the matrix-vector product",
        )
        p = self.space.project(r.clone()) if deflated else r.clone()
        # directions found once the residual is near rounding level are not A-conjugate to the earlier ones: not kept
        keep_above = (RECYCLE_MIN_RESIDUAL * torch.finfo(b.dtype).eps * b_norm) ** 2
        iterations = 0
        while math.sqrt(rr) > tol and iterations < self.maxiter:
            ap = matvec(p)
            matvecs += 1
            pap = _curvature(self.name, p, ap, iterations + 1)
            if pap <= 0:
                returned = f"iterate {iterations}"
                if iterations == 0 and x0 is None and not deflated:  # never return zeros: x = b, residual b - A b
                    x, r, returned = b.clone(), b - ap, "b (no solve)"
                    rr = _dot(r, r)
                return x, self._negative_curvature(pap, p, iterations, matvecs, math.sqrt(rr) / b_norm, returned)
            if rr >= keep_above:  # kept for later solves; from here on also deflates this one
                self.space.add(p, ap, pap)
                deflated = True
            alpha = rr / pap
            x.add_(p, alpha=alpha)
            r.sub_(ap, alpha=alpha)
            if deflated:  # W^T r = 0 in exact arithmetic; restoring it keeps rounding from building up along W
                self._deflate_residual(x, r)
            iterations += 1
            rr, rr_old = (
                _squared_norm(self.name, r, f"the residual overflowed at iteration {iterations}; raise damping"),
                rr,
            )
            p.mul_(rr / rr_old).add_(r)
            if deflated:
                self.space.project(p)
        return x, self._info(iterations, matvecs, math.sqrt(rr) / b_norm, math.sqrt(rr) <= tol)


@dataclass(frozen=True)
class Neumann(_Iterative):
    """Truncated Neumann series ``A^-1 b = sum_j (I - A)^j b``, i.e. Richardson iteration with unit step.

    ``x_{k+1} = x_k + r_k``, ``r_{k+1} = r_k - A r_k``; from ``x0 = 0``, ``k`` products give
    ``x_k = sum_{j<k} (I - A)^j b``. For ``A = I + H/mu`` this is ``sum_j (-H/mu)^j b``, which converges only
    when the spectral radius of ``H/mu`` is below 1 (``||H|| < mu``), and then with rate ``||H||/mu``. For
    symmetric ``A`` the residual then shrinks every step, so a growing residual means divergence: the solver
    warns (raise the damping) and returns the previous iterate (``b`` if that is the zero start). The reported
    residual is the recurrence residual ``r_k`` of the returned ``x_k``.
    """

    name: ClassVar[str] = "neumann"

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolveInfo]:
        b_norm = _rhs_norm(self.name, b)
        if b_norm == 0:
            return _zero_rhs(self.name, b)
        tol = self._tolerance(b_norm)
        x, r, matvecs = _start(self.name, matvec, b, x0)
        rr = _dot(r, r)
        iterations = 0
        while True:
            if not math.isfinite(rr):
                raise NonFiniteError(f"neumann: the residual is NaN/inf at iteration {iterations}; raise damping")
            if math.sqrt(rr) <= tol or iterations == self.maxiter:
                return x, self._info(iterations, matvecs, math.sqrt(rr) / b_norm, math.sqrt(rr) <= tol)
            r_next = r - matvec(r)
            matvecs += 1
            rr_next = _dot(r_next, r_next)
            grew = rr_next > rr
            if grew and (iterations > 0 or x0 is not None):
                break
            x.add_(r)
            r, rr = r_next, rr_next
            iterations += 1
            if grew:  # the first step from zero already grew the residual: keep x = b rather than zeros
                break
        warnings.warn(
            "neumann: the residual grew (||H/mu|| >= 1: the series diverges); raise damping above ||H|| - lam "
            f"or use solver 'cg'; returning iterate {iterations} (relative residual {math.sqrt(rr) / b_norm:.3g})",
            RuntimeWarning,
            stacklevel=2,
        )
        return x, SolveInfo(self.name, iterations, matvecs, math.sqrt(rr) / b_norm, False, "diverging")


@dataclass(frozen=True)
class Identity:
    """No solve: ``x = b`` (``A ~ I``), zero products; the ablation that shows what a solve buys.

    The residual would cost one product, so it is not computed: ``SolveInfo.residual`` is NaN.
    """

    @classmethod
    def from_spec(cls, spec: SolverSpec, context: SolveContext) -> Solver:
        return cls()

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolveInfo]:
        _rhs_norm("identity", b)
        return b.clone(), SolveInfo("identity", 0, 0, math.nan, False, "no_solve")


@dataclass(frozen=True)
class Exact:
    """Dense direct solve, for small systems and tests: ``A`` from ``n`` products with the unit vectors, then
    ``torch.linalg.solve`` in float64. Refuses ``n > max_size``. The residual is computed explicitly from the
    dense matrix (no extra product)."""

    max_size: int = EXACT_MAX_SIZE

    @classmethod
    def from_spec(cls, spec: SolverSpec, context: SolveContext) -> Solver:
        return cls()

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolveInfo]:
        n = b.numel()
        if n > self.max_size:
            raise ConfigError(
                f"exact: the system has {n} unknowns > max_size={self.max_size} (it costs {n} products and an "
                f"{n}x{n} matrix); use solver 'cg' for models of this size"
            )
        b_norm = _rhs_norm("exact", b)
        if b_norm == 0:
            return _zero_rhs("exact", b)
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        a = torch.stack([matvec(eye[i]) for i in range(n)], dim=1).double()
        if not bool(torch.isfinite(a).all()):
            raise NonFiniteError("exact: the materialised matrix contains NaN/inf; check the matrix-vector product")
        b64 = b.double()
        try:
            x = torch.linalg.solve(a, b64)
        except torch.linalg.LinAlgError as exc:
            raise BisslError("exact: the system matrix is singular; raise damping") from exc
        residual = float(torch.linalg.vector_norm(b64 - a @ x)) / b_norm
        return x.to(b.dtype), SolveInfo("exact", 1, n, residual, True, "direct")


@dataclass(frozen=True)
class Layerwise(_Iterative):
    """The paper's public code's default "layer-wise CG", kept only for fidelity comparisons.

    NOT a convergent solver: each block (parameter tensor, sizes in ``blocks``) gets its own step sizes
    ``alpha_i = r_i.r_i / (p_i.(A p)_i + 1e-12)`` and ``beta_i``, while ``A p`` couples all blocks, so the
    per-block residual recurrence is not the residual of the iterate and the method can do worse than no solve.
    It runs exactly ``maxiter`` iterations like the original (no curvature check, no early stop), then spends
    one more product on the TRUE residual ``b - A x`` of the returned ``x``, which is what it reports. The
    registry factory takes ``blocks`` from ``context.blocks``.
    """

    blocks: tuple[int, ...] = field(kw_only=True)
    name: ClassVar[str] = "layerwise"

    @classmethod
    def from_spec(cls, spec: SolverSpec, context: SolveContext) -> Solver:
        return cls(maxiter=spec.maxiter, rtol=spec.rtol, blocks=context.blocks)

    def __call__(self, matvec: MatVec, b: Tensor, x0: Tensor | None = None) -> tuple[Tensor, SolveInfo]:
        blocks = list(self.blocks)
        if sum(blocks) != b.numel():
            raise ValueError(
                f"layerwise: blocks sum to {sum(blocks)}, b has {b.numel()} elements; pass the sizes of the parameter "
                "tensors of b, in order"
            )
        b_norm = _rhs_norm(self.name, b)
        if b_norm == 0:
            return _zero_rhs(self.name, b)
        x, r, matvecs = _start(self.name, matvec, b, x0)
        p = r.clone()
        xs, rs, ps = x.split(blocks), r.split(blocks), p.split(blocks)
        rr = [torch.dot(ri.double(), ri.double()) for ri in rs]
        for _ in range(self.maxiter):
            aps = matvec(p).split(blocks)
            matvecs += 1
            for i, (xi, ri, pi, api) in enumerate(zip(xs, rs, ps, aps, strict=True)):
                alpha = rr[i] / (torch.dot(pi.double(), api.double()) + 1e-12)
                xi.add_(pi * alpha.to(pi.dtype))
                ri.sub_(api * alpha.to(pi.dtype))
                rr_new = torch.dot(ri.double(), ri.double())
                pi.mul_((rr_new / (rr[i] + 1e-12)).to(pi.dtype)).add_(ri)
                rr[i] = rr_new
        true_r = b - matvec(x)
        matvecs += 1
        residual = math.sqrt(_dot(true_r, true_r)) / b_norm
        if not math.isfinite(residual):
            raise NonFiniteError("layerwise: the iterate or its residual is NaN/inf; raise damping")
        return x, self._info(self.maxiter, matvecs, residual, residual * b_norm <= self._tolerance(b_norm))


SOLVERS.register("cg")(CG.from_spec)
SOLVERS.register("recycled_cg")(RecycledCG.from_spec)
SOLVERS.register("neumann")(Neumann.from_spec)
SOLVERS.register("identity")(Identity.from_spec)
SOLVERS.register("exact")(Exact.from_spec)
SOLVERS.register("layerwise")(Layerwise.from_spec)
