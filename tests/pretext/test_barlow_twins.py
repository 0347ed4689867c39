import math

import pytest
import torch
from torch import nn

from bissl.pretext import barlow_twins_loss, batch_standardize, build_pretext


def _reference(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051) -> float:
    """Barlow Twins by plain loops: standardise each column, cross-correlate, sum the penalties."""
    b, d = z1.shape

    def standardized(z: torch.Tensor) -> list[list[float]]:
        cols = []
        for k in range(d):
            col = [float(z[i, k]) for i in range(b)]
            mean = sum(col) / b
            std = math.sqrt(sum((x - mean) ** 2 for x in col) / b + 1e-5)
            cols.append([(x - mean) / std for x in col])
        return cols

    a, c2 = standardized(z1), standardized(z2)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][n] * c2[j][n] for n in range(b)) / b
            total += (c - 1) ** 2 if i == j else lambd * c**2
    return total


def test_barlow_twins_loss_matches_hand_computation() -> None:
    z1 = torch.tensor([[0.1, 0.5, -0.3], [0.4, -0.2, 0.0], [-0.6, 0.3, 0.2], [0.2, 0.1, 0.9]], dtype=torch.float64)
    z2 = torch.tensor([[0.0, 0.7, -0.1], [2.0, -0.5, 0.3], [-1.1, 0.2, 0.4], [0.5, -2.0, 1.5]], dtype=torch.float64)
    assert barlow_twins_loss(z1, z2).item() == pytest.approx(_reference(z1, z2), rel=1e-12)
    assert barlow_twins_loss(z1, z2, lambd=0.5).item() == pytest.approx(_reference(z1, z2, 0.5), rel=1e-12)
    # the standardisation is BatchNorm1d(affine=False) in train mode
    bn = nn.BatchNorm1d(3, affine=False).double().train()
    torch.testing.assert_close(batch_standardize(z1), bn(z1))
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(torch.zeros(1, 3), torch.zeros(1, 3))


def test_barlow_twins_defaults_are_the_papers() -> None:
    method = build_pretext("barlow_twins", 6, {})
    assert method.config.lambd == 0.0051 and method.augmentation == "byol"
