"""BiSSLTrainer: alternating lower (pretext) and upper (downstream) steps of the BiSSL bilevel problem.

Lower level, ``N_L`` steps per cycle on the lower backbone theta and pretext head psi::

    min_{theta, psi}  L_P(theta, psi) + lam/2 ||theta - phi||^2           (phi detached)

Upper level, ``N_U`` steps per cycle on the upper backbone phi and downstream head omega, with one
pretext batch per cycle fixing the Hessian ``H = d^2 L_P / d theta^2`` (psi held fixed)::

    g_phi   = mu (H + mu I)^-1 grad_theta L_D(theta, omega) + gamma grad_phi L_D(phi, omega),  mu = lam + damping
    g_omega = grad_omega L_D(theta, omega) + gamma grad_omega L_D(phi, omega)

theta and the Hessian batch do not change during a cycle's upper steps, so ``H`` is one operator for all of them:
:meth:`BiSSLTrainer.begin_cycle` sets up the cycle's curvature once and every :meth:`~BiSSLTrainer.upper_step` until
:meth:`~BiSSLTrainer.end_cycle` reuses it. The curvature is either a lazily built
:class:`~bissl.bilevel.hvp.HessianOperator` solved by the solver ``settings.solver`` names, or, when that name is
an entry of :data:`~bissl.bilevel.mfac.INVERSES` (``mfac``), an inverse operator built from the gradients the lower
steps recorded; both go through :func:`~bissl.bilevel.implicit_gradient` the same way::

    for cycle in ...:  # trainer.run_cycle(cycle, data, total_lower_steps, after_lower=..., after_upper=...)
        for _ in range(n_lower): trainer.lower_step(data.lower_views(step), total_lower_steps)
        trainer.begin_cycle(data.hessian_views(cycle))
        for _ in range(n_upper): trainer.upper_step(data.upper_batch(step))
        trainer.end_cycle()

:meth:`~BiSSLTrainer.run_cycle` draws every batch from a :class:`CycleData` by the counter that seeds it, calls the
caller's hooks after each step (divergence checks, logging) and turns a NaN/inf inside a step into a
:class:`NonFiniteStepError` that says the level, cycle and step, for the caller to name its own settings. With
``n_upper = 0`` (the pretext-only control) a cycle is its lower steps: phi never moves and no Hessian-vector
product is computed (:meth:`~BiSSLTrainer.run_cycle` does not even draw the Hessian batch).

Train/eval modes: the trainer never calls ``train()`` or ``eval()``; every forward pass runs in the modes the
modules are in. Put the modules in train mode before training (new modules are); a submodule you put in eval mode
(e.g. a frozen BatchNorm) stays so, normalises with its running statistics in the lower step, the downstream
passes and the Hessian, and its running statistics never change. The maths needs no particular mode: ``H`` is the
Hessian of the pretext loss as the lower steps compute it. An evaluation between steps must restore the modes it
changed. Lower-level running statistics move only in lower steps; the Hessian and the downstream pass at theta
leave them bit-identical; those of phi move in the downstream pass at phi of an upper step.

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
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bissl.bilevel.hvp import DEFAULT_HVP_METHOD, HessianOperator, preserve_buffers
from bissl.bilevel.implicit import (
    DEFAULT_SOLVER,
    InverseOperator,
    LinearOperator,
    SolverSpec,
    implicit_gradient,
    proximal_mu,
)
from bissl.bilevel.mfac import INVERSES, GradientWindow, block_sizes
from bissl.bilevel.solvers import SolveInfo
from bissl.config import BilevelConfig
from bissl.downstream.base import DownstreamTask
from bissl.pretext.base import PretextMethod
from bissl.utils.compute import ComputeCounter
from bissl.utils.errors import ConfigError, NonFiniteError
from bissl.utils.numerics import clip_gradients, global_norm, require_finite

_BILEVEL = BilevelConfig()  # the one place each bilevel default lives: bissl.config


@dataclass(frozen=True)
class RankSync:
    """How one rank's trainer combines its work with the other ranks' (module docstring; ``None``: one process).

    ``mean(tensors)`` replaces each tensor, in place, by its mean over ranks (every rank calls it with the same
    shapes in the same order), e.g. :func:`bissl.distributed.all_reduce_mean_`. ``buffers(module)``, if
    given, makes ``module``'s buffers equal on every rank after each step that moved them (BatchNorm running
    statistics of layers that normalise each rank's rows alone), e.g.
    :func:`bissl.distributed.broadcast_buffers`.
    """

    mean: Callable[[Sequence[Tensor]], None]
    buffers: Callable[[nn.Module], None] | None = None


@dataclass(frozen=True)
class BilevelSettings:
    """The bilevel hyper-parameters. Every default is that of :class:`bissl.config.BilevelConfig` (and its
    ``solver`` section, :class:`~bissl.bilevel.implicit.SolverSpec`), so the Python API and ``bissl align`` agree;
    :meth:`from_config` builds them from a config section. For the paper's fixed budget of 5 CG iterations with no
    tolerance pass ``solver=PAPER_SOLVER``. ``n_upper=0`` is the pretext-only control: lower steps with the
    proximal term towards a phi that never moves, no upper level, no Hessian work.
    """

    n_lower: int = _BILEVEL.n_lower
    n_upper: int = _BILEVEL.n_upper
    lam: float = _BILEVEL.lam
    damping: float = _BILEVEL.damping
    gamma: float = _BILEVEL.gamma
    solver: SolverSpec = DEFAULT_SOLVER
    hvp: str | None = _BILEVEL.solver.hvp  # None: the library default
    hessian_fraction: float = _BILEVEL.solver.hessian_fraction  # H on the first ceil(fraction * B) samples
    mfac_window: int = _BILEVEL.solver.mfac_window  # an inverse from INVERSES: the last m lower-level gradients
    mfac_block_size: int | None = _BILEVEL.solver.mfac_block_size  # its blocks; None: one per parameter tensor
    mfac_storage: str = _BILEVEL.solver.mfac_storage  # the window's storage: fp32 | bf16 | fp16 | cpu
    lower_grad_clip: float | None = _BILEVEL.lower_grad_clip
    upper_grad_clip: float | None = _BILEVEL.upper_grad_clip
    multitask_weight: float = _BILEVEL.multitask_weight  # rule multitask: w of L_P + w L_D (bissl.bilevel.rivals)
    penalty_rho: float = _BILEVEL.penalty_rho  # rule penalty: rho of the value-function penalty

    def __post_init__(self) -> None:
        if self.lam <= 0:
            raise ConfigError(
                f"bilevel.lam must be > 0 (got {self.lam}); the proximal weight lam defines d theta/d phi"
            )
        if self.damping < 0:
            raise ConfigError(f"bilevel.damping must be >= 0 (got {self.damping}); the paper uses 10")
        if self.n_lower < 1 or self.n_upper < 0:
            raise ConfigError(f"bilevel.n_lower must be >= 1, n_upper >= 0 (got {self.n_lower}, {self.n_upper})")
        if not 0 < self.hessian_fraction <= 1:
            raise ConfigError(f"bilevel.solver.hessian_fraction must lie in (0, 1] (got {self.hessian_fraction})")

    @classmethod
    def from_config(cls, cfg: BilevelConfig) -> BilevelSettings:
        """The settings of a ``bilevel`` config section."""
        return cls(
            n_lower=cfg.n_lower, n_upper=cfg.n_upper, lam=cfg.lam, damping=cfg.damping, gamma=cfg.gamma,
            solver=SolverSpec.from_config(cfg.solver), hvp=cfg.solver.hvp,
            hessian_fraction=cfg.solver.hessian_fraction, mfac_window=cfg.solver.mfac_window,
            mfac_block_size=cfg.solver.mfac_block_size, mfac_storage=cfg.solver.mfac_storage,
            lower_grad_clip=cfg.lower_grad_clip,
            upper_grad_clip=cfg.upper_grad_clip, multitask_weight=cfg.multitask_weight, penalty_rho=cfg.penalty_rho,
        )  # fmt: skip


CycleOperator = LinearOperator | InverseOperator
#: called after each step of a level with that level's step counter (steps taken) and the step's statistics
StepHook = Callable[[int, dict[str, float]], None]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
#: a scheduler for an optimizer, stepped once per step of its level (``None``: a constant learning rate)
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class CycleData(Protocol):
    """Where :meth:`BiSSLTrainer.run_cycle` draws its batches, each by the counter that seeds it (so a resumed run
    draws the same ones): a step's counter is its level's steps taken before it."""

    def lower_views(self, step: int) -> Sequence[Tensor]:
        """The pretext views of lower step ``step``."""
        ...

    def hessian_views(self, cycle: int) -> Sequence[Tensor]:
        """The pretext views that fix cycle ``cycle``'s Hessian (drawn only when ``n_upper > 0``)."""
        ...

    def upper_batch(self, step: int) -> Any:
        """The downstream batch of upper step ``step``."""
        ...

    def lower_batch(self, step: int) -> Any:
        """The downstream batch of lower step ``step``, drawn only for a rule whose lower objective has a
        downstream term (:attr:`BiSSLTrainer.lower_needs_batch`)."""
        ...


class NonFiniteStepError(NonFiniteError):
    """A NaN/inf inside a step of a cycle and where: ``level`` (``"lower"`` or ``"upper"``), ``cycle`` and ``step``
    (that level's steps taken before it). ``cause`` is the message of the check that raised it (the trainer's, a
    solver's, the Hessian operator's), in the library's terms; a stage maps ``level`` to its own settings."""

    def __init__(self, cause: str, level: str = "", cycle: int = -1, step: int = -1) -> None:
        self.cause, self.level, self.cycle, self.step = cause, level, cycle, step
        super().__init__(f"{cause} (cycle {cycle}, {level} step {step})")


@contextlib.contextmanager
def _located(level: str, cycle: int, step: int) -> Iterator[None]:
    """Re-raise a NaN/inf of the step inside as a :class:`NonFiniteStepError` saying where it happened."""
    try:
        yield
    except NonFiniteError as exc:
        raise NonFiniteStepError(str(exc), level, cycle, step) from exc


def copy_trainable(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose frozen parameters (``requires_grad=False``, e.g. a LoRA backbone's base) are
    the original's tensors, shared, not copied: phi then differs from theta by its trainable parameters only (its
    own LoRA adapters) and the frozen base is held once in memory. Buffers are copied."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    return copy.deepcopy(module, memo)


class BiSSLTrainer:
    """Holds theta (``lower_backbone``), phi (``upper_backbone``), psi (``pretext``) and omega (``head``).

    theta and phi are the backbones' parameters that require gradients: all of them, or, for a backbone with LoRA
    adapters on a frozen base (:mod:`bissl.models.lora`), the adapters only; then the proximal term, the Hessian
    operator and the M-FAC window cover the adapters only, and phi (by default a copy of ``backbone``,
    :func:`copy_trainable`) shares theta's frozen base tensors.

    ``make_lower_optimizer`` gets theta and psi, ``make_upper_optimizer`` phi and omega (the rivals' trainers add
    their own); ``make_lower_scheduler`` and ``make_upper_scheduler``, if given, a level's optimizer, and the
    scheduler is stepped once per step of its level. ``sync``: how ranks are combined under data parallelism
    (:class:`RankSync`); every rank must start from the same weights. ``forward_context``: a new context manager
    for each forward pass, e.g. bf16 autocast (module docstring); backward passes run outside it. ``compute``: a
    :class:`~bissl.utils.compute.ComputeCounter` to which the Hessian-vector products are added (the caller
    watches :meth:`backbones` for the forward and backward passes).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pretext: PretextMethod,
        task: DownstreamTask,
        head: nn.Module,
        settings: BilevelSettings,
        make_lower_optimizer: OptimizerFactory,
        make_upper_optimizer: OptimizerFactory,
        make_lower_scheduler: SchedulerFactory | None = None,
        make_upper_scheduler: SchedulerFactory | None = None,
        upper_backbone: nn.Module | None = None,
        sync: RankSync | None = None,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        compute: ComputeCounter | None = None,
    ) -> None:
        self.settings = settings
        self.sync = sync
        self.forward_context = forward_context
        self.lower_backbone = backbone
        self.upper_backbone = upper_backbone if upper_backbone is not None else copy_trainable(backbone)
        self.pretext = pretext
        self._lower_modules = nn.ModuleList([backbone, pretext])
        self.task = task
        self.head = head
        self.theta = [p for p in backbone.parameters() if p.requires_grad]
        self.phi = [p for p in self.upper_backbone.parameters() if p.requires_grad]
        self.compute = compute
        self.lower_params = self._lower_parameters()
        self.upper_params = self._upper_parameters()
        self.lower_optimizer = make_lower_optimizer(self.lower_params)
        self.upper_optimizer = make_upper_optimizer(self.upper_params)
        self.lower_scheduler = make_lower_scheduler(self.lower_optimizer) if make_lower_scheduler else None
        self.upper_scheduler = make_upper_scheduler(self.upper_optimizer) if make_upper_scheduler else None
        self.lower_steps = 0
        self.upper_steps = 0
        self._last_solution: tuple[Tensor, ...] | None = None
        self._cycle: CycleOperator | None = None
        self._window = (
            GradientWindow(settings.mfac_window, settings.mfac_storage) if settings.solver.name in INVERSES else None
        )

    def backbones(self) -> list[nn.Module]:
        """Every backbone the trainer runs (theta's and phi's), e.g. for a compute counter to watch."""
        return [self.lower_backbone, self.upper_backbone]

    @property
    def exported_backbone(self) -> nn.Module:
        """The backbone fine-tuning starts from: theta."""
        return self.lower_backbone

    def _lower_parameters(self) -> list[nn.Parameter]:
        """What the lower optimizer steps: theta and psi."""
        return [*self.theta, *self.pretext.head_parameters()]

    def _upper_parameters(self) -> list[nn.Parameter]:
        """What the upper optimizer steps: phi and omega (in the order :meth:`hypergradient` returns them)."""
        return [*self.phi, *self.head.parameters()]

    # ----------------------------------------------------------------------------------- lower level
    def proximal_term(self) -> Tensor:
        """``lam/2 * sum ||theta - phi||^2`` with phi detached."""
        sq = sum(((t - p.detach()) ** 2).sum() for t, p in zip(self.theta, self.phi, strict=True))
        return 0.5 * self.settings.lam * sq

    #: whether :meth:`lower_step` needs a downstream batch (``batch=``): a rule whose lower objective has a
    #: downstream term (:class:`~bissl.bilevel.rivals.MultitaskTrainer`)
    lower_needs_batch: bool = False

    def lower_term(self, batch: Any) -> Tensor:
        """The term added to ``L_P`` in a lower step: the proximal ``lam/2 ||theta - phi||^2`` (``batch`` unused)."""
        return self.proximal_term()

    def lower_step(self, views: Sequence[Tensor], total_lower_steps: int, batch: Any = None) -> dict[str, float]:
        """One step on ``L_P(theta, psi) + lam/2 ||theta - phi||^2`` (the second term: :meth:`lower_term`); it
        moves theta, so it ends an open cycle.

        With an inverse from :data:`~bissl.bilevel.mfac.INVERSES` (``mfac``) the pretext gradient ``grad_theta L_P``
        (the total gradient less the proximal term's ``lam (theta - phi)``, before clipping) is recorded in its
        gradient window.
        """
        self.end_cycle()
        pretext_loss = self._pretext_loss(views)
        prox = self.lower_term(batch)
        self.lower_optimizer.zero_grad(set_to_none=True)
        (pretext_loss + prox).backward()
        losses = torch.stack([pretext_loss.detach(), prox.detach()])  # promoted to prox's (theta's) dtype
        self._mean([*(p.grad for p in self.lower_params if p.grad is not None), losses])
        require_finite(losses.sum(), "lower-level loss", "lower the lower-level learning rate")
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
            return INVERSES.get(s.solver.name)(self._window.gradients(), blocks)
        views = list(hessian_views)
        if s.hessian_fraction < 1:
            views = [v[: max(1, math.ceil(s.hessian_fraction * v.shape[0]))] for v in views]
        return HessianOperator(
            lambda: self._pretext_loss(views),
            self.theta,
            method=s.hvp or DEFAULT_HVP_METHOD,  # type: ignore[arg-type]
            module=self._lower_modules,
            mean=None if self.sync is None else self.sync.mean,
        )

    def solve_implicit(
        self, v_theta: Sequence[Tensor], operator: CycleOperator
    ) -> tuple[tuple[Tensor, ...], SolveInfo]:
        """``mu (H + mu I)^-1 v_theta`` with the cycle's operator (:func:`~bissl.bilevel.implicit_gradient`).

        The one place the implicit term is computed: a subclass may override it (``benchmarks/`` does, to time
        other implementations inside the same cycle).
        """
        s = self.settings
        x0 = self._last_solution if s.solver.warm_start else None
        return implicit_gradient(operator, v_theta, mu=proximal_mu(s.lam, s.damping), solver=s.solver, x0=x0)

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
        with preserve_buffers(self._lower_modules):
            loss_theta = self._downstream_loss(self.lower_backbone, batch)
            grads = torch.autograd.grad(loss_theta, [*self.theta, *head_params])
        v_theta, g_head = grads[: len(self.theta)], grads[len(self.theta) :]
        # autograd returns each gradient in its parameter's dtype: the solve runs in the parameters' precision
        assert all(g.dtype == p.dtype for g, p in zip(v_theta, self.theta, strict=True))
        loss_phi = self._downstream_loss(self.upper_backbone, batch)
        grads_phi = torch.autograd.grad(loss_phi, [*self.phi, *head_params])
        g_phi_plain, g_head_phi = grads_phi[: len(self.phi)], grads_phi[len(self.phi) :]
        losses = torch.stack([loss_theta.detach(), loss_phi.detach()]).to(v_theta[0].dtype)  # not bf16
        self._mean([*grads, *grads_phi, losses])  # before the solve: every rank solves for the same v
        require_finite(losses[0], "downstream loss at theta", "lower the upper-level learning rate")
        require_finite(losses[1], "downstream loss at phi", "lower the upper-level learning rate")
        hvps_before = getattr(operator, "num_hvps", 0)
        with preserve_buffers(self._lower_modules):
            implicit, info = self.solve_implicit(v_theta, operator)
        if self.compute is not None:
            self.compute.hvp += getattr(operator, "num_hvps", 0) - hvps_before
        if s.solver.warm_start:
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

    def run_cycle(
        self,
        cycle: int,
        data: CycleData,
        total_lower_steps: int,
        *,
        after_lower: StepHook | None = None,
        after_upper: StepHook | None = None,
    ) -> dict[str, float]:
        """Cycle ``cycle``: ``n_lower`` lower steps, then (if ``n_upper > 0``) ``begin_cycle`` on its Hessian views
        and ``n_upper`` upper steps, every batch drawn from ``data``; each step is followed by its level's hook.
        Returns the cycle's mean statistics, keys prefixed ``lower/`` and ``upper/``. A NaN/inf inside a step
        raises :class:`NonFiniteStepError` (a hook's errors pass unchanged)."""
        s = self.settings
        sums: dict[str, float] = defaultdict(float)
        for _ in range(s.n_lower):
            step = self.lower_steps
            batch = data.lower_batch(step) if self.lower_needs_batch else None
            views = data.lower_views(step)
            with _located("lower", cycle, step):
                stats = self.lower_step(views, total_lower_steps, batch)
            if after_lower is not None:
                after_lower(self.lower_steps, stats)
            for key, value in stats.items():
                sums[f"lower/{key}"] += value / s.n_lower
        if s.n_upper > 0:
            views = data.hessian_views(cycle)
            with _located("upper", cycle, self.upper_steps):
                self.begin_cycle(views)  # one pretext batch fixes H
        for _ in range(s.n_upper):
            step = self.upper_steps
            batch = data.upper_batch(step)
            with _located("upper", cycle, step):
                stats = self.upper_step(batch)
            if after_upper is not None:
                after_upper(self.upper_steps, stats)
            for key, value in stats.items():
                sums[f"upper/{key}"] += value / s.n_upper
        self.end_cycle()
        return dict(sums)

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
