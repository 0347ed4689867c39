"""A task's metrics on a whole split, the same on every rank and equal to one process's."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from bissl.data.base import ImageDataset
from bissl.distributed import gather_rows, shard_dataset
from bissl.utils.precision import autocast


class PredictingTask(Protocol):
    """What evaluation needs of a :class:`~bissl.downstream.base.DownstreamTask` (eval sits below the tasks)."""

    def predict(self, backbone: nn.Module, head: nn.Module, dataset: ImageDataset, device: torch.device) -> Any: ...
    def score(self, predictions: Any) -> dict[str, float]: ...
    def checked_scores(self, scores: dict[str, float]) -> dict[str, float]: ...


def evaluate_split(
    task: PredictingTask,
    backbone: nn.Module,
    head: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """``task.score`` of the predictions on ``dataset``: each rank predicts its strided shard (no padding), the
    shards are put back together in dataset order and scored once (:mod:`bissl.downstream.base`); a declared metric
    missing from the scores is one error naming it (:meth:`~bissl.downstream.base.DownstreamTask.checked_scores`)."""
    with autocast(precision, device):
        predictions = task.predict(backbone, head, shard_dataset(dataset), device)  # type: ignore[arg-type]
    return task.checked_scores(task.score(gather_rows(predictions)))
