"""BiSSLTrainer against ground truth, with a user-defined pretext method and downstream task (the plug-in path)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bissl.bilevel.hvp import preserve_buffers
from bissl.bilevel.implicit import SolverSpec
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer
from bissl.utils.errors import ConfigError
from helpers.dense import dense_hessian, dense_implicit, flat
from helpers.models import RegressViewPretext, TinyBackbone, TinyClassify, regression_batches


def _trainer(gamma=1.0, damping=20.0, solver="exact", iters=5):
    torch.manual_seed(0)
    backbone = TinyBackbone().double()
    pretext = RegressViewPretext(3).double()
    task = TinyClassify()
    head = task.build_head(3).double()
    spec = SolverSpec(solver, maxiter=iters, rtol=None)
    settings = BilevelSettings(lam=0.3, damping=damping, gamma=gamma, solver=spec)
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    trainer = BiSSLTrainer(
        backbone=backbone, pretext=pretext, task=task, head=head, settings=settings,
        make_lower_optimizer=sgd, make_upper_optimizer=sgd,
    )  # fmt: skip
    with torch.no_grad():  # phi != theta, as after some lower steps
        for p in trainer.phi:
            p.add_(0.1 * torch.randn_like(p))
    return trainer


def _dense_expected(trainer: BiSSLTrainer, views, batch):
    """mu (H + mu I)^-1 grad_theta L_D(theta) + gamma grad_phi L_D(phi), with a dense Hessian."""
    s = trainer.settings
    backbone = trainer.lower_backbone
    with preserve_buffers(backbone):
        hessian = dense_hessian(lambda: trainer.pretext.loss(backbone, views), trainer.theta)
        v = flat(torch.autograd.grad(trainer.task.loss(backbone, trainer.head, batch), trainer.theta))
    implicit = dense_implicit(hessian.detach(), v, s.lam + s.damping)
    plain = torch.autograd.grad(trainer.task.loss(trainer.upper_backbone, trainer.head, batch), trainer.phi)
    return implicit + s.gamma * flat(plain)


@pytest.mark.parametrize(
    ("solver", "iters", "damping"),
    [("exact", 0, 0.5), ("exact", 0, 20.0), ("cg", 60, 20.0), ("recycled_cg", 60, 20.0)],  # H has eigenvalues
    # below -5: CG needs mu > 5
)
@pytest.mark.parametrize("gamma", [1.0, 0.0])
def test_hypergradient_matches_dense_solve(solver, iters, damping, gamma):
    trainer = _trainer(gamma=gamma, solver=solver, iters=iters, damping=damping)
    views, batch = regression_batches()
    expected = _dense_expected(trainer, views, batch)
    grads, stats = trainer.hypergradient(batch, views)
    got = torch.cat([g.reshape(-1) for g in grads[: len(trainer.phi)]])
    assert torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected) < 1e-6
    assert stats["solver_residual"] < 1e-6


def test_head_gradient_sums_both_terms():
    trainer = _trainer(gamma=0.5)
    views, batch = regression_batches()
    grads, _ = trainer.hypergradient(batch, views)
    head = list(trainer.head.parameters())
    g_theta = torch.autograd.grad(trainer.task.loss(trainer.lower_backbone, trainer.head, batch), head)
    g_phi = torch.autograd.grad(trainer.task.loss(trainer.upper_backbone, trainer.head, batch), head)
    for got, a, b in zip(grads[len(trainer.phi) :], g_theta, g_phi, strict=True):
        torch.testing.assert_close(got, a + 0.5 * b)


def test_upper_step_leaves_lower_buffers_and_theta_untouched():
    trainer = _trainer(solver="cg")
    views, batch = regression_batches()
    before = {k: v.clone() for k, v in trainer.lower_backbone.state_dict().items()}
    stats = trainer.upper_step(batch, views)
    for key, value in trainer.lower_backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert stats["solver_hvps"] >= 1 and trainer.upper_steps == 1


def test_lower_step_pulls_theta_towards_phi_and_state_roundtrips():
    trainer = _trainer()
    views, _ = regression_batches()
    prox_before = trainer.proximal_term().item()
    stats = trainer.lower_step(views, total_lower_steps=10)
    assert stats["proximal"] == pytest.approx(prox_before)
    clone = _trainer()
    clone.load_state_dict(trainer.state_dict())
    for a, b in zip(trainer.theta, clone.theta, strict=True):
        assert torch.equal(a, b)
    assert clone.lower_steps == 1


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_non_positive_lam_is_a_config_error(lam):
    with pytest.raises(ConfigError, match=r"bilevel.lam must be > 0"):
        BilevelSettings(lam=lam)


@pytest.mark.filterwarnings("ignore:HVP method 'func':RuntimeWarning")  # mse_loss: reverse-over-reverse fallback
def test_func_hvp_equals_double_backward_in_an_upper_step():
    """Regression: ``bilevel.solver.hvp=func`` failed in the trainer ("ZeroTensors are immutable", from the
    pretext's mse_loss under forward-over-reverse); it must give the double-backward step to 1e-6 (float64)."""
    views, batch = regression_batches()
    results = {}
    for hvp in ("double_backward", "func"):
        trainer = _trainer(solver="cg", iters=8, damping=20.0)
        trainer.settings = dataclasses.replace(trainer.settings, hvp=hvp)
        trainer.begin_cycle(views)
        grads, stats = trainer.hypergradient(batch)
        trainer.upper_step(batch)
        trainer.end_cycle()
        results[hvp] = (torch.cat([g.reshape(-1) for g in grads]), torch.cat([p.reshape(-1) for p in trainer.phi]))
        assert stats["solver_hvps"] == 8
    for ref, got in zip(results["double_backward"], results["func"], strict=True):
        assert torch.linalg.vector_norm(got - ref) <= 1e-6 * torch.linalg.vector_norm(ref)
