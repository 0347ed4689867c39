"""Features of a frozen backbone over a data loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    normalize_fn: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """``(features [N, D], labels [N, ...])`` on CPU, in loader order, with the backbone in eval mode.

    ``normalize_fn`` (e.g. the dataset's mean/std normalisation) is applied to each image batch on ``device``.
    The backbone's train/eval mode is restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            if normalize_fn is not None:
                images = normalize_fn(images)
            features.append(backbone(images).float().cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("extract_features got an empty loader")
    return torch.cat(features), torch.cat(labels)
