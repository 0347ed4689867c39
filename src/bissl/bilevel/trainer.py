"""BiSSLTrainer: alternating lower (pretext) and upper (downstream) steps of the BiSSL bilevel problem.

Lower level, ``N_L`` steps per cycle on the lower backbone theta and pretext head psi::

    min_{theta, psi}  L_P(theta, psi) + lam/2 ||theta - phi||^2           (phi detached)

Upper level, ``N_U`` steps per cycle on the upper backbone phi and downstream head omega, with one
pretext batch per cycle fixing the Hessian ``H = d^2 L_P / d theta^2`` (psi held fixed)::

    g_phi   = mu (H + mu I)^-1 grad_theta L_D(theta, omega) + gamma grad_phi L_D(phi, omega),  mu = lam + damping
    g_omega = grad_omega L_D(theta, omega) + gamma grad_omega L_D(phi, omega)

theta and the Hessian batch do not change during a cycle's upper steps, so ``H`` is one operator for all of them:
:meth:`BiSSLTrainer.begin_cycle` sets it up once (a :class:`~bissl.bilevel.hvp.HessianOperator`, built at the
first Hessian-vector product; or, for ``solver="mfac"``, the inverse of the empirical Fisher of the gradients the
lower steps recorded, :mod:`bissl.bilevel.mfac`), every :meth:`~BiSSLTrainer.upper_step` until
:meth:`~BiSSLTrainer.end_cycle` reuses it::

    for cycle in ...:
        for _ in range(n_lower): trainer.lower_step(views, total_lower_steps)
        trainer.begin_cycle(hessian_views)
        for _ in range(n_upper): trainer.upper_step(batch)
        trainer.end_cycle()

The trainer knows nothing of datasets or files: it takes prepared batches, so any backbone, any
:class:`~bissl.pretext.base.PretextMethod` and any :class:`~bissl.downstream.base.DownstreamTask` plug in.

Data parallel (one trainer per rank, each on its rows of every batch; ``bissl align`` under torchrun): pass
``sync=RankSync(mean=...)``. No module is wrapped in ``DistributedDataParallel`` (it cannot differentiate twice);
the trainer averages over ranks explicitly, so that every step equals a single process on the union of the ranks'
rows for losses that are a mean over equal-sized per-rank batches:

* lower step: the gradients of theta and psi (and the logged losses) after the backward pass; the M-FAC window
  records the averaged pretext gradient, so every rank factorises the same Fisher;
* upper step: ``grad_theta L_D`` (the right-hand side ``v``), the head gradients and ``grad_phi L_D`` before the
  solve, and every Hessian-vector product (each rank's product is that of its own loss; their mean is the product
  of the mean loss). A pretext loss that couples ranks (SimCLR with ``gather_distributed``, synchronised
  BatchNorm) must differentiate twice through its collectives: rank ``r``'s gradient of its own loss then holds
  the other ranks' terms that depend on its rows, and the mean over ranks is the gradient of the mean loss.

Every rank thus holds bit-identical ``v`` and products of bit-identical iterates, so the solver's scalars (CG's
step sizes and stopping test), its iteration count and its result are the same on every rank without further
communication; ``identity`` and ``mfac`` use only averaged vectors. Losses are checked for NaN/inf after the
averaging, so every rank raises together.

Mixed precision (``bissl align`` with ``precision=bf16`` on CUDA): pass ``forward_context``, e.g.
``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``. Only forward passes run under it: the pretext loss of
a lower step, the downstream losses at theta and phi, and the Hessian operator's forward pass (every product's
for ``hvp="func"``). Backward passes and Hessian-vector products run outside it, and autograd returns every
gradient in its parameter's dtype, so with fp32 parameters the right-hand side, every product, the solver's
iterates and scalars and the solution are fp32 (the products are cast to the parameters' dtype as well).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bissl.bilevel.hvp import (
    DEFAULT_HVP_METHOD,
    HessianOperator,
    HVPMethod,
    flatten,
    preserve_buffers,
    unflatten,
)
from bissl.bilevel.implicit import implicit_gradient, proximal_mu
from bissl.bilevel.mfac import GradientWindow, MFACInverse, block_sizes, mfac
from bissl.bilevel.solvers import DEFAULT_RECYCLE_VECTORS, SolveInfo
from bissl.downstream.base import DownstreamTask
from bissl.pretext.base import PretextMethod
from bissl.utils.errors import ConfigError
from bissl.utils.numerics import clip_gradients, global_norm, require_finite

ViewFn = Callable[[Tensor], Sequence[Tensor]]


@dataclass(frozen=True)
class RankSync:
    """How one rank's trainer combines its work with the other ranks' (module docstring; ``None``: one process).

    ``mean(tensors)`` replaces each tensor, in place, by its mean over ranks (every rank calls it with the same
    shapes in the same order), e.g. :func:`bissl.dist.all_reduce_mean_`. ``buffers(module)``, if
    given, makes ``module``'s buffers equal on every rank after each step that moved them (BatchNorm running
    statistics of layers that normalise each rank's rows alone), e.g.
    :func:`bissl.dist.broadcast_buffers`.
    """

    mean: Callable[[Sequence[Tensor]], None]
    buffers: Callable[[nn.Module], None] | None = None


@dataclass(frozen=True)
class BilevelSettings:
    """The bilevel hyper-parameters; defaults are those of the paper's public code (5 CG iterations, no tolerance).

    ``bissl align`` builds them from the ``bilevel`` config section, whose solver defaults are the measured fast
    path (``tol=5e-4`` with at most 10 iterations; ``benchmarks/README.md``).
    """

    n_lower: int = 20
    n_upper: int = 8
    lam: float = 1e-3
    damping: float = 10.0
    gamma: float = 1.0
    solver: str = "cg"
    solver_iters: int = 5
    solver_tol: float | None = None
    hvp: str | None = None  # None: the library default
    warm_start: bool = False
    hessian_fraction: float = 1.0  # H on the first ceil(fraction * B) samples of each Hessian view
    mfac_window: int = 20  # solver "mfac": the last m lower-level pretext gradients
    mfac_block_size: int | None = None  # solver "mfac": None, one block per parameter tensor
    recycle_vectors: int = DEFAULT_RECYCLE_VECTORS  # solver "recycled_cg": directions kept per cycle
    lower_grad_clip: float | None = 10.0
    upper_grad_clip: float | None = 10.0

    def __post_init__(self) -> None:
        if self.lam <= 0:
            raise ConfigError(
                f"bilevel.lam must be > 0 (got {self.lam}); the proximal weight lam defines d theta/d phi"
            )
        if self.damping < 0:
            raise ConfigError(f"bilevel.damping must be >= 0 (got {self.damping}); the paper uses 10")
        if self.n_lower < 1 or self.n_upper < 1:
            raise ConfigError(f"bilevel.n_lower and n_upper must be >= 1 (got {self.n_lower}, {self.n_upper})")
        if not 0 < self.hessian_fraction <= 1:
            raise ConfigError(f"bilevel.solver.hessian_fraction must lie in (0, 1] (got {self.hessian_fraction})")


class _DeferredHessian(HessianOperator):
    """A :class:`HessianOperator` whose build (forward + first-order graph) waits for the first product, so a
    cycle whose solver spends no product (``identity``) runs no Hessian forward pass. With ``mean`` (data
    parallel) each product is averaged over ranks: the Hessian of the mean of the ranks' losses."""

    def __init__(
        self,
        loss_fn: Callable[[], Tensor],
        params: Sequence[Tensor],
        *,
        method: HVPMethod,
        module: nn.Module,
        mean: Callable[[Sequence[Tensor]], None] | None = None,
    ) -> None:
        self._mean = mean
        super().__init__(loss_fn, params, method=method, module=module)

    def _build_double_backward(self, loss_fn: Callable[[], Tensor]) -> None:
        self._pending = (super()._build_double_backward, loss_fn)

    def _build_func(self, loss_fn: Callable[[], Tensor]) -> None:
        self._pending = (super()._build_func, loss_fn)

    def matvec(self, v: Tensor) -> Tensor:
        if self._pending is not None:
            build, loss_fn = self._pending
            self._pending = None
            build(loss_fn)
        product = super().matvec(v).to(self.dtype)  # fp32 for fp32 parameters, whatever the forward's autocast
        if self._mean is not None:
            self._mean([product])
        return product


CycleOperator = HessianOperator | MFACInverse


class BiSSLTrainer:
    """Holds theta (``lower_backbone``), phi (``upper_backbone``), psi (``pretext``) and omega (``head``).

    ``lower_optimizer`` must cover theta and psi; ``upper_optimizer`` phi and omega. Schedulers are
    optional and stepped once per step of their level. ``sync``: how ranks are combined under data parallelism
    (:class:`RankSync`); every rank must start from the same weights. ``forward_context``: a new context manager
    for each forward pass, e.g. bf16 autocast (module docstring); backward passes run outside it.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pretext: PretextMethod,
        task: DownstreamTask,
        head: nn.Module,
        settings: BilevelSettings,
        make_lower_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        make_upper_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        upper_backbone: nn.Module | None = None,
        sync: RankSync | None = None,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.settings = settings
        self.sync = sync
        self.forward_context = forward_context
        self.lower_backbone = backbone
        self.upper_backbone = upper_backbone if upper_backbone is not None else copy.deepcopy(backbone)
        self.pretext = pretext
        self._lower_modules = nn.ModuleList([backbone, pretext])
        self.task = task
        self.head = head
        self.theta = [p for p in backbone.parameters() if p.requires_grad]
        self.phi = [p for p in self.upper_backbone.parameters() if p.requires_grad]
        self.lower_params = [*self.theta, *pretext.head_parameters()]
        self.upper_params = [*self.phi, *head.parameters()]
        self.lower_optimizer = make_lower_optimizer(self.lower_params)
        self.upper_optimizer = make_upper_optimizer(self.upper_params)
        self.lower_scheduler: Any = None
        self.upper_scheduler: Any = None
        self.lower_steps = 0
        self.upper_steps = 0
        self._last_solution: tuple[Tensor, ...] | None = None
        self._cycle: CycleOperator | None = None
        self._window = GradientWindow(settings.mfac_window) if settings.solver == "mfac" else None

    # ----------------------------------------------------------------------------------- lower level
    def proximal_term(self) -> Tensor:
        """``lam/2 * sum ||theta - phi||^2`` with phi detached."""
        sq = sum(((t - p.detach()) ** 2).sum() for t, p in zip(self.theta, self.phi, strict=True))
        return 0.5 * self.settings.lam * sq

    def lower_step(self, views: Sequence[Tensor], total_lower_steps: int) -> dict[str, float]:
        """One step on ``L_P(theta, psi) + lam/2 ||theta - phi||^2``; it moves theta, so it ends an open cycle.

        With ``solver="mfac"`` the pretext gradient ``grad_theta L_P`` (the total gradient less the proximal
        term's ``lam (theta - phi)``, before clipping) is recorded in the M-FAC window.
        """
        self.end_cycle()
        self.lower_backbone.train()
        self.pretext.train()
        pretext_loss = self._pretext_loss(views)
        prox = self.proximal_term()
        self.lower_optimizer.zero_grad(set_to_none=True)
        (pretext_loss + prox).backward()
        losses = torch.stack([pretext_loss.detach(), prox.detach()])  # promoted to prox's (theta's) dtype
        self._mean([*(p.grad for p in self.lower_params if p.grad is not None), losses])
        require_finite(losses.sum(), f"lower-level loss at lower step {self.lower_steps}", "lower lower.optim.lr")
        if self._window is not None:
            lam = self.settings.lam
            self._window.push(
                [
                    (torch.zeros_like(t) if t.grad is None else t.grad) - lam * (t.detach() - p.detach())
                    for t, p in zip(self.theta, self.phi, strict=True)
                ]
            )
        grad_norm = clip_gradients(self.lower_params, self.settings.lower_grad_clip)
        self.lower_optimizer.step()
        if self.lower_scheduler is not None:
            self.lower_scheduler.step()
        self.lower_steps += 1
        self.pretext.on_step_end(self.lower_backbone, self.lower_steps, total_lower_steps)
        self._sync_buffers(self._lower_modules)
        return {"pretext_loss": losses[0].item(), "proximal": losses[1].item(), "grad_norm": grad_norm}

    def _pretext_loss(self, views: Sequence[Tensor]) -> Tensor:
        """``L_P(theta, psi)`` on ``views``, its forward pass under :attr:`forward_context`."""
        with self.forward_context():
            return self.pretext.loss(self.lower_backbone, views)

    def _downstream_loss(self, backbone: nn.Module, batch: Any) -> Tensor:
        """``L_D(backbone, omega)`` on ``batch``, its forward pass under :attr:`forward_context`."""
        with self.forward_context():
            return self.task.loss(backbone, self.head, batch)

    def _mean(self, tensors: Sequence[Tensor]) -> None:
        """Average ``tensors`` over ranks in place (nothing in a single process)."""
        if self.sync is not None:
            self.sync.mean(tensors)

    def _sync_buffers(self, module: nn.Module) -> None:
        if self.sync is not None and self.sync.buffers is not None:
            self.sync.buffers(module)

    # ----------------------------------------------------------------------------------- upper level
    def begin_cycle(self, hessian_views: Sequence[Tensor]) -> None:
        """Fix the cycle's pretext batch: the upper steps until :meth:`end_cycle` share one operator.

        The Hessian operator is built at the first Hessian-vector product (never, for a solver that needs none)
        on the first ``ceil(hessian_fraction * B)`` samples of each view; for ``mfac`` the block-wise inverse of
        the recorded gradients' Fisher is factorised here (``hessian_views`` unused). Lower-level buffers
        (BatchNorm running statistics) are not changed by either.
        """
        self._cycle = self._cycle_operator(hessian_views)

    def end_cycle(self) -> None:
        """Free the cycle's operator (its gradient graph); called by :meth:`lower_step` too."""
        self._cycle = None

    def _cycle_operator(self, hessian_views: Sequence[Tensor]) -> CycleOperator:
        s = self.settings
        if self._window is not None:
            blocks = block_sizes([p.numel() for p in self.theta], s.mfac_block_size)
            return MFACInverse(self._window.gradients(), proximal_mu(s.lam, s.damping), blocks)
        views = list(hessian_views)
        if s.hessian_fraction < 1:
            views = [v[: max(1, math.ceil(s.hessian_fraction * v.shape[0]))] for v in views]
        return _DeferredHessian(
            lambda: self._pretext_loss(views),
            self.theta,
            method=s.hvp or DEFAULT_HVP_METHOD,  # type: ignore[arg-type]
            module=self._lower_modules,
            mean=None if self.sync is None else self.sync.mean,
        )

    def solve_implicit(
        self, v_theta: Sequence[Tensor], operator: CycleOperator
    ) -> tuple[tuple[Tensor, ...], SolveInfo]:
        """``mu (H + mu I)^-1 v_theta`` by the configured solver (``mu (F + mu I)^-1 v_theta`` for ``mfac``).

        The one place the implicit term is computed: a subclass may override it (``benchmarks/`` does, to time
        other implementations inside the same cycle).
        """
        s = self.settings
        if isinstance(operator, MFACInverse):
            x, info = mfac(None, flatten(v_theta), inverse=operator)
            return unflatten(x, [p.shape for p in self.theta]), info
        self.lower_backbone.train()
        self.pretext.train()
        return implicit_gradient(
            None,
            self.theta,
            v_theta,
            lam=s.lam,
            damping=s.damping,
            solver=s.solver,
            iters=s.solver_iters,
            tol=s.solver_tol,
            x0=self._last_solution if s.warm_start else None,
            operator=operator,
            recycle_vectors=s.recycle_vectors,
        )

    def hypergradient(
        self, batch: Any, hessian_views: Sequence[Tensor] | None = None
    ) -> tuple[list[Tensor], dict[str, float]]:
        """The upper gradients ``[g_phi..., g_omega...]`` (aligned with ``upper_params``) and diagnostics.

        Uses the open cycle's operator (:meth:`begin_cycle`); given ``hessian_views``, an operator for this
        call only. The lower level's buffers (BatchNorm running statistics of theta and of the pretext heads)
        are left untouched: the downstream pass at theta and the Hessian-vector products use batch statistics.
        """
        s = self.settings
        if hessian_views is not None:
            operator = self._cycle_operator(hessian_views)
        elif self._cycle is not None:
            operator = self._cycle
        else:
            raise ValueError("no open cycle: call begin_cycle(hessian_views) first, or pass hessian_views")
        head_params = list(self.head.parameters())
        self.lower_backbone.train()
        with preserve_buffers(self._lower_modules):
            loss_theta = self._downstream_loss(self.lower_backbone, batch)
            grads = torch.autograd.grad(loss_theta, [*self.theta, *head_params])
        v_theta, g_head = grads[: len(self.theta)], grads[len(self.theta) :]
        # autograd returns each gradient in its parameter's dtype: the solve runs in the parameters' precision
        assert all(g.dtype == p.dtype for g, p in zip(v_theta, self.theta, strict=True))
        self.upper_backbone.train()
        loss_phi = self._downstream_loss(self.upper_backbone, batch)
        grads_phi = torch.autograd.grad(loss_phi, [*self.phi, *head_params])
        g_phi_plain, g_head_phi = grads_phi[: len(self.phi)], grads_phi[len(self.phi) :]
        losses = torch.stack([loss_theta.detach(), loss_phi.detach()]).to(v_theta[0].dtype)  # not bf16
        self._mean([*grads, *grads_phi, losses])  # before the solve: every rank solves for the same v
        require_finite(losses[0], "downstream loss at theta", "lower upper.optim.lr")
        require_finite(losses[1], "downstream loss at phi", "lower upper.optim.lr")
        with preserve_buffers(self._lower_modules):
            implicit, info = self.solve_implicit(v_theta, operator)
        if s.warm_start:
            self._last_solution = tuple(x.detach() for x in implicit)
        g_phi = [x + s.gamma * g for x, g in zip(implicit, g_phi_plain, strict=True)]
        g_omega = [a + s.gamma * b for a, b in zip(g_head, g_head_phi, strict=True)]
        stats = {
            "loss_theta": losses[0].item(),
            "loss_phi": losses[1].item(),
            "implicit_grad_norm": global_norm(implicit),
            "downstream_grad_norm": global_norm(v_theta),
            "hypergrad_norm": global_norm(g_phi),
            "solver_iters": float(info.iterations),
            "solver_hvps": float(info.matvecs),
            "solver_residual": float(info.residual),
            "solver_converged": float(info.converged),
        }
        return [*g_phi, *g_omega], stats

    def upper_step(self, batch: Any, hessian_views: Sequence[Tensor] | None = None) -> dict[str, float]:
        """One step of phi and omega along the combined hypergradient (operator: see :meth:`hypergradient`)."""
        grads, stats = self.hypergradient(batch, hessian_views)
        for param, grad in zip(self.upper_params, grads, strict=True):
            param.grad = grad.detach()
        stats["grad_norm"] = clip_gradients(self.upper_params, self.settings.upper_grad_clip)
        self.upper_optimizer.step()
        self.upper_optimizer.zero_grad(set_to_none=True)
        if self.upper_scheduler is not None:
            self.upper_scheduler.step()
        self.upper_steps += 1
        self._sync_buffers(self.upper_backbone)
        return stats

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = {
            "lower_backbone": self.lower_backbone.state_dict(),
            "upper_backbone": self.upper_backbone.state_dict(),
            "pretext": self.pretext.state_dict(),
            "head": self.head.state_dict(),
            "lower_optimizer": self.lower_optimizer.state_dict(),
            "upper_optimizer": self.upper_optimizer.state_dict(),
            "lower_steps": self.lower_steps,
            "upper_steps": self.upper_steps,
            "last_solution": list(self._last_solution) if self._last_solution is not None else None,
        }
        if self._window is not None:
            state["mfac_window"] = self._window.state_dict()
        for name in ("lower_scheduler", "upper_scheduler"):
            scheduler = getattr(self, name)
            state[name] = scheduler.state_dict() if scheduler is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lower_backbone.load_state_dict(state["lower_backbone"])
        self.upper_backbone.load_state_dict(state["upper_backbone"])
        self.pretext.load_state_dict(state["pretext"])
        self.head.load_state_dict(state["head"])
        self.lower_optimizer.load_state_dict(state["lower_optimizer"])
        self.upper_optimizer.load_state_dict(state["upper_optimizer"])
        self.lower_steps = int(state["lower_steps"])
        self.upper_steps = int(state["upper_steps"])
        solution = state["last_solution"]
        self._last_solution = tuple(solution) if solution is not None else None
        if self._window is not None and state.get("mfac_window") is not None:
            self._window.load_state_dict(state["mfac_window"])
        for name in ("lower_scheduler", "upper_scheduler"):
            scheduler = getattr(self, name)
            if scheduler is not None:
                scheduler.load_state_dict(state[name])
