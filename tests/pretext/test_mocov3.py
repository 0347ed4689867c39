import math

import pytest
import torch
from torch import nn

from bissl.pretext import MoCoV3, build_pretext, moco_contrastive_loss
from bissl.utils.errors import ConfigError
from helpers.models import tiny_backbone


def _reference(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    """``2 T mean_i -log softmax_j(cos(q_i, k_j) / T)[i]`` by plain loops."""
    rows = q.tolist()
    keys = k.tolist()

    def unit(x: list[float]) -> list[float]:
        n = math.sqrt(sum(v * v for v in x))
        return [v / n for v in x]

    rows, keys = [unit(r) for r in rows], [unit(r) for r in keys]
    total = 0.0
    for i, r in enumerate(rows):
        logits = [sum(a * b for a, b in zip(r, key, strict=True)) / t for key in keys]
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(rows) * 2 * t


def test_moco_contrastive_loss_matches_hand_computation() -> None:
    q = torch.tensor([[1.0, 0.2, 0.0], [0.3, -0.2, 0.9], [0.5, 0.5, -0.4]], dtype=torch.float64)
    k = torch.tensor([[2.0, 1.0, 0.1], [0.7, 0.1, 0.5], [-0.3, 0.8, -1.0]], dtype=torch.float64)
    for t in (0.2, 1.0):
        assert moco_contrastive_loss(q, k, t).item() == pytest.approx(_reference(q, k, t), rel=1e-12)
    k.requires_grad_(True)
    moco_contrastive_loss(q.requires_grad_(True), k).backward()
    assert k.grad is None and q.grad is not None  # keys are constants


def _method(**params: object) -> tuple[MoCoV3, nn.Module]:
    torch.manual_seed(0)
    backbone = tiny_backbone()
    method = build_pretext("mocov3", 6, {"projector_dims": [8, 5], "predictor_dims": [8, 5], **params})
    assert isinstance(method, MoCoV3)
    method.double().train()
    method.setup(backbone)
    return method, backbone


def test_mocov3_loss_is_symmetric_infonce_with_momentum_keys() -> None:
    method, backbone = _method()
    views = [torch.randn(6, 3, 2, 2, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():  # perturb the momentum encoder so keys and queries' encoders differ
        for p in method.momentum_backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loss = method.loss(backbone, views)
    q1, q2 = (method.predictor(method.projector(backbone(v))) for v in views)
    k1, k2 = (method.momentum_projector(method.momentum_backbone(v)) for v in views)
    expected = _reference(q1.detach(), k2.detach(), 0.2) + _reference(q2.detach(), k1.detach(), 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert all(
        p.grad is None for p in [*method.momentum_backbone.parameters(), *method.momentum_projector.parameters()]
    )
    assert all(p.grad is not None for p in backbone.parameters())


def test_mocov3_forward_changes_no_parameter_and_in_eval_mode_no_buffer() -> None:
    method, backbone = _method()
    views = [torch.randn(6, 3, 2, 2, dtype=torch.float64) for _ in range(2)]
    modules = nn.ModuleList([backbone, method])
    params = {n: p.detach().clone() for n, p in modules.named_parameters()}
    assert any(n.startswith("1.momentum_backbone.") for n in params)
    method.loss(backbone, views)
    assert all(torch.equal(p, params[n]) for n, p in modules.named_parameters())
    modules.eval()
    state = {k: v.clone() for k, v in modules.state_dict().items()}
    method.loss(backbone, views)
    assert all(torch.equal(v, state[k]) for k, v in modules.state_dict().items())


def test_on_step_end_moves_the_momentum_encoder_on_the_cosine_schedule() -> None:
    method, backbone = _method()
    online = [*backbone.parameters(), *method.projector.parameters()]
    target = [*method.momentum_backbone.parameters(), *method.momentum_projector.parameters()]
    assert all(torch.equal(t, o) and not t.requires_grad for t, o in zip(target, online, strict=True))
    assert set(map(id, method.head_parameters())).isdisjoint(map(id, target))
    for step, m in [(0, 0.99), (50, 0.995), (25, 1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2), (100, 1.0)]:
        with torch.no_grad():
            for p in online:
                p.add_(torch.randn_like(p))
        before = [t.clone() for t in target]
        method.on_step_end(backbone, step=step, total_steps=100)
        assert method.momentum == pytest.approx(m)
        for t, b, o in zip(target, before, online, strict=True):
            torch.testing.assert_close(t, m * b + (1 - m) * o)
        if m < 1:
            assert not any(torch.equal(t, b) for t, b in zip(target, before, strict=True))


def test_mocov3_defaults_setup_and_head_validation() -> None:
    method = build_pretext("mocov3", 6, {})
    assert method.config.temperature == 0.2 and method.config.momentum_base == 0.99
    with pytest.raises(RuntimeError, match="setup"):
        method.loss(tiny_backbone().float(), [torch.rand(4, 3, 2, 2)] * 2)
    with pytest.raises(ConfigError, match=r"predictor_dims must end with .* 128"):
        build_pretext("mocov3", 6, {"predictor_dims": [64, 32]})
