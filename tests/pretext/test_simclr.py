import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bissl.distributed import init_from_env
from bissl.pretext import PRETEXT_METHODS, SimCLR, build_pretext, nt_xent_loss
from bissl.utils.errors import ConfigError
from helpers.ranks import spawn_ranks


def test_nt_xent_matches_hand_computation() -> None:
    # view 1: a1 = (1, 0), b1 = (0, 1); view 2: a2 = (2, 0) ~ (1, 0), b2 = (1, 1) / sqrt(2)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    t, c = 0.5, 1 / math.sqrt(2)
    e = lambda s: math.exp(s / t)  # noqa: E731
    # cosine similarities: a1.b1 = 0, a1.a2 = 1, a1.b2 = c, b1.a2 = 0, b1.b2 = c, a2.b2 = c
    per_anchor = [
        -math.log(e(1) / (e(0) + e(1) + e(c))),  # a1: positive a2; negatives b1, b2
        -math.log(e(c) / (e(0) + e(0) + e(c))),  # b1: positive b2; negatives a1, a2
        -math.log(e(1) / (e(1) + e(0) + e(c))),  # a2: positive a1; negatives b1, b2
        -math.log(e(c) / (e(c) + e(c) + e(c))),  # b2: positive b1; negatives a1, a2
    ]
    expected = sum(per_anchor) / 4
    assert nt_xent_loss(z1, z2, temperature=t).item() == pytest.approx(expected, rel=1e-12)
    assert nt_xent_loss(3 * z1, z2, temperature=t).item() == pytest.approx(expected, rel=1e-12)  # cosine
    # without an initialised process group the gather is a no-op
    assert nt_xent_loss(z1, z2, t, gather_distributed=True).item() == pytest.approx(expected, rel=1e-12)


def test_nt_xent_is_twice_differentiable_and_finite() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    grads = torch.autograd.grad(nt_xent_loss(z1, z2), (z1, z2), create_graph=True)
    hvp = torch.autograd.grad(sum(g.sum() for g in grads), (z1, z2))
    assert all(torch.isfinite(h).all() for h in (*grads, *hvp))


def _tiny_backbone() -> nn.Module:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    backbone.feature_dim = 6
    return backbone


def test_simclr_method_trains_backbone_and_projector() -> None:
    torch.manual_seed(0)
    method = build_pretext("simclr", 6, {"projector_dims": [16, 8], "temperature": 0.2})
    assert isinstance(method, SimCLR) and method.augmentation == "simclr" and PRETEXT_METHODS.get("simclr") is SimCLR
    backbone = _tiny_backbone()
    views = [torch.rand(5, 3, 2, 2), torch.rand(5, 3, 2, 2)]
    loss = method.loss(backbone, views)
    z1, z2 = (method.projector(backbone(v)) for v in views)
    assert loss.item() == pytest.approx(nt_xent_loss(z1, z2, 0.2).item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in [*backbone.parameters(), *method.head_parameters()])
    with pytest.raises(ValueError, match="2 views"):
        method.loss(backbone, views * 2)


def test_simclr_defaults_and_config_errors() -> None:
    method = build_pretext("simclr", 6, {})
    assert method.config.temperature == 0.5 and method.config.gather_distributed is False
    with pytest.raises(ConfigError, match="'temperature'"):
        build_pretext("simclr", 6, {"temperature": 0})


def _gather_worker(rank: int, world: int, data: dict[str, torch.Tensor], out_dir: str) -> None:
    init_from_env("cpu")
    part = slice(rank * len(data["z1"]) // world, (rank + 1) * len(data["z1"]) // world)
    z1 = data["z1"][part].clone().requires_grad_(True)
    z2 = data["z2"][part].clone().requires_grad_(True)
    loss = nt_xent_loss(z1, z2, 0.5, gather_distributed=True)
    g1, g2 = torch.autograd.grad(loss, (z1, z2), create_graph=True)
    h1, h2 = torch.autograd.grad((g1 * data["v1"][part]).sum() + (g2 * data["v2"][part]).sum(), (z1, z2))
    torch.save({"loss": loss.detach(), "g": (g1.detach(), g2.detach()), "h": (h1, h2)}, f"{out_dir}/{rank}.pt")


@pytest.mark.e2e
def test_gathered_nt_xent_matches_single_process_gradients_and_hvps(tmp_path: Path) -> None:
    """Two gloo ranks reproduce the loss, gradient and Hessian-vector product of the concatenated batch.

    Rank r's gradient of its own loss L_r collects sum_j dL_j/dz_r through the gather, i.e. W times the
    gradient of the mean loss (DDP then averages over the W ranks), and likewise for the HVP.
    """
    world = 2
    torch.manual_seed(0)
    data = {name: torch.randn(8, 5, dtype=torch.float64) for name in ("z1", "z2", "v1", "v2")}
    spawn_ranks(_gather_worker, world, data, str(tmp_path))

    z1, z2 = data["z1"].clone().requires_grad_(True), data["z2"].clone().requires_grad_(True)
    loss = nt_xent_loss(z1, z2, 0.5)
    g1, g2 = torch.autograd.grad(loss, (z1, z2), create_graph=True)
    h1, h2 = torch.autograd.grad((g1 * data["v1"]).sum() + (g2 * data["v2"]).sum(), (z1, z2))

    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-12)
    for name, (full1, full2) in {"g": (g1, g2), "h": (h1, h2)}.items():
        got1 = torch.cat([r[name][0] for r in ranks])
        got2 = torch.cat([r[name][1] for r in ranks])
        torch.testing.assert_close(got1, world * full1.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got2, world * full2.detach(), rtol=1e-10, atol=1e-12)
