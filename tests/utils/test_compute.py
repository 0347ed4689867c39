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


def test_a_detector_reading_feature_maps_is_counted_and_a_deep_copy_counts_its_own() -> None:
    """A detector calls the backbone's ``feature_maps``, not ``forward``: each call is a forward pass (and one
    backward through it), and a deep copy of the watched backbone runs and counts its own weights."""
    import copy

    from bissl.models.small_cnn import SmallCNN

    net = SmallCNN(1, width=4, depth=2, small_images=True)
    compute = ComputeCounter()
    compute.watch(net)
    maps = net.feature_maps(torch.randn(3, 1, 8, 8))
    sum(m.square().sum() for m in maps.values()).backward()
    net(torch.randn(2, 1, 8, 8))
    assert compute.as_dict() == {"forward": 2, "backward": 1, "hvp": 0, "images": 5}
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
        x = torch.randn(2, 1, 8, 8)
        assert not torch.equal(twin.feature_maps(x)["stage1"], net.feature_maps(x)["stage1"])
    assert compute.forward == 3  # the copy counts into its own copied counter, like its copied forward hook
