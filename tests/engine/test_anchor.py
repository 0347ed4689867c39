"""L2-SP: the penalty and the gradient it adds, by hand."""

import pytest
import torch
from torch import nn

from bissl.engine.anchor import L2SP


def test_penalty_and_its_gradient_by_hand():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    v = nn.Parameter(torch.tensor([[0.5]]))
    anchor = L2SP([w, v], alpha=0.3)  # w0 = (1, 2), v0 = 0.5
    with torch.no_grad():
        w.copy_(torch.tensor([1.5, 1.0]))
        v.fill_(0.0)
    # 0.3 / 2 * ((0.5)^2 + (-1)^2 + (-0.5)^2) = 0.15 * 1.5
    assert anchor.penalty().item() == pytest.approx(0.225)
    anchor.penalty().backward()  # autograd: alpha * (w - w0)
    assert torch.allclose(w.grad, torch.tensor([0.15, -0.3])) and torch.allclose(v.grad, torch.tensor([[-0.15]]))
    w.grad = torch.tensor([1.0, 1.0])  # a task gradient already there: the pull is added to it
    v.grad = None  # none there: the pull is set
    anchor.add_gradient()
    assert torch.allclose(w.grad, torch.tensor([1.15, 0.7])) and torch.allclose(v.grad, torch.tensor([[-0.15]]))
    assert torch.equal(anchor.anchor[0], torch.tensor([1.0, 2.0]))  # the anchor is a copy, not the live weights


def test_negative_weight_is_refused():
    with pytest.raises(ValueError, match="L2-SP weight must be >= 0"):
        L2SP([nn.Parameter(torch.zeros(1))], alpha=-1.0)
