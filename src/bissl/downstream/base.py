"""The one interface every downstream task implements (classification now, detection later).

A task owns no backbone: it builds its head, turns a loader batch into a device batch (with the
task's seeded training augmentation), computes ``L_D(backbone, head; batch)`` and evaluates. The BiSSL
upper level calls :meth:`loss` twice on the same prepared batch, once with the lower backbone theta and
once with the upper backbone phi.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from bissl.data.base import ImageDataset
from bissl.utils.registry import Registry


class DownstreamTask(abc.ABC):
    """Head + loss + metrics of one downstream problem."""

    #: the metric that model selection maximises (a key of :meth:`evaluate`'s result)
    primary_metric: str = "top1"

    @abc.abstractmethod
    def build_head(self, feature_dim: int) -> nn.Module:
        """A freshly initialised head on top of ``feature_dim``-dimensional backbone features."""

    @abc.abstractmethod
    def prepare(self, batch: Any, device: torch.device, generator: torch.Generator | None) -> Any:
        """Move a loader batch to ``device``; apply the training augmentation when ``generator`` is given."""

    @abc.abstractmethod
    def loss(self, backbone: nn.Module, head: nn.Module, batch: Any) -> Tensor:
        """Scalar downstream loss on a prepared batch."""

    @abc.abstractmethod
    def evaluate(
        self, backbone: nn.Module, head: nn.Module, dataset: ImageDataset, device: torch.device
    ) -> dict[str, float]:
        """Metrics on a whole split (eval mode, no augmentation)."""


DOWNSTREAM_TASKS: Registry[type[DownstreamTask]] = Registry("downstream task")
