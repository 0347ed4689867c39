"""The sharded evaluation of a task (bissl.eval.task) takes any object with the contract's three methods, and a
task's own ``evaluate`` is that evaluation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bissl.config import DataConfig, DownstreamConfig
from bissl.data.base import DatasetInfo, ImageDataset, TensorImageDataset
from bissl.downstream.classification import ClassificationTask
from bissl.eval.task import evaluate_split

INFO = DatasetInfo("digits", num_classes=2, channels=1)


def _dataset() -> TensorImageDataset:
    images = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    images[::2] = 255
    return TensorImageDataset(images, [1, 0, 1, 0, 1, 0], INFO)


class Counting:
    """Not a DownstreamTask: scores how many items it predicted."""

    def predict(self, backbone: nn.Module, head: nn.Module, dataset: ImageDataset, device: torch.device) -> Any:
        return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])

    def score(self, predictions: Any) -> dict[str, float]:
        return {"items": float(len(predictions))}

    def checked_scores(self, scores: dict[str, float]) -> dict[str, float]:
        return {**scores, "checked": 1.0}


def test_evaluate_split_takes_the_contract_not_the_class() -> None:
    scores = evaluate_split(Counting(), nn.Identity(), nn.Identity(), _dataset(), torch.device("cpu"))
    assert scores == {"items": 6.0, "checked": 1.0}


def test_a_tasks_evaluate_is_the_sharded_evaluation() -> None:
    data = _dataset()
    cfg = DownstreamConfig(data=DataConfig(name="digits", image_size=4))
    task = ClassificationTask.from_config(cfg, {"train": data, "val": data, "test": data})
    backbone, head = nn.Flatten(), nn.Linear(16, 2)
    device = torch.device("cpu")
    scores = task.evaluate(backbone, head, data, device, precision="fp32")
    assert scores == evaluate_split(task, backbone, head, data, device)
    assert set(scores) >= {m.key for m in task.metrics}
