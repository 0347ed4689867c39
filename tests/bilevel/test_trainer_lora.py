"""BiSSL on a tiny ViT with LoRA adapters and MAE: theta/phi are the adapters, the frozen base is shared and never
moves, the implicit gradient through the adapters matches a dense solve, CG and M-FAC cycles run."""

from __future__ import annotations

import pytest
import torch

from helpers.models import CycleBatches, TinyClassify

pytest.importorskip("timm")
pytest.importorskip("peft")

from bissl.bilevel.implicit import SolverSpec
from bissl.bilevel.trainer import BilevelSettings, BiSSLTrainer
from bissl.models import build_backbone
from bissl.models.lora import apply_lora
from bissl.pretext import build_pretext


def _trainer(solver: str = "cg", dtype: torch.dtype = torch.float32, **settings) -> BiSSLTrainer:
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", in_channels=1, image_size=8, embed_dim=16, depth=2, num_heads=2, patch_size=2)
    vit = apply_lora(vit, {"r": 2, "alpha": 2}).to(dtype)
    with torch.no_grad():  # B = 0 at init: give the adapters non-zero values, as after some training
        for name, p in vit.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    mae = build_pretext("mae", 16, {"decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2})
    mae.setup(vit)
    task = TinyClassify()
    spec = SolverSpec(solver, maxiter=50 if solver == "cg" else 5, rtol=1e-10 if solver == "cg" else None)
    sgd = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
    return BiSSLTrainer(
        backbone=vit, pretext=mae.to(dtype), task=task, head=task.build_head(16).to(dtype),
        settings=BilevelSettings(lam=0.5, damping=1.0, solver=spec, n_lower=2, n_upper=2, **settings),
        make_lower_optimizer=sgd, make_upper_optimizer=sgd,
    )  # fmt: skip


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    views = [[torch.randn(8, 1, 8, 8, generator=g, dtype=dtype)] for _ in range(4)]
    batches = [(torch.randn(6, 1, 8, 8, generator=g, dtype=dtype), torch.arange(6) % 3) for _ in range(4)]
    return views, batches


def test_theta_and_phi_are_the_adapters_on_one_shared_base() -> None:
    trainer = _trainer()
    names = [n for n, p in trainer.lower_backbone.named_parameters() if p.requires_grad]
    assert len(trainer.theta) == len(names) == 8 and all("lora_" in n for n in names)
    lower = dict(trainer.lower_backbone.named_parameters())
    upper = dict(trainer.upper_backbone.named_parameters())
    for name, p in lower.items():
        assert (upper[name] is p) == (not p.requires_grad), name  # base shared, adapters copied
    with torch.no_grad():
        trainer.phi[0].add_(1.0)
    assert torch.allclose(trainer.proximal_term(), 0.5 * 0.5 * torch.tensor(float(trainer.phi[0].numel())))


@pytest.mark.parametrize("solver", ["cg", "mfac"])
def test_cycles_move_only_the_adapters(solver: str) -> None:
    trainer = _trainer(solver)
    base = {n: p.clone() for n, p in trainer.lower_backbone.named_parameters() if not p.requires_grad}
    theta0 = [p.clone() for p in trainer.theta]
    phi0 = [p.clone() for p in trainer.phi]
    views, batches = _data()
    stats = trainer.run_cycle(0, CycleBatches(views, batches, hessian=views[:1]), total_lower_steps=4)
    assert stats["upper/solver_hvps"] > (0 if solver == "cg" else -1)
    for n, p in trainer.lower_backbone.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(trainer.theta, theta0, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(trainer.phi, phi0, strict=True))


def test_implicit_gradient_through_adapters_matches_dense_solve() -> None:
    views, batches = _data(torch.float64)
    grads = {}
    for solver in ("cg", "exact"):
        trainer = _trainer(solver, torch.float64)
        grads[solver], stats = trainer.hypergradient(batches[0], views[0])
    assert stats["solver_hvps"] == sum(p.numel() for p in trainer.theta)  # exact: one product per column
    for a, b in zip(grads["cg"], grads["exact"], strict=True):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)
