"""How strongly the lower backbone theta follows the upper backbone phi (docs/coupling.md).

theta and phi start at the pretrained backbone theta0. With ``d_theta = theta - theta0`` and ``d_phi = phi - theta0``
(every trainable backbone tensor, flattened into one vector):

* ``theta_shift = ||d_theta|| / ||theta0||``, ``phi_shift = ||d_phi|| / ||theta0||``: how far each level moved;
* ``cosine = <d_theta, d_phi> / (||d_theta|| ||d_phi||)``: 1 when theta moved where the downstream signal took phi,
  about 0 when the pretext steps alone moved theta;
* ``gap = ||theta - phi|| / ||theta0||``;
* ``proximal_share = lam ||theta - phi|| / ||g_L||``: the proximal gradient's norm against the lower step's gradient
  norm ``g_L`` (theta and the pretext head, before clipping; ``lower/grad_norm`` of a cycle).

One number predicts the coupling of a whole run (SGD with momentum ``m``, learning rate ``eta_t``, ``N`` lower steps):
the proximal term alone contracts ``theta - phi`` by ``1 - eta_t lam / (1 - m)`` per step, so over the run by
``exp(-kappa)`` with ``kappa = lam / (1 - m) * sum_t eta_t`` (:func:`coupling_strength`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor


class _Levels(Protocol):
    """What :meth:`CouplingMonitor.stats` reads from a :class:`~bissl.bilevel.trainer.BiSSLTrainer`."""

    theta: list[Tensor]
    phi: list[Tensor]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def coupling_stats(
    theta: Sequence[Tensor],
    phi: Sequence[Tensor],
    theta0: Sequence[Tensor],
    *,
    lam: float | None = None,
    lower_grad_norm: float | None = None,
) -> dict[str, float]:
    """The module docstring's numbers (float64); ``proximal_share`` only given ``lam`` and ``lower_grad_norm``.

    ``cosine`` is 0 while either level has not moved.
    """
    with torch.no_grad():
        d_theta = [t.detach() - t0 for t, t0 in zip(theta, theta0, strict=True)]
        d_phi = [p.detach() - t0 for p, t0 in zip(phi, theta0, strict=True)]
        gap = [t.detach() - p.detach() for t, p in zip(theta, phi, strict=True)]
        norm0 = math.sqrt(_dot(theta0, theta0))
        norm_theta, norm_phi = math.sqrt(_dot(d_theta, d_theta)), math.sqrt(_dot(d_phi, d_phi))
        norm_gap = math.sqrt(_dot(gap, gap))
        product = norm_theta * norm_phi
        stats = {
            "theta_displacement": norm_theta,
            "phi_displacement": norm_phi,
            "theta_shift": norm_theta / norm0,
            "phi_shift": norm_phi / norm0,
            "cosine": _dot(d_theta, d_phi) / product if product > 0 else 0.0,
            "gap": norm_gap / norm0,
        }
    if lam is not None and lower_grad_norm is not None and lower_grad_norm > 0:
        stats["proximal_share"] = lam * norm_gap / lower_grad_norm
    return stats


def coupling_strength(*, steps: int, lr: float, lam: float, momentum: float = 0.0, lr_scale: float = 1.0) -> float:
    """``kappa = steps * lr * lr_scale * lam / (1 - momentum)``: ``exp(-kappa)`` is what is left of ``theta - phi``
    after ``steps`` lower steps driven by the proximal term alone.

    ``lr_scale`` turns the peak ``lr`` into the mean effective step: ``(1 + min_lr_ratio) / 2`` for a cosine
    schedule; for LARS, times ``eta * ||w|| / ||g||`` (trust coefficient times the weight-to-gradient norm ratio).
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    return steps * lr * lr_scale * lam / (1 - momentum)


class CouplingMonitor:
    """Holds theta0 (a copy of the parameters given) and reports :func:`coupling_stats` of a trainer.

    Build it before the trainer moves theta (or load its :meth:`state_dict`), e.g.
    ``CouplingMonitor(trainer.theta, lam=settings.lam)`` right after building the trainer.
    """

    def __init__(self, theta0: Sequence[Tensor], *, lam: float) -> None:
        self.theta0 = [t.detach().clone() for t in theta0]
        self.lam = lam

    def stats(self, trainer: _Levels, lower_grad_norm: float | None = None) -> dict[str, float]:
        """:func:`coupling_stats` of ``trainer.theta`` and ``trainer.phi``; ``lower_grad_norm``: see there."""
        return coupling_stats(trainer.theta, trainer.phi, self.theta0, lam=self.lam, lower_grad_norm=lower_grad_norm)

    def state_dict(self) -> dict[str, Any]:
        return {"theta0": [t.clone() for t in self.theta0], "lam": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theta0 = list(state["theta0"])
        if [t.shape for t in theta0] != [t.shape for t in self.theta0]:
            raise ValueError("theta0 in the state does not match the monitored parameters' shapes")
        self.theta0 = [t.detach().clone().to(old) for t, old in zip(theta0, self.theta0, strict=True)]
        self.lam = float(state["lam"])
