"""M-FAC: block-wise Woodbury inverse vs dense ``mu (F + mu I)^-1 v``; the gradient window; the trainer path."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bissl.bilevel import INVERSES, SOLVERS, BilevelSettings, BiSSLTrainer, SolverSpec, implicit_gradient
from bissl.bilevel.mfac import GradientWindow, MFACInverse, block_sizes
from bissl.config import AlignConfig, build_config
from bissl.pretext.base import PretextMethod
from bissl.utils.errors import ConfigError, NonFiniteError
from helpers.dense import rel_err
from helpers.models import TinyClassify

MU = 0.7


def dense_mfac(g: Tensor, v: Tensor, mu: float, blocks: tuple[int, ...]) -> Tensor:
    """``mu (F_bd + mu I)^-1 v`` with ``F_bd`` the block diagonal of ``F = (1/n) G^T G``, by a dense solve."""
    n, d = g.shape
    fisher = g.T @ g / n
    mask = torch.block_diag(*[torch.ones(b, b, dtype=g.dtype) for b in blocks])
    return mu * torch.linalg.solve(fisher * mask + mu * torch.eye(d, dtype=g.dtype), v)


@pytest.mark.parametrize("blocks", [(30,), (5, 7, 3, 15), block_sizes([5, 7, 3, 15], 8)])
@pytest.mark.parametrize("n", [1, 6, 40])  # fewer, and more, gradients than the block sizes
def test_woodbury_matches_dense_on_random_gradients(blocks: tuple[int, ...], n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    g = 3 * torch.randn(n, 30, generator=gen, dtype=torch.float64)
    v = torch.randn(30, generator=gen, dtype=torch.float64)
    x, _ = MFACInverse(g, blocks).inverse(v, MU)
    assert rel_err(x, dense_mfac(g, v, MU, blocks)) < 1e-10


def test_block_sizes() -> None:
    assert block_sizes([4, 6], None) == (4, 6)
    assert block_sizes([4, 6], 3) == (3, 3, 3, 1)
    assert block_sizes([4, 6], 10) == (10,)
    with pytest.raises(ConfigError, match="mfac_block_size"):
        block_sizes([4], 0)


def test_empty_window_is_the_identity_and_mu_must_be_positive() -> None:
    v = torch.randn(5, dtype=torch.float64)
    assert torch.equal(MFACInverse(None, (5,)).inverse(v, MU)[0], v)
    with pytest.raises(ConfigError, match="mu"):
        MFACInverse(None, (5,)).inverse(v, 0.0)


def test_an_inverse_operator_through_implicit_gradient() -> None:
    """M-FAC is an inverse operator, not a solver: ``implicit_gradient`` applies it (no solver, no product), with
    its factors computed at the first use and once per ``mu``."""
    assert INVERSES.get("mfac") is MFACInverse and "mfac" not in SOLVERS
    g = torch.randn(4, 6, dtype=torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64)
    inverse = MFACInverse(g, (6,))
    for mu in (MU, 2 * MU):
        (x,), info = implicit_gradient(inverse, [v], mu=mu, solver=SolverSpec("cg", maxiter=1))
        assert rel_err(x.reshape(-1), dense_mfac(g, v.reshape(-1), mu, (6,))) < 1e-10
        assert info.matvecs == 0 and info.solver == "mfac"
    assert sorted(inverse._factors) == [MU, 2 * MU]


def test_window_keeps_the_last_m_gradients_and_roundtrips() -> None:
    window = GradientWindow(3)
    assert window.gradients() is None
    rows = [torch.full((5,), float(i)) for i in range(5)]
    for i, row in enumerate(rows):
        window.push([row[:2], row[2:]])
        assert window.gradients().shape == (min(i + 1, 3), 5)
    assert sorted(window.gradients()[:, 0].tolist()) == [2.0, 3.0, 4.0]
    clone = GradientWindow(3)
    clone.load_state_dict(window.state_dict())
    clone.push([rows[0][:2], rows[0][2:]])
    window.push([rows[0][:2], rows[0][2:]])
    assert torch.equal(clone.gradients(), window.gradients())
    with pytest.raises(ConfigError, match="window"):
        GradientWindow(2).load_state_dict(window.state_dict())
    with pytest.raises(ConfigError, match="mfac_window"):
        GradientWindow(0)


class ConvBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
            nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.feature_dim = 4

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Rotation(PretextMethod):
    """A small pretext loss: predict which of two views is the flipped one."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.head = nn.Linear(feature_dim, 2)

    def loss(self, backbone: nn.Module, views: list[Tensor]) -> Tensor:
        logits = self.head(backbone(torch.cat(views)))
        labels = torch.cat([torch.zeros(len(views[0])), torch.ones(len(views[1]))]).long()
        return F.cross_entropy(logits, labels)


def mfac_trainer(window: int, block_size: int | None) -> BiSSLTrainer:
    torch.manual_seed(0)
    settings = BilevelSettings(
        lam=0.01, damping=0.5, solver=SolverSpec("mfac"), mfac_window=window, mfac_block_size=block_size
    )
    return BiSSLTrainer(
        backbone=ConvBackbone().double(), pretext=Rotation(4).double(), task=TinyClassify(),
        head=nn.Linear(4, 3).double(),
        settings=settings, make_lower_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        make_upper_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )  # fmt: skip


def views(step: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(6, 1, 6, 6, generator=gen, dtype=torch.float64)
    return [x, x.flip(-1)]


@pytest.mark.parametrize("block_size", [None, 17])
def test_trainer_records_pretext_gradients_and_solves_with_the_dense_fisher(block_size: int | None) -> None:
    trainer = mfac_trainer(window=3, block_size=block_size)
    expected = []
    for step in range(5):
        with torch.no_grad():  # theta != phi: the recorded gradient must exclude the proximal term
            for p in trainer.theta:
                p.add_(0.05)
        pretext_grad = torch.autograd.grad(trainer.pretext.loss(trainer.lower_backbone, views(step)), trainer.theta)
        expected.append(torch.cat([g.reshape(-1) for g in pretext_grad]))
        trainer.lower_step(views(step), total_lower_steps=5)
    g = trainer._window.gradients()  # type: ignore[union-attr]
    assert g.shape[0] == 3
    assert all(any(torch.allclose(row, e, rtol=0, atol=1e-12) for row in g) for e in expected[-3:])
    assert not any(torch.allclose(row, expected[0]) for row in g)

    gen = torch.Generator().manual_seed(9)
    batch = (torch.randn(5, 1, 6, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))
    trainer.begin_cycle(views(99))
    grads, stats = trainer.hypergradient(batch)
    v = torch.autograd.grad(trainer.task.loss(trainer.lower_backbone, trainer.head, batch), trainer.theta)
    v_flat = torch.cat([t.reshape(-1) for t in v])
    plain = torch.autograd.grad(trainer.task.loss(trainer.upper_backbone, trainer.head, batch), trainer.phi)
    blocks = block_sizes([p.numel() for p in trainer.theta], block_size)
    want = dense_mfac(g, v_flat, 0.51, blocks) + torch.cat([t.reshape(-1) for t in plain])
    got = torch.cat([t.reshape(-1) for t in grads[: len(trainer.phi)]])
    assert rel_err(got, want) < 1e-8
    assert stats["solver_hvps"] == 0


def test_mfac_state_roundtrips_through_the_trainer() -> None:
    trainer = mfac_trainer(window=4, block_size=None)
    for step in range(2):
        trainer.lower_step(views(step), total_lower_steps=5)
    clone = mfac_trainer(window=4, block_size=None)
    clone.load_state_dict(trainer.state_dict())
    assert torch.equal(clone._window.gradients(), trainer._window.gradients())  # type: ignore[union-attr]


def test_config_selects_mfac() -> None:
    cfg = build_config(AlignConfig, {"bilevel": {"solver": {"name": "mfac", "mfac_window": 8, "mfac_block_size": 64}}})
    assert cfg.bilevel.solver.name == "mfac" and cfg.bilevel.solver.mfac_window == 8
    with pytest.raises(ConfigError, match="mfac_window"):
        build_config(AlignConfig, {"bilevel": {"solver": {"mfac_window": 0}}})


def test_non_finite_gradients_raise() -> None:
    g = torch.randn(3, 4, dtype=torch.float64)
    g[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        MFACInverse(g, (2, 2)).inverse(torch.ones(4, dtype=torch.float64), MU)


def test_bissl_align_runs_with_mfac_and_resumes_exactly(tmp_path, tiny_align_overrides) -> None:
    """``bilevel.solver.name=mfac`` through the stage; a window longer than N_L spans cycles and is checkpointed."""
    from bissl.config import load_config
    from bissl.engine.logger import read_metrics
    from bissl.stages.align import align
    from bissl.utils.io import load_torch

    def cfg(name: str) -> AlignConfig:
        overrides = [*tiny_align_overrides, "bilevel.solver.name=mfac", "bilevel.solver.mfac_window=3"]
        return load_config(AlignConfig, "align_digits", [*overrides, f"out_dir={tmp_path / name}"])

    full = align(cfg("full"))
    assert full.finished
    cycles = read_metrics(full.out_dir / "metrics.jsonl", "cycle")
    assert all(r["upper/solver_hvps"] == 0 for r in cycles)
    assert not align(cfg("split"), until_cycle=1).finished
    resumed = align(cfg("split"), resume=True)
    a, b = load_torch(full.backbone_path)["state_dict"], load_torch(resumed.backbone_path)["state_dict"]
    assert all(torch.equal(a[key], b[key]) for key in a)
    upper_a, upper_b = (load_torch(r.out_dir / "upper_backbone.pt")["state_dict"] for r in (full, resumed))
    assert all(torch.equal(upper_a[key], upper_b[key]) for key in upper_a)


@pytest.mark.parametrize("storage", ["bf16", "fp16", "cpu"])
def test_low_precision_and_host_windows_match_fp32(storage: str) -> None:
    """bf16 rows carry a relative rounding error <= 2^-8 each; the solution's relative error stays of that order
    (here ~1e-3), the Gram matrices being formed and factorised in fp32/fp64; a host window is exact."""
    torch.manual_seed(0)
    grads = [torch.randn(1000) * (1 + i) for i in range(12)]
    v = torch.randn(1000)
    solutions = {}
    for kind in ("fp32", storage):
        window = GradientWindow(8, storage=kind)
        for g in grads:
            window.push(g.split([600, 400]))
        assert window.rows is not None and window.rows.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            kind, torch.float32
        )
        solutions[kind], _ = MFACInverse(window.gradients(), (600, 400)).inverse(v, 0.5)
        assert solutions[kind].dtype == torch.float32
    error = (solutions[storage] - solutions["fp32"]).norm() / solutions["fp32"].norm()
    assert error <= (0 if storage == "cpu" else 4e-3), error


def test_unknown_storage_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="mfac_storage"):
        GradientWindow(4, storage="int8")
