"""Image classification as a downstream task: a linear head, cross-entropy, top-1 and mean per-class accuracy.

Registered and built through :class:`~bissl.downstream.base.DownstreamTask`'s contract exactly like a user's task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from bissl.config import DownstreamConfig
from bissl.data.augment import build_view_augmentation, finetune_view_settings, normalize
from bissl.data.base import ImageDataset
from bissl.downstream.base import DOWNSTREAM_TASKS, DownstreamTask, Metric, Splits, TaskConfig, evaluating
from bissl.utils.errors import ConfigError

Augment = Callable[[Tensor, torch.Generator], Tensor]


class ClassificationConfig(TaskConfig):
    """``downstream.params`` of ``classification`` (before 0.2.0: ``downstream.label_smoothing`` / ``.augment``)."""

    label_smoothing: float = Field(0.0, ge=0, lt=1)  # of the training cross-entropy
    augment: bool = True  # a random resized crop + flip as the dataset declares; False: training images normalised only


@DOWNSTREAM_TASKS.register("classification")
class ClassificationTask(DownstreamTask):
    """``L_D = CE(head(backbone(x)), y)`` with optional label smoothing; a linear head on the features.

    ``train_augment(images, generator)`` returns augmented, normalised images; without it training
    batches are only normalised. :meth:`from_config` builds it from the dataset's declaration (``DatasetInfo``'s
    ``mirror_invariant`` and ``finetune_crop_scale``): a random resized crop, flipped only where mirroring keeps labels.
    """

    metrics = (
        Metric("top1", label="top-1", unit="%", scale=100.0),
        Metric("mean_per_class", label="mean per-class", unit="%", scale=100.0),
        Metric("loss", higher_is_better=False, label="cross-entropy"),
    )
    class_label_probe = True  # its targets are the dataset's class labels: kNN / linear probes measure it
    Config = ClassificationConfig

    def __init__(
        self,
        num_classes: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train_augment: Augment | None = None,
        label_smoothing: float = 0.0,
        eval_batch_size: int = 512,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes (got {num_classes})")
        self.num_classes = num_classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_augment = train_augment
        self.label_smoothing = label_smoothing
        self.eval_batch_size = eval_batch_size

    @classmethod
    def from_config(cls, cfg: DownstreamConfig, splits: Splits) -> ClassificationTask:
        params = cast(ClassificationConfig, cls.parse_params(cfg))
        info = splits["train"].info
        if info.num_classes == 0:
            raise ConfigError(f"downstream.data.name={cfg.data.name!r} has no labels; choose a labelled dataset")
        augment = None
        if params.augment:
            views = build_view_augmentation(
                "supervised", image_size=cfg.data.image_size, channels=info.channels, mean=info.mean, std=info.std,
                **finetune_view_settings(info, cfg.data.image_size),  # flips and crop: as the dataset declares
            )  # fmt: skip
            augment = lambda images, generator: views(images, generator)[0]  # noqa: E731 - one supervised view
        return cls(
            info.num_classes,
            mean=info.mean,
            std=info.std,
            train_augment=augment,
            label_smoothing=params.label_smoothing,
        )

    def build_head(self, feature_dim: int) -> nn.Module:
        return nn.Linear(feature_dim, self.num_classes)

    def prepare(self, batch: Any, device: torch.device, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        images, targets = batch
        images = images.to(device, non_blocking=True)
        if generator is not None and self.train_augment is not None:
            images = self.train_augment(images, generator)
        else:
            images = normalize(images, self.mean, self.std)
        return images, torch.as_tensor(targets).to(device, non_blocking=True)

    def loss(self, backbone: nn.Module, head: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, targets = batch
        return F.cross_entropy(head(backbone(images)), targets, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def predict(
        self, backbone: nn.Module, head: nn.Module, dataset: ImageDataset, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Logits and targets of ``dataset``, in eval mode (modes are restored afterwards)."""
        logits, targets = [], []
        with evaluating(backbone, head):
            for batch in DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False):
                images, y = self.prepare(batch, device, None)
                logits.append(head(backbone(images)).float().cpu())
                targets.append(y.cpu())
        return torch.cat(logits), torch.cat(targets)

    def score(self, predictions: tuple[Tensor, Tensor]) -> dict[str, float]:
        logits, targets = predictions
        return classification_metrics(logits, targets, self.num_classes)


def classification_metrics(logits: Tensor, targets: Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 accuracy, mean per-class accuracy (classes present in ``targets``) and mean cross-entropy."""
    pred = logits.argmax(dim=1)
    correct = (pred == targets).float()
    per_class = torch.zeros(num_classes).index_add_(0, targets, correct)
    counts = torch.bincount(targets, minlength=num_classes).float()
    present = counts > 0
    return {
        "top1": correct.mean().item(),
        "mean_per_class": (per_class[present] / counts[present]).mean().item(),
        "loss": F.cross_entropy(logits, targets).item(),
    }
