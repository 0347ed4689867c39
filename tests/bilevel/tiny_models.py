"""Small models shared by the bilevel tests."""

from torch import Tensor, nn
from torch.nn import functional as F

from bissl.downstream import DownstreamTask, Metric


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
