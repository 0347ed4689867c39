"""Tiny backbones, pretext methods and tasks (each plug-in contract in a few lines) for bilevel and pretext tests."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bissl.downstream import DownstreamTask, Metric
from bissl.pretext.base import PretextMethod


class ConvNet(nn.Module):
    """A tiny conv backbone with BatchNorm and a linear head (the head is held fixed in H)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class TinyClassify(DownstreamTask):
    """3-way cross-entropy on ``(x, y)`` batches, the whole contract in a few lines (the trainer uses the loss)."""

    metrics = (Metric("top1"),)

    @classmethod
    def from_config(cls, cfg, splits):  # type: ignore[no-untyped-def]
        return cls()

    def build_head(self, feature_dim: int) -> nn.Module:
        return nn.Linear(feature_dim, 3)

    def prepare(self, batch, device, generator):  # type: ignore[no-untyped-def]
        return batch

    def loss(self, backbone: nn.Module, head: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(head(backbone(batch[0])), batch[1])

    def predict(self, backbone, head, dataset, device):  # type: ignore[no-untyped-def]
        x, y = dataset
        return head(backbone(x)).argmax(1), y

    def score(self, predictions: tuple[Tensor, Tensor]) -> dict[str, float]:
        pred, y = predictions
        return {"top1": (pred == y).float().mean().item()}


def tiny_backbone(in_dim: int = 12, out_dim: int = 6) -> nn.Module:
    """A float64 ``Flatten -> Linear -> Tanh`` backbone (smooth, so finite differences are clean)."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim), nn.Tanh()).double()
    backbone.feature_dim = out_dim
    return backbone


class TinyBackbone(nn.Module):
    """``4 -> 5 -> 3`` MLP with BatchNorm: buffers that a Hessian-vector product must not move."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        self.feature_dim = 3

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class RegressViewPretext(PretextMethod):
    """A user pretext method: predict view 2's first coordinates from view 1's features."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__(feature_dim)
        self.head = nn.Linear(feature_dim, 2)

    def loss(self, backbone, views):  # type: ignore[no-untyped-def]
        return F.mse_loss(self.head(backbone(views[0])), views[1][:, :2])


def regression_batches() -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
    """Float64 views for :class:`RegressViewPretext` and a ``(x, y)`` batch for :class:`TinyClassify` (4 inputs)."""
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    down = (torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
    return views, down


def upper_batches(n: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` seeded float64 batches of ``TinyClassify`` (12 samples, 4 features, 3 classes)."""
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(12, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen))
            for _ in range(n)]  # fmt: skip


@dataclass(frozen=True)
class CycleBatches:
    """A :class:`~bissl.bilevel.trainer.CycleData` over prepared batches: step (or cycle) ``i`` takes entry ``i``
    modulo its list's length; the Hessian views are the lower ones unless ``hessian`` is given."""

    lower: Sequence[Sequence[Tensor]]
    upper: Sequence[Any] = ()
    hessian: Sequence[Sequence[Tensor]] = ()

    def lower_views(self, step: int) -> Sequence[Tensor]:
        return self.lower[step % len(self.lower)]

    def hessian_views(self, cycle: int) -> Sequence[Tensor]:
        views = self.hessian or self.lower
        return views[cycle % len(views)]

    def upper_batch(self, step: int) -> Any:
        return self.upper[step % len(self.upper)]

    def lower_batch(self, step: int) -> Any:
        return self.upper_batch(step)


def nt_xent(z: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's loss on ``2n`` embeddings, views ``i`` and ``i + n`` positive."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = (z @ z.T / temperature).fill_diagonal_(-math.inf)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, targets)


def conv_problem() -> tuple[ConvNet, list[Tensor], Callable[[], Tensor]]:
    """Float64 conv net in train mode, its backbone parameters and a SimCLR-style lower loss."""
    torch.manual_seed(0)
    model = ConvNet().double()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    views = torch.cat([x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)])
    return model, list(model.backbone.parameters()), lambda: nt_xent(model(views))
