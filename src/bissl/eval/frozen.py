"""Accuracy of a frozen backbone: weighted kNN and a linear probe on its features."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from bissl.data.augment import normalize
from bissl.data.base import ImageDataset
from bissl.eval.features import extract_features
from bissl.eval.knn import knn_accuracy
from bissl.eval.linear_probe import linear_probe


def dataset_features(
    backbone: nn.Module, dataset: ImageDataset, *, device: torch.device, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a whole dataset (eval mode, dataset normalisation), in dataset order."""
    info = dataset.info
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return extract_features(backbone, loader, normalize_fn=lambda x: normalize(x, info.mean, info.std), device=device)


def frozen_accuracy(
    backbone: nn.Module,
    train_set: ImageDataset,
    test_set: ImageDataset,
    *,
    device: torch.device,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    probe_epochs: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """``{"knn": top-1}`` and, with ``probe_epochs > 0``, ``{"linear_probe": top-1}`` on ``test_set``."""
    train_x, train_y = dataset_features(backbone, train_set, device=device)
    test_x, test_y = dataset_features(backbone, test_set, device=device)
    result = {"knn": knn_accuracy(train_x, train_y, test_x, test_y, k=knn_k, temperature=knn_temperature)}
    if probe_epochs > 0:
        result["linear_probe"] = linear_probe(
            train_x, train_y, test_x, test_y, epochs=probe_epochs, lr=1e-2, weight_decay=1e-4, seed=seed
        )
    return result
