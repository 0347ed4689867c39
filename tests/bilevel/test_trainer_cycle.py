"""One Hessian operator per BiSSL cycle; the default solver settings against the dense exact solve."""

from __future__ import annotations

import pytest
import torch

from bissl.bilevel import (
    PAPER_SOLVER,
    BilevelSettings,
    BiSSLTrainer,
    HessianOperator,
    SolverSpec,
    implicit_gradient,
    proximal_mu,
)
from bissl.bilevel.hvp import preserve_buffers
from bissl.bilevel.trainer import NonFiniteStepError
from bissl.config import BilevelConfig
from bissl.utils.errors import ConfigError, NonFiniteError
from helpers.dense import dense_hessian, dense_implicit, flat, random_like, rel_err
from helpers.models import (
    CycleBatches,
    RegressViewPretext,
    TinyBackbone,
    TinyClassify,
    conv_problem,
    regression_batches,
    upper_batches,
)


class CountingPretext(RegressViewPretext):
    """Counts the lower-loss forward passes (one per Hessian operator build) and the batch sizes they see."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.sizes: list[int] = []

    def loss(self, backbone, views):
        self.sizes.append(len(views[0]))
        return super().loss(backbone, views)


def make_trainer(solver: str = "cg", make_lower_scheduler=None, make_upper_scheduler=None, **settings) -> BiSSLTrainer:
    torch.manual_seed(0)
    sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)  # noqa: E731
    trainer = BiSSLTrainer(
        backbone=TinyBackbone().double(), pretext=CountingPretext(3).double(), task=TinyClassify(),
        head=TinyClassify().build_head(3).double(),
        settings=BilevelSettings(lam=0.3, damping=20.0, solver=SolverSpec(solver, maxiter=5, rtol=None), **settings),
        make_lower_optimizer=sgd, make_upper_optimizer=sgd,
        make_lower_scheduler=make_lower_scheduler, make_upper_scheduler=make_upper_scheduler,
    )  # fmt: skip
    with torch.no_grad():
        for p in trainer.phi:
            p.add_(0.1 * torch.randn_like(p))
    return trainer


def test_one_operator_per_cycle_gives_the_results_of_rebuilding_it_every_step() -> None:
    views, _ = regression_batches()
    reused, rebuilt = make_trainer(), make_trainer()
    buffers = {k: v.clone() for k, v in reused.lower_backbone.state_dict().items()}
    reused.begin_cycle(views)
    stats = [reused.upper_step(batch) for batch in upper_batches(3)]
    reused.end_cycle()
    for batch in upper_batches(3):
        rebuilt.upper_step(batch, views)
    assert all(s["solver_hvps"] == 5 for s in stats)
    assert len(reused.pretext.sizes) == 1 and len(rebuilt.pretext.sizes) == 3  # forward + graph: once per cycle
    for a, b in zip(reused.upper_params, rebuilt.upper_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for key, value in reused.lower_backbone.state_dict().items():
        assert torch.equal(value, buffers[key]), key


def test_identity_and_mfac_run_no_hessian_forward() -> None:
    views, _ = regression_batches()
    for solver in ("identity", "mfac"):
        trainer = make_trainer(solver=solver)
        trainer.lower_step(views, total_lower_steps=2)
        calls = len(trainer.pretext.sizes)
        trainer.begin_cycle(views)
        for batch in upper_batches(2):
            assert trainer.upper_step(batch)["solver_hvps"] == 0
        assert len(trainer.pretext.sizes) == calls, solver


def test_lower_step_ends_the_cycle_and_upper_step_needs_one() -> None:
    views, _ = regression_batches()
    trainer = make_trainer()
    with pytest.raises(ValueError, match="begin_cycle"):
        trainer.upper_step(upper_batches(1)[0])
    trainer.begin_cycle(views)
    trainer.upper_step(upper_batches(1)[0])
    trainer.lower_step(views, total_lower_steps=2)
    with pytest.raises(ValueError, match="begin_cycle"):
        trainer.upper_step(upper_batches(1)[0])


def test_hessian_fraction_takes_the_first_samples_of_each_view() -> None:
    views, _ = regression_batches()
    trainer = make_trainer(hessian_fraction=0.3)
    trainer.begin_cycle(views)
    trainer.upper_step(upper_batches(1)[0])
    assert trainer.pretext.sizes == [5]  # ceil(0.3 * 16)


def test_default_solver_settings_meet_the_default_accuracy() -> None:
    """The shipped defaults (``bilevel.solver``, damping) reach relative error <= 1e-3 on the tiny conv net."""
    cfg = BilevelConfig()
    model, params, loss = conv_problem()
    with preserve_buffers(model):
        h = dense_hessian(loss, params)
    for seed in range(3):
        v = random_like(params, seed)
        op = HessianOperator(loss, params, module=model)
        x, info = implicit_gradient(op, v, mu=proximal_mu(cfg.lam, cfg.damping))  # SolverSpec() is cfg.solver
        assert rel_err(flat(x), dense_implicit(h, flat(tuple(v)), cfg.lam + cfg.damping)) <= 1e-3
        assert info.converged or cfg.solver.tol is None


def test_a_user_frozen_batchnorm_stays_frozen_through_lower_and_upper_steps() -> None:
    """The trainer never calls train()/eval(): an eval-mode BatchNorm keeps its mode and running statistics through
    lower steps and upper steps whose Hessian-vector products reuse one graph (which saved those statistics)."""
    views, _ = regression_batches()
    trainer = make_trainer()
    frozen = [trainer.lower_backbone.net[1], trainer.upper_backbone.net[1]]
    for bn in frozen:
        bn.eval()
    stats_before = [{n: b.clone() for n, b in bn.named_buffers()} for bn in frozen]
    for _ in range(2):
        trainer.lower_step(views, total_lower_steps=2)
    trainer.begin_cycle(views)
    hvps = [trainer.upper_step(batch)["solver_hvps"] for batch in upper_batches(2)]
    trainer.end_cycle()
    assert hvps == [5, 5]
    for bn, before in zip(frozen, stats_before, strict=True):
        assert not bn.training
        assert all(torch.equal(b, before[n]) for n, b in bn.named_buffers())
    modules = [trainer.lower_backbone, trainer.upper_backbone, trainer.pretext, trainer.head]
    assert all(m.training for module in modules for m in module.modules() if m not in frozen)


def test_n_upper_zero_is_a_pretext_only_control(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower steps with the proximal term towards a phi that never moves; no Hessian batch, forward or product."""
    views, _ = regression_batches()

    def no_product(self: HessianOperator, v: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a Hessian-vector product was computed")

    monkeypatch.setattr(HessianOperator, "matvec", no_product)
    trainer = make_trainer(n_lower=3, n_upper=0)
    phi = [p.detach().clone() for p in trainer.phi]
    theta = [p.detach().clone() for p in trainer.theta]

    class NoHessianBatch(CycleBatches):
        def hessian_views(self, cycle: int) -> list[torch.Tensor]:
            raise AssertionError("the Hessian batch was drawn")

    stats = trainer.run_cycle(0, NoHessianBatch([views], upper_batches(2)), total_lower_steps=3)
    assert trainer.lower_steps == 3 and trainer.upper_steps == 0 and len(trainer.pretext.sizes) == 3
    assert all(torch.equal(a, b) for a, b in zip(trainer.phi, phi, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(trainer.theta, theta, strict=True))
    assert stats["lower/proximal"] > 0 and not any(key.startswith("upper/") for key in stats)
    with pytest.raises(ConfigError, match="n_upper >= 0"):
        BilevelSettings(n_upper=-1)


def test_run_cycle_equals_the_explicit_loop() -> None:
    views, _ = regression_batches()
    looped, cycled = make_trainer(n_lower=2, n_upper=2), make_trainer(n_lower=2, n_upper=2)
    for _ in range(2):
        looped.lower_step(views, total_lower_steps=2)
    looped.begin_cycle(views)
    for batch in upper_batches(2):
        looped.upper_step(batch)
    looped.end_cycle()
    cycled.run_cycle(0, CycleBatches([views], upper_batches(2)), total_lower_steps=2)
    for a, b in zip([*looped.theta, *looped.phi], [*cycled.theta, *cycled.phi], strict=True):
        assert torch.equal(a, b)


def test_run_cycle_calls_the_hooks_after_each_step_with_its_counter_and_stats() -> None:
    views, _ = regression_batches()
    trainer, calls = make_trainer(n_lower=2, n_upper=3), []
    trainer.run_cycle(0, CycleBatches([views], upper_batches(3)), total_lower_steps=4)
    trainer.run_cycle(
        1, CycleBatches([views], upper_batches(3)), total_lower_steps=4,
        after_lower=lambda step, stats: calls.append(("lower", step, sorted(stats))),
        after_upper=lambda step, stats: calls.append(("upper", step, "loss_phi" in stats)),
    )  # fmt: skip
    lower_keys = sorted(["pretext_loss", "proximal", "grad_norm"])
    assert calls == [("lower", 3, lower_keys), ("lower", 4, lower_keys)] + [("upper", s, True) for s in (4, 5, 6)]


def test_a_non_finite_step_raises_its_level_cycle_and_step_in_the_trainers_terms() -> None:
    views, _ = regression_batches()
    nan_views = [torch.full_like(v, float("nan")) for v in views]
    (batch,) = upper_batches(1)
    nan_batch = (torch.full_like(batch[0], float("nan")), batch[1])
    trainer = make_trainer(n_lower=2, n_upper=2)
    trainer.run_cycle(0, CycleBatches([views], [batch]), total_lower_steps=4)
    with pytest.raises(NonFiniteStepError) as info:
        trainer.run_cycle(1, CycleBatches([views, nan_views], [batch]), total_lower_steps=4)
    assert (info.value.level, info.value.cycle, info.value.step) == ("lower", 1, 3)
    assert "lower-level loss became nan" in info.value.cause and "optim" not in str(info.value)
    trainer = make_trainer(n_lower=1, n_upper=2)
    with pytest.raises(NonFiniteStepError) as info:
        trainer.run_cycle(5, CycleBatches([views], [batch, nan_batch]), total_lower_steps=4)
    assert (info.value.level, info.value.cycle, info.value.step) == ("upper", 5, 1)
    assert "downstream loss at theta" in info.value.cause and "optim" not in str(info.value)
    assert isinstance(info.value, NonFiniteError)  # callers that catch NaN/inf in general still do


def test_schedulers_come_from_factories_and_round_trip_with_the_trainer() -> None:
    views, _ = regression_batches()

    def halving(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)

    def scheduled() -> BiSSLTrainer:
        return make_trainer(n_lower=2, n_upper=1, make_lower_scheduler=halving, make_upper_scheduler=halving)

    trainer = scheduled()
    trainer.run_cycle(0, CycleBatches([views], upper_batches(1)), total_lower_steps=2)
    assert trainer.lower_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert trainer.upper_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    fresh = scheduled()
    fresh.load_state_dict(trainer.state_dict())
    assert fresh.lower_scheduler.last_epoch == 2 and fresh.upper_scheduler.last_epoch == 1
    assert fresh.lower_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert make_trainer().lower_scheduler is None  # no factory: a constant learning rate


def test_settings_defaults_come_from_the_config() -> None:
    """One place holds each default: ``bissl.config``; the paper's fixed budget is an explicit spec."""
    cfg = BilevelConfig()
    assert BilevelSettings() == BilevelSettings.from_config(cfg)
    assert SolverSpec() == SolverSpec.from_config(cfg.solver)
    assert (SolverSpec().maxiter, SolverSpec().rtol) == (cfg.solver.iters, cfg.solver.tol)
    assert (PAPER_SOLVER.name, PAPER_SOLVER.maxiter, PAPER_SOLVER.rtol) == ("cg", 5, None)
