"""Frozen-backbone scores every stage shares: features of a whole split (sharded over ranks, put back together in
dataset order) and the weighted-kNN / linear-probe accuracy on them, computed once on rank 0."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bissl.data.augment import normalize
from bissl.data.base import ImageDataset
from bissl.distributed import gather_shards, on_main, shard_dataset
from bissl.eval.features import extract_features
from bissl.eval.knn import knn_accuracy, knn_k_used
from bissl.eval.linear_probe import fit_linear_classifier, probe_accuracy
from bissl.utils.precision import autocast

Features = tuple[Tensor, Tensor]  # (features [N, D], labels [N]) on the CPU


def frozen_features(
    backbone: nn.Module,
    dataset: ImageDataset,
    *,
    device: torch.device,
    batch_size: int = 512,
    num_workers: int = 0,
    precision: str = "fp32",
) -> Features:
    """Features and labels of every item of ``dataset``, in dataset order, on every rank (eval mode, dataset
    normalisation); each rank extracts its own shard."""
    info = dataset.info
    loader = DataLoader(
        shard_dataset(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    with autocast(precision, device):
        x, y = extract_features(
            backbone, loader, normalize_fn=lambda b: normalize(b, info.mean, info.std), device=device
        )
    return gather_shards(x), gather_shards(y)


def frozen_scores(
    train: Features,
    evals: Mapping[str, Features],
    *,
    knn_k: int,
    knn_temperature: float,
    probe_epochs: int,
    seed: int,
    probe_lr: float = 1e-2,
    probe_weight_decay: float = 1e-4,
    num_classes: int | None = None,
) -> dict[str, float]:
    """``knn_<split>`` for every split of ``evals`` and, with ``probe_epochs > 0``, ``linear_probe_<split>`` of
    one probe trained on ``train``; computed on rank 0, returned on every rank. The kNN uses
    :func:`~bissl.eval.knn.knn_k_used` neighbours: ``knn_k`` capped by the mean class size of ``train``."""

    def compute() -> dict[str, float]:
        train_x, train_y = train
        k = knn_k_used(knn_k, train_y)
        scores = {
            f"knn_{split}": knn_accuracy(train_x, train_y, x, y, k=k, temperature=knn_temperature)
            for split, (x, y) in evals.items()
        }
        if probe_epochs > 0:
            classes = num_classes or int(max(int(y.max()) for _, y in (train, *evals.values()))) + 1
            probe = fit_linear_classifier(
                train_x, train_y, num_classes=classes, epochs=probe_epochs, lr=probe_lr,
                weight_decay=probe_weight_decay, seed=seed,
            )  # fmt: skip
            scores.update({f"linear_probe_{split}": probe_accuracy(probe, x, y) for split, (x, y) in evals.items()})
        return scores

    return on_main(compute)
