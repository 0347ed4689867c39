import itertools
import math

import pytest
import torch
from torch import nn

from bissl.engine.optim import LARS, OPTIMIZERS, OptimizerSettings, build_optimizer, cosine_with_warmup
from bissl.utils.errors import ConfigError


def _linear_with_grads() -> nn.Linear:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
        layer.bias.copy_(torch.tensor([1.0]))
    layer.weight.grad = torch.tensor([[0.6, 0.8]])
    layer.bias.grad = torch.tensor([0.5])
    return layer


def test_lars_two_steps_by_hand() -> None:
    # step 1: d = g + 0.1 w = (0.9, 1.2), |d| = 1.5, |w| = 5, trust = 0.001 * 5 / 1.5 -> d = (0.003, 0.004)
    #         m = d, w = (3, 4) - m = (2.997, 3.996)
    # step 2: w = 0.999 (3, 4), d = 0.2999 (3, 4) -> trust * d = 0.001 |w| d / |d| = 0.000999 (3, 4)
    #         m = 0.9 (0.003, 0.004) + (0.002997, 0.003996) = (0.005697, 0.007596), w = (2.991303, 3.988404)
    layer = _linear_with_grads()
    weight = layer.weight
    optimizer = LARS([weight], lr=1.0, momentum=0.9, weight_decay=0.1, eta=0.001)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([[2.997, 3.996]]))
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([[2.991303, 3.988404]]))


def test_build_optimizer_excludes_bias_and_norm() -> None:
    layer = _linear_with_grads()
    optimizer = build_optimizer("lars", layer.parameters(), lr=1.0, weight_decay=0.1)
    assert isinstance(optimizer, LARS)
    weights, others = optimizer.param_groups
    assert weights["params"] == [layer.weight] and weights["weight_decay"] == 0.1 and weights["lars_adaptation"]
    assert others["params"] == [layer.bias] and others["weight_decay"] == 0.0 and not others["lars_adaptation"]
    optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[2.997, 3.996]]))
    torch.testing.assert_close(layer.bias.detach(), torch.tensor([0.5]))  # plain step: 1 - 1.0 * 0.5

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2), nn.LayerNorm(2))
    optimizer = build_optimizer("sgd", net.parameters(), lr=0.1, weight_decay=1e-4)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(net[0].weight), id(net[3].weight)}
    single = build_optimizer("adamw", net.parameters(), lr=0.1, weight_decay=0.05, exclude_bias_and_norm=False)
    assert isinstance(single, torch.optim.AdamW) and len(single.param_groups) == 1


def test_param_groups_keep_their_options() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = [{"params": net[0].parameters(), "lr": 0.5}, {"params": net[1].parameters()}]
    optimizer = build_optimizer("adamw", groups, lr=0.1, weight_decay=0.01, betas=(0.8, 0.9))
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5, 0.1, 0.1]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0, 0.01, 0.0]
    assert optimizer.defaults["betas"] == (0.8, 0.9)


def test_optimizer_registry_is_open_and_names_are_checked() -> None:
    @OPTIMIZERS.register("test_adam", overwrite=True)
    def adam(groups: list[dict], s: OptimizerSettings, **options: object) -> torch.optim.Optimizer:
        return torch.optim.Adam(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, **options)

    optimizer = build_optimizer("test_adam", nn.Linear(2, 2).parameters(), lr=0.1, weight_decay=0.0, amsgrad=True)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["amsgrad"]
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adagrad'.*lars"):
        build_optimizer("adagrad", nn.Linear(2, 2).parameters(), lr=0.1, weight_decay=0.0)
    with pytest.raises(ConfigError, match="no parameters"):
        build_optimizer("sgd", [], lr=0.1, weight_decay=0.0)


def _lrs(warmup: int, total: int, min_lr_ratio: float, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = cosine_with_warmup(optimizer, warmup, total, min_lr_ratio)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_with_warmup_at_key_steps() -> None:
    lrs = _lrs(warmup=10, total=110, min_lr_ratio=0.1, steps=120)
    assert lrs[0] == pytest.approx(2.0 * 1 / 10)
    assert lrs[4] == pytest.approx(2.0 * 5 / 10)
    assert lrs[9] == pytest.approx(2.0) and lrs[10] == pytest.approx(2.0)
    assert lrs[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway through the decay
    assert lrs[35] == pytest.approx(2.0 * (0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2))
    assert lrs[110] == pytest.approx(0.2) and lrs[119] == pytest.approx(0.2)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    no_warmup = _lrs(warmup=0, total=4, min_lr_ratio=0.0, steps=5)
    assert no_warmup == pytest.approx(
        [2.0, 2.0 * (1 + math.cos(math.pi / 4)) / 2, 1.0, 2.0 * (1 - math.cos(math.pi / 4)) / 2, 0.0]
    )
    with pytest.raises(ConfigError, match="warmup_steps=5"):
        _lrs(warmup=5, total=4, min_lr_ratio=0.0, steps=1)
