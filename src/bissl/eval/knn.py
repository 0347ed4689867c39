"""Weighted cosine k-nearest-neighbour accuracy (Wu et al., 2018), the usual SSL monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_k_used(k: int, train_labels: Tensor) -> int:
    """The k a frozen-feature kNN uses over a memory bank with these labels: ``k`` capped by the bank's mean class
    size (at least 1).

    With k at or above a class's size, a query's vote reaches into other classes even where its own class is a
    perfect cluster, and with k equal to the bank every query votes over all of it: the score then measures the
    bank's class balance, not neighbourhoods (a 10-shot, 2-class bank of 20 images with k = 20). The mean class
    size, not the smallest, so that one rare class does not shrink k for all: a balanced n-shot bank gets k = n,
    and a full dataset keeps the configured k.
    """
    classes = int(train_labels.unique().numel())
    return max(1, min(k, len(train_labels) // max(classes, 1)))


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Predicted class of every test feature.

    With cosine similarities ``s_j`` of a test feature to its ``k`` nearest training features (labels ``y_j``),
    the score of class ``c`` is ``sum_j exp(s_j / temperature) [y_j = c]``; the prediction is its argmax.
    Test features are processed ``chunk_size`` at a time.
    """
    if len(train_feats) == 0 or len(train_feats) != len(train_labels):
        raise ValueError(f"need as many train labels as features, got {len(train_feats)} and {len(train_labels)}")
    num_classes = num_classes if num_classes is not None else int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    predictions = []
    for chunk in test.split(chunk_size):
        sims, idx = (chunk @ train.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        scores = torch.zeros(len(chunk), num_classes, device=chunk.device).scatter_add_(1, labels[idx], weights)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    *,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` on ``test_feats``."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(
        train_feats,
        train_labels,
        test_feats,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    return (predicted == test_labels.to(predicted.device)).float().mean().item()
