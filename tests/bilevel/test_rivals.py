"""The rival rules: the penalty gradients against autograd and finite differences, and the compute of each cycle."""

from __future__ import annotations

import pytest
import torch

from bissl.bilevel import BilevelSettings, BiSSLTrainer, SolverSpec
from bissl.bilevel.rivals import MultitaskTrainer, PenaltyTrainer, cycle_backward_passes, penalty_gradients
from bissl.config import BilevelConfig
from bissl.utils.compute import ComputeCounter
from bissl.utils.errors import ConfigError
from helpers.models import (
    CycleBatches,
    RegressViewPretext,
    TinyBackbone,
    TinyClassify,
    regression_batches,
    upper_batches,
)

LAM, RHO, GAMMA = 0.3, 2.5, 0.7


def test_penalty_gradients_are_autograd_of_the_penalty_with_y_fixed() -> None:
    gen = torch.Generator().manual_seed(0)
    z, y, phi = (torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    l_d = lambda t: torch.tanh(a @ t).sum()  # noqa: E731
    l_p = lambda t: (t**4).sum() + (a @ t).square().sum()  # noqa: E731
    f = lambda t, p: l_p(t) + LAM / 2 * (t - p).square().sum()  # noqa: E731
    penalty = l_d(z) + GAMMA * l_d(phi) + RHO * (f(z, phi) - f(y.detach(), phi))
    want_z, want_phi = torch.autograd.grad(penalty, [z, phi])
    pieces = [torch.autograd.grad(fn(t), t)[0] for fn, t in ((l_d, z), (l_p, z), (l_d, phi))]
    (g_z,), (g_phi,) = penalty_gradients([pieces[0]], [pieces[1]], [pieces[2]], [z], [y], [phi],
                                          lam=LAM, rho=RHO, gamma=GAMMA)  # fmt: skip
    torch.testing.assert_close(g_z, want_z)
    torch.testing.assert_close(g_phi, want_phi)


@pytest.mark.parametrize("rho", [0.5, 4.0])
def test_penalty_hypergradient_is_the_value_function_derivative_and_bissls_implicit_term(rho: float) -> None:
    """Quadratic L_P = t'At/2, L_D = b't: with y and z at their minimisers, g_phi is d/dphi of the penalised
    value min_z P(z, phi) (finite differences) and equals lam (A + lam I)^-1 b, BiSSL's implicit term (mu = lam)."""
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a, b, phi = m @ m.T + 0.1 * torch.eye(4, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64), \
        torch.randn(4, generator=gen, dtype=torch.float64)  # fmt: skip
    shifted = a + LAM * torch.eye(4, dtype=torch.float64)
    f = lambda t, p: 0.5 * t @ a @ t + LAM / 2 * (t - p).square().sum()  # noqa: E731
    y_of = lambda p: torch.linalg.solve(shifted, LAM * p)  # noqa: E731
    z_of = lambda p: torch.linalg.solve(rho * shifted, rho * LAM * p - b)  # noqa: E731
    value = lambda p: b @ z_of(p) + rho * (f(z_of(p), p) - f(y_of(p), p))  # noqa: E731
    z, y = z_of(phi), y_of(phi)
    _, (g_phi,) = penalty_gradients([b], [a @ z], [torch.zeros(4, dtype=torch.float64)], [z], [y], [phi],
                                    lam=LAM, rho=rho, gamma=GAMMA)  # fmt: skip
    eps = 1e-6
    fd = torch.stack([(value(phi + eps * e) - value(phi - eps * e)) / (2 * eps) for e in torch.eye(4).double()])
    torch.testing.assert_close(g_phi, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_phi, LAM * torch.linalg.solve(shifted, b))


def _trainer(cls: type[BiSSLTrainer] = BiSSLTrainer, **settings) -> tuple[BiSSLTrainer, ComputeCounter]:
    torch.manual_seed(0)
    compute = ComputeCounter()
    sgd = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731
    trainer = cls(
        backbone=TinyBackbone().double(), pretext=RegressViewPretext(3).double(), task=TinyClassify(),
        head=TinyClassify().build_head(3).double(),
        settings=BilevelSettings(lam=LAM, damping=20.0, gamma=GAMMA, solver=SolverSpec("cg", maxiter=5, rtol=None),
                                 **settings),
        make_lower_optimizer=sgd, make_upper_optimizer=sgd, compute=compute,
    )  # fmt: skip
    for module in trainer.backbones():
        compute.watch(module)
    return trainer, compute


def _cycle(trainer: BiSSLTrainer, n_lower: int, n_upper: int) -> None:
    views, _ = regression_batches()
    batches = upper_batches(n_lower + n_upper)
    trainer.run_cycle(0, CycleBatches([views], batches[:n_upper]), n_lower)


def test_one_cycle_counts_its_passes_and_products() -> None:
    """BiSSL (cg, 5 products per solve): N_L lower passes + N_U x 2 downstream passes + 1 Hessian build; the penalty
    rule: N_L + N_U x 3 (L_D at z and phi, L_P at z), no product; every training forward is backpropagated once."""
    bissl, compute = _trainer(n_lower=3, n_upper=2)
    _cycle(bissl, 3, 2)
    assert compute.as_dict() == {"forward": 3 + 2 * 2 + 1, "backward": 3 + 2 * 2 + 1, "hvp": 2 * 5,
                                 "images": 16 * (3 + 1) + 12 * 2 * 2}  # fmt: skip
    assert compute.backward == cycle_backward_passes(BilevelConfig(n_lower=3, n_upper=2), n_views=1)
    penalty, compute = _trainer(PenaltyTrainer, n_lower=3, n_upper=2)
    _cycle(penalty, 3, 2)
    assert compute.as_dict() == {"forward": 3 + 2 * 3, "backward": 3 + 2 * 3, "hvp": 0, "images": 16 * 5 + 12 * 4}
    assert compute.backward == cycle_backward_passes(BilevelConfig(n_lower=3, n_upper=2, rule="penalty"), n_views=1)
    multitask, compute = _trainer(MultitaskTrainer, n_lower=3, n_upper=0)
    views, _ = regression_batches()
    for batch in upper_batches(3):
        multitask.lower_step(views, 3, batch)
    multitask_cfg = BilevelConfig(n_lower=3, n_upper=0, rule="multitask")
    assert compute.backward == cycle_backward_passes(multitask_cfg, n_views=1) == 3 * 2


def test_penalty_trainer_steps_z_phi_and_omega_along_the_penalty_gradient() -> None:
    trainer, _ = _trainer(PenaltyTrainer, n_lower=2, n_upper=1, penalty_rho=RHO)
    views, _ = regression_batches()
    (batch,) = upper_batches(1)
    trainer.lower_step(views, 2)
    grads, stats = trainer.hypergradient(batch, views)
    l_d = lambda net: TinyClassify().loss(net, trainer.head, batch)  # noqa: E731

    def f(net: torch.nn.Module, params: list[torch.Tensor]) -> torch.Tensor:
        prox = sum((t - p).square().sum() for t, p in zip(params, trainer.phi, strict=True))
        return trainer.pretext.loss(net, views) + LAM / 2 * prox

    z_net, theta_net = trainer.penalised_backbone, trainer.lower_backbone
    gap = f(z_net, trainer.z) - f(theta_net, trainer.theta)
    penalty = l_d(z_net) + GAMMA * l_d(trainer.upper_backbone) + RHO * gap
    want = torch.autograd.grad(penalty, trainer.upper_params)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w)
    assert stats["penalty_gap_norm"] > 0  # the lower step moved theta (y) away from z


def test_multitask_rule_steps_one_backbone_and_head_on_the_joint_loss() -> None:
    trainer, compute = _trainer(MultitaskTrainer, n_lower=2, n_upper=0, multitask_weight=0.5)
    views, _ = regression_batches()
    (batch,) = upper_batches(1)
    head0 = [p.detach().clone() for p in trainer.head.parameters()]
    with torch.no_grad():
        want = 0.5 * TinyClassify().loss(trainer.lower_backbone, trainer.head, batch).item()
    stats = trainer.lower_step(views, 2, batch)
    assert stats["proximal"] == pytest.approx(want)  # the lower term is w L_D, no proximal term
    assert all(not torch.equal(a, b) for a, b in zip(head0, trainer.head.parameters(), strict=True))
    assert compute.backward == 2 and compute.hvp == 0
    with pytest.raises(ConfigError, match="n_upper=0"):
        _trainer(MultitaskTrainer, n_upper=1)
    tapt, compute = _trainer(MultitaskTrainer, n_upper=0, multitask_weight=0.0)
    tapt.lower_step(views, 2)
    assert not tapt.lower_needs_batch and compute.forward == 1


def test_run_cycle_gives_the_multitask_rule_its_lower_batches() -> None:
    """The cycle draws a downstream batch for each lower step of a rule that needs one, by the lower step."""
    views, _ = regression_batches()
    batches = upper_batches(2)
    looped, _ = _trainer(MultitaskTrainer, n_lower=2, n_upper=0, multitask_weight=0.5)
    for batch in batches:
        looped.lower_step(views, 2, batch)
    cycled, _ = _trainer(MultitaskTrainer, n_lower=2, n_upper=0, multitask_weight=0.5)
    cycled.run_cycle(0, CycleBatches([views], batches), 2)
    for a, b in zip(looped.lower_params, cycled.lower_params, strict=True):
        assert torch.equal(a, b)


def test_penalty_trainer_state_holds_z() -> None:
    trainer, _ = _trainer(PenaltyTrainer, n_lower=1, n_upper=1)
    _cycle(trainer, 1, 1)
    fresh, _ = _trainer(PenaltyTrainer, n_lower=1, n_upper=1)
    fresh.load_state_dict(trainer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.z, trainer.z, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.z, fresh.theta, strict=True))  # z is its own backbone
