"""The rivals of BiSSL as rules of the same cycle loop: multitask training and a first-order (penalty) bilevel method.

Each is a :class:`~bissl.bilevel.BiSSLTrainer` with other lower / upper steps, so ``bissl align`` runs it with
``bilevel.rule`` set and nothing else changes (batches, schedules, checkpoints, exports).

``multitask`` (:class:`MultitaskTrainer`, ``n_upper = 0``): one backbone theta, its pretext head psi and the
downstream head omega take lower steps on ``L_P(theta, psi) + w L_D(theta, omega)``, no proximal term, no upper
level. With ``w = 0`` it is plain continued pretext training: task-adaptive pretraining (TAPT) when the pretext
data are the task's images.

``penalty`` (:class:`PenaltyTrainer`): the value-function penalty form of BiSSL's bilevel problem, as BL-JUST
(arXiv 2401.06980) solves its own; no Hessian. With the lower objective ``F(t, phi) = L_P(t, psi) + lam/2 ||t -
phi||^2`` and ``y`` its approximate minimiser (theta after the cycle's ``n_lower`` lower steps, unchanged), the upper
steps minimise over a penalised lower backbone ``z``, phi and omega::

    P(z, phi, omega) = L_D(z, omega) + gamma L_D(phi, omega) + rho [F(z, phi) - F(y, phi)]

whose gradients, with ``d/dphi F(y(phi), phi) = lam (phi - y)`` at a minimiser ``y`` (Danskin), are
(:func:`penalty_gradients`)::

    g_z     = grad L_D(z, omega) + rho (grad L_P(z, psi) + lam (z - phi))
    g_phi   = gamma grad_phi L_D(phi, omega) + rho lam (y - z)
    g_omega = grad_omega L_D(z, omega) + gamma grad_omega L_D(phi, omega)

At ``z``'s minimiser ``rho lam (y - z) -> lam (H + lam I)^-1 grad L_D(y)`` as ``rho`` grows (exactly, for a quadratic
``L_P``): BiSSL's implicit term with ``mu = lam``, from first-order gradients only. ``z`` is what fine-tuning starts
from (``backbone.pt``). ``grad L_P(z)`` is taken on the cycle's pretext batch (:meth:`~PenaltyTrainer.begin_cycle`),
as BiSSL takes its Hessian, so an upper step costs ``n_views + 2`` forward and backward passes of the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bissl.bilevel.hvp import frozen_buffers
from bissl.bilevel.mfac import INVERSES
from bissl.bilevel.trainer import BiSSLTrainer, copy_trainable
from bissl.config import BilevelConfig
from bissl.utils.errors import ConfigError
from bissl.utils.numerics import global_norm, require_finite


def penalty_gradients(
    grad_d_z: Sequence[Tensor],
    grad_p_z: Sequence[Tensor],
    grad_d_phi: Sequence[Tensor],
    z: Sequence[Tensor],
    y: Sequence[Tensor],
    phi: Sequence[Tensor],
    *,
    lam: float,
    rho: float,
    gamma: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """``(g_z, g_phi)`` of the penalty objective (module docstring) from its first-order pieces: ``grad_d_z`` =
    grad L_D at z, ``grad_p_z`` = grad L_P at z, ``grad_d_phi`` = grad L_D at phi."""
    g_z = [
        d + rho * (p + lam * (zi.detach() - f.detach())) for d, p, zi, f in zip(grad_d_z, grad_p_z, z, phi, strict=True)
    ]
    g_phi = [gamma * d + rho * lam * (yi.detach() - zi.detach()) for d, yi, zi in zip(grad_d_phi, y, z, strict=True)]
    return g_z, g_phi


def cycle_backward_passes(bilevel: BilevelConfig, n_views: int) -> int:
    """Backbone backward passes of one cycle of ``bilevel.rule`` (as :class:`~bissl.utils.compute.ComputeCounter`
    counts them), a pretext loss making ``n_views`` backbone passes; BiSSL's Hessian-vector products not included.

    BiSSL: ``N_L n_views + N_U x 2`` (L_D at theta and phi) ``+ n_views`` (the Hessian's graph, for a solver that
    takes products); multitask: ``N_L (n_views + 1)`` (``n_views`` for ``w = 0``); penalty: ``N_L n_views + N_U
    (n_views + 2)``.
    """
    b = bilevel
    downstream = 1 if b.rule == "multitask" and b.multitask_weight > 0 else 0
    lower = b.n_lower * (n_views + downstream)
    if b.rule == "penalty":
        return lower + b.n_upper * (n_views + 2)
    takes_products = b.solver.name not in ("identity", *INVERSES)
    return lower + (2 * b.n_upper + (n_views if takes_products else 0) if b.n_upper else 0)


class MultitaskTrainer(BiSSLTrainer):
    """Lower steps on ``L_P(theta, psi) + w L_D(theta, omega)`` (``settings.multitask_weight``); no upper level."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs["settings"].n_upper != 0:
            raise ConfigError("bilevel.rule=multitask has no upper level; set bilevel.n_upper=0")
        super().__init__(**kwargs)

    @property
    def lower_needs_batch(self) -> bool:  # type: ignore[override]
        return self.settings.multitask_weight > 0

    def _lower_parameters(self) -> list[nn.Parameter]:
        head = list(self.head.parameters()) if self.settings.multitask_weight > 0 else []
        return [*super()._lower_parameters(), *head]

    def _upper_parameters(self) -> list[nn.Parameter]:
        return list(self.phi)  # never stepped: phi stays where it started

    def lower_term(self, batch: Any) -> Tensor:
        """``w L_D(theta, omega)`` on ``batch`` (zero for ``w = 0``): no proximal term."""
        if not self.lower_needs_batch:
            return torch.zeros((), device=self.theta[0].device, dtype=self.theta[0].dtype)
        if batch is None:
            raise ValueError("rule multitask with multitask_weight > 0 needs a downstream batch: lower_step(batch=)")
        return self.settings.multitask_weight * self._downstream_loss(self.lower_backbone, batch)


class PenaltyTrainer(BiSSLTrainer):
    """BiSSL's lower steps for ``y`` (= theta), then first-order upper steps of ``z``, phi and omega on the
    value-function penalty (module docstring); ``penalised_backbone`` holds ``z`` and is exported."""

    def __init__(self, *, backbone: nn.Module, **kwargs: Any) -> None:
        self.penalised_backbone = copy_trainable(backbone)
        self.z = [p for p in self.penalised_backbone.parameters() if p.requires_grad]
        self._views: Sequence[Tensor] | None = None
        super().__init__(backbone=backbone, **kwargs)

    def backbones(self) -> list[nn.Module]:
        return [*super().backbones(), self.penalised_backbone]

    @property
    def exported_backbone(self) -> nn.Module:
        return self.penalised_backbone

    def _upper_parameters(self) -> list[nn.Parameter]:
        return [*super()._upper_parameters(), *self.z]

    def begin_cycle(self, hessian_views: Sequence[Tensor]) -> None:
        """Fix the cycle's pretext batch, on which every upper step takes ``grad L_P(z)``."""
        self._views = list(hessian_views)

    def end_cycle(self) -> None:
        self._views = None

    def hypergradient(
        self, batch: Any, hessian_views: Sequence[Tensor] | None = None
    ) -> tuple[list[Tensor], dict[str, float]]:
        """``[g_phi..., g_omega..., g_z...]`` (aligned with ``upper_params``) and diagnostics; psi's BatchNorm
        running statistics are left to the lower steps (batch statistics here, as in BiSSL's Hessian)."""
        views = list(hessian_views) if hessian_views is not None else self._views
        if views is None:
            raise ValueError("no open cycle: call begin_cycle(views) first, or pass hessian_views")
        s, head = self.settings, list(self.head.parameters())
        loss_z = self._downstream_loss(self.penalised_backbone, batch)
        grads_z = torch.autograd.grad(loss_z, [*self.z, *head])
        with frozen_buffers(self.pretext), self.forward_context():
            pretext_z = self.pretext.loss(self.penalised_backbone, views)
        grad_p_z = torch.autograd.grad(pretext_z, self.z, allow_unused=True, materialize_grads=True)
        loss_phi = self._downstream_loss(self.upper_backbone, batch)
        grads_phi = torch.autograd.grad(loss_phi, [*self.phi, *head])
        losses = torch.stack([loss_z.detach(), loss_phi.detach(), pretext_z.detach()]).to(self.z[0].dtype)
        self._mean([*grads_z, *grad_p_z, *grads_phi, losses])
        require_finite(losses.sum(), "penalty upper-level loss", "lower the upper-level learning rate or rho")
        n = len(self.z)
        g_z, g_phi = penalty_gradients(
            grads_z[:n], grad_p_z, grads_phi[: len(self.phi)], self.z, self.theta, self.phi,
            lam=s.lam, rho=s.penalty_rho, gamma=s.gamma,
        )  # fmt: skip
        g_omega = [a + s.gamma * b for a, b in zip(grads_z[n:], grads_phi[len(self.phi) :], strict=True)]
        gap = [t.detach() - zi.detach() for t, zi in zip(self.theta, self.z, strict=True)]
        stats = {
            "loss_theta": losses[0].item(),  # L_D at z, the backbone this rule exports
            "loss_phi": losses[1].item(),
            "pretext_loss_z": losses[2].item(),
            "penalty_gap_norm": global_norm(gap),  # ||y - z||
            "hypergrad_norm": global_norm(g_phi),
        }
        return [*g_phi, *g_omega, *g_z], stats

    def upper_step(self, batch: Any, hessian_views: Sequence[Tensor] | None = None) -> dict[str, float]:
        """One step of phi, omega and z; under data parallelism z's buffers are then made equal on every rank."""
        stats = super().upper_step(batch, hessian_views)
        self._sync_buffers(self.penalised_backbone)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "penalised_backbone": self.penalised_backbone.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.penalised_backbone.load_state_dict(state["penalised_backbone"])


#: ``bilevel.rule`` -> the trainer that runs it
RULES: dict[str, type[BiSSLTrainer]] = {"bissl": BiSSLTrainer, "multitask": MultitaskTrainer, "penalty": PenaltyTrainer}
