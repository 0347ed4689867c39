"""ComputeCounter: forward passes and images by hook, one backward per backpropagated forward, state round trip."""

from __future__ import annotations

import torch
from torch import nn

from bissl.utils.compute import ComputeCounter


def test_counts_forwards_images_and_one_backward_per_forward_even_through_hvps() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    compute = ComputeCounter()
    compute.watch(net)
    with torch.no_grad():
        net(torch.randn(7, 3))  # evaluation: a forward, no backward
    loss = net(torch.randn(5, 3)).square().sum()
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params], retain_graph=True)  # a product
    torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params])  # and another
    assert compute.as_dict() == {"forward": 2, "backward": 1, "hvp": 0, "images": 12}
    restored = ComputeCounter()
    restored.load_state_dict(compute.state_dict())
    assert restored == compute
