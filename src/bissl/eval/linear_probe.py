"""Linear probe: a softmax classifier trained on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fit_linear_classifier(
    feats: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int | None = 256,
) -> nn.Linear:
    """Minimise ``cross_entropy(W z + b, y)`` with AdamW, ``z`` the features standardised by their mean/std.

    Zero-initialised; mini-batches (full batch with ``batch_size=None``) are shuffled by a generator seeded
    with ``seed``, so a seed gives the same classifier every time. The standardisation is folded into the
    returned layer, which therefore acts on the raw features.
    """
    if labels.ndim != 1:
        raise ValueError("a linear probe takes single-label class indices [N]; multi-label targets are not supported")
    x = feats.float()
    y = labels.long()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    z = (x - mean) / std
    layer = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    size = len(z) if batch_size is None else batch_size
    for _ in range(epochs):
        for idx in torch.randperm(len(z), generator=generator).split(size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(layer(z[idx]), y[idx]).backward()
            optimizer.step()
    with torch.no_grad():  # W z + b = (W / std) x + (b - (W / std) mean)
        layer.weight.div_(std)
        layer.bias.sub_(layer.weight @ mean)
    return layer


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    batch_size: int | None = 256,
) -> float:
    """Top-1 accuracy in [0, 1] on the test features of :func:`fit_linear_classifier` trained on the train ones."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    layer = fit_linear_classifier(
        train_feats,
        train_labels,
        num_classes=num_classes,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        batch_size=batch_size,
    )
    return probe_accuracy(layer, test_feats, test_labels)


@torch.no_grad()
def probe_accuracy(layer: nn.Module, feats: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1] of a fitted probe (:func:`fit_linear_classifier`) on ``(feats, labels)``."""
    return (layer(feats.float()).argmax(dim=1) == labels.long()).float().mean().item()
