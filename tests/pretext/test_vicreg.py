import math

import pytest
import torch

from bissl.pretext import build_pretext, vicreg_loss


def _reference(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """The VICReg loss by plain loops over samples and dimensions."""
    b, d = z1.shape
    inv = sum((z1[i, k] - z2[i, k]) ** 2 for i in range(b) for k in range(d)) / (b * d)
    var = 0.0
    cov = 0.0
    for z in (z1, z2):
        mean = [sum(z[i, k] for i in range(b)) / b for k in range(d)]
        c = [
            [sum((z[i, j] - mean[j]) * (z[i, k] - mean[k]) for i in range(b)) / (b - 1) for k in range(d)]
            for j in range(d)
        ]
        var += sum(max(0.0, 1 - math.sqrt(c[k][k] + 1e-4)) for k in range(d)) / d / 2
        cov += sum(c[j][k] ** 2 for j in range(d) for k in range(d) if j != k) / d
    return float(25 * inv + 25 * var + 1 * cov)


def test_vicreg_loss_matches_hand_computation() -> None:
    z1 = torch.tensor([[0.1, 0.5, -0.3], [0.4, -0.2, 0.0], [-0.6, 0.3, 0.2], [0.2, 0.1, 0.9]], dtype=torch.float64)
    z2 = torch.tensor([[0.0, 0.7, -0.1], [2.0, -0.5, 0.3], [-1.1, 0.2, 0.4], [0.5, -2.0, 1.5]], dtype=torch.float64)
    expected = _reference(z1, z2)
    assert vicreg_loss(z1, z2).item() == pytest.approx(expected, rel=1e-12)
    # one branch with std > 1 in some dims: the hinge is active in some dims only
    assert (z2.std(dim=0) > 1).any() and (z2.std(dim=0) < 1).any()
    # identical, decorrelated, unit-variance embeddings cost nothing but the tiny eps
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64) * math.sqrt(3 / 4)
    assert vicreg_loss(z, z).item() == pytest.approx(0.0, abs=1e-3)


def test_vicreg_defaults_are_the_papers_and_one_sample_is_refused() -> None:
    method = build_pretext("vicreg", 6, {})
    assert (method.config.sim_coeff, method.config.std_coeff, method.config.cov_coeff) == (25.0, 25.0, 1.0)
    assert method.augmentation == "byol"
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.zeros(1, 3), torch.zeros(1, 3))
