import math

import pytest
import torch
from torch import nn

from bissl.pretext import BYOL, build_pretext, byol_loss, cosine_momentum
from bissl.utils.errors import ConfigError


def _tiny_backbone() -> nn.Module:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    backbone.feature_dim = 6
    return backbone


def _method(**params: object) -> tuple[BYOL, nn.Module]:
    torch.manual_seed(0)
    backbone = _tiny_backbone()
    method = build_pretext("byol", 6, {"projector_dims": [16, 8], "predictor_dims": [16, 8], **params})
    assert isinstance(method, BYOL)
    method.setup(backbone)
    return method, backbone


def test_byol_loss_matches_hand_computation() -> None:
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    z = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    # cosines 1, 0, -1 -> 2 - 2 cos = 0, 2, 4 -> mean 2
    assert byol_loss(p, z).item() == pytest.approx(2.0)
    assert byol_loss(p[:1], z[:1]).item() == pytest.approx(0.0, abs=1e-7)


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(25, 100, 0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    values = [cosine_momentum(k, 10, 0.9) for k in range(11)]
    assert values == sorted(values) and len(set(values)) == 11


def test_target_starts_as_frozen_copy_and_ema_really_moves() -> None:
    method, backbone = _method(momentum_base=0.9)
    online = [*backbone.parameters(), *method.projector.parameters()]
    target = [*method.target_backbone.parameters(), *method.target_projector.parameters()]
    assert all(torch.equal(t, o) and not t.requires_grad for t, o in zip(target, online, strict=True))
    assert set(map(id, method.head_parameters())).isdisjoint(map(id, target))

    # the update after finished step k (1-based) uses tau_{k-1}: tau_base first, close to 1 at the last step
    last = 1 - 0.1 * (math.cos(math.pi * 99 / 100) + 1) / 2
    for step, tau in [(1, 0.9), (51, 0.95), (100, last)]:
        with torch.no_grad():
            for p in online:
                p.add_(torch.randn_like(p))
        before = [t.clone() for t in target]
        method.on_step_end(backbone, step=step, total_steps=100)
        assert method.momentum == pytest.approx(tau)
        for t, b, o in zip(target, before, online, strict=True):
            torch.testing.assert_close(t, tau * b + (1 - tau) * o)
        assert not any(torch.equal(t, b) for t, b in zip(target, before, strict=True))


def test_loss_is_symmetric_and_gradients_reach_only_online_parts() -> None:
    method, backbone = _method()
    views = [torch.rand(5, 3, 2, 2), torch.rand(5, 3, 2, 2)]
    loss = method.loss(backbone, views)
    p1, p2 = (method.predictor(method.projector(backbone(v))) for v in views)
    z1, z2 = (method.target_projector(method.target_backbone(v)) for v in views)
    expected = byol_loss(p1, z2.detach()) + byol_loss(p2, z1.detach())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    method.zero_grad()
    backbone.zero_grad()
    loss.backward()
    online = [*backbone.parameters(), *method.projector.parameters(), *method.predictor.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    target = [*method.target_backbone.parameters(), *method.target_projector.parameters()]
    assert all(p.grad is None for p in target)


def test_setup_is_required_and_config_is_validated() -> None:
    method = build_pretext("byol", 6, {})
    assert method.augmentation == "byol" and method.config.momentum_base == 0.99
    with pytest.raises(RuntimeError, match="setup"):
        method.loss(_tiny_backbone(), [torch.rand(2, 3, 2, 2)] * 2)
    with pytest.raises(ConfigError, match=r"predictor_dims must end with .* 128"):
        build_pretext("byol", 6, {"predictor_dims": [64, 32]})
    with pytest.raises(ConfigError, match="'momentum_base'"):
        build_pretext("byol", 6, {"momentum_base": 1.5})
