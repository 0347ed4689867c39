"""Coupling diagnostics against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bissl.bilevel.coupling import CouplingMonitor, coupling_stats, coupling_strength


def _split(v: list[float]) -> list[torch.Tensor]:
    """One vector as two parameter tensors (the stats must not depend on how it is split)."""
    t = torch.tensor(v)
    return [t[:2].reshape(1, 2), t[2:]]


def test_stats_hand_computed() -> None:
    # theta0 = (3, 0, 4, 0): ||theta0|| = 5; d_theta = (1, 0, 0, 0); d_phi = (1, 1, 0, 0); theta - phi = (0, -1, 0, 0)
    theta0 = _split([3.0, 0.0, 4.0, 0.0])
    theta = _split([4.0, 0.0, 4.0, 0.0])
    phi = _split([4.0, 1.0, 4.0, 0.0])
    stats = coupling_stats(theta, phi, theta0, lam=0.5, lower_grad_norm=2.0)
    assert stats["theta_displacement"] == pytest.approx(1.0)
    assert stats["phi_displacement"] == pytest.approx(math.sqrt(2))
    assert stats["theta_shift"] == pytest.approx(1 / 5)
    assert stats["phi_shift"] == pytest.approx(math.sqrt(2) / 5)
    assert stats["cosine"] == pytest.approx(1 / math.sqrt(2))
    assert stats["gap"] == pytest.approx(1 / 5)
    assert stats["proximal_share"] == pytest.approx(0.5 * 1.0 / 2.0)


def test_orthogonal_and_unmoved() -> None:
    theta0 = _split([1.0, 0.0, 0.0, 0.0])
    stats = coupling_stats(_split([1.0, 2.0, 0.0, 0.0]), _split([1.0, 0.0, 3.0, 0.0]), theta0)
    assert stats["cosine"] == pytest.approx(0.0)
    assert stats["gap"] == pytest.approx(math.sqrt(13))
    assert "proximal_share" not in stats  # no lam / gradient norm given
    assert coupling_stats(theta0, theta0, theta0)["cosine"] == 0.0  # nothing moved: defined as 0


def test_coupling_strength() -> None:
    # the shipped digits study: 10 cycles x 20 SGD steps, lr 0.05 (cosine to 0: mean factor 1/2), m 0.9, lam 1e-3
    kappa = coupling_strength(steps=200, lr=0.05, lam=1e-3, momentum=0.9, lr_scale=0.5)
    assert kappa == pytest.approx(200 * 0.025 * 1e-3 / 0.1)
    assert coupling_strength(steps=10, lr=0.1, lam=2.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="momentum"):
        coupling_strength(steps=1, lr=1.0, lam=1.0, momentum=1.0)


def test_kappa_predicts_the_proximal_contraction() -> None:
    """Momentum SGD on lam/2 ||theta - phi||^2 alone: ||theta - phi|| shrinks by ~ exp(-kappa) for small eta lam."""
    lam, lr, m, steps = 0.1, 0.01, 0.9, 300  # kappa = 3
    theta, phi = torch.ones(3, requires_grad=True), torch.zeros(3)
    opt = torch.optim.SGD([theta], lr=lr, momentum=m)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * ((theta - phi) ** 2).sum()).backward()
        opt.step()
    kappa = coupling_strength(steps=steps, lr=lr, lam=lam, momentum=m)
    assert float(theta.detach().norm() / math.sqrt(3)) == pytest.approx(math.exp(-kappa), rel=0.3)


def test_monitor_holds_theta0_and_resumes() -> None:
    theta = [torch.nn.Parameter(torch.tensor([3.0, 4.0]))]
    phi = [torch.nn.Parameter(torch.tensor([3.0, 4.0]))]
    trainer = SimpleNamespace(theta=theta, phi=phi)
    monitor = CouplingMonitor(theta, lam=0.1)
    with torch.no_grad():
        theta[0].add_(torch.tensor([0.0, 1.0]))
        phi[0].add_(torch.tensor([0.0, 2.0]))
    stats = monitor.stats(trainer, lower_grad_norm=0.5)
    assert stats["theta_shift"] == pytest.approx(1 / 5)  # theta0 was copied, not aliased
    assert stats["cosine"] == pytest.approx(1.0)
    assert stats["proximal_share"] == pytest.approx(0.1 * 1.0 / 0.5)
    resumed = CouplingMonitor(theta, lam=1.0)  # built from the moved theta, then restored
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.stats(trainer, lower_grad_norm=0.5) == stats
    with pytest.raises(ValueError, match="shapes"):
        CouplingMonitor([torch.zeros(3)], lam=0.1).load_state_dict(monitor.state_dict())
