"""Downstream plug-in on labelled digits: a digit's parity (2 classes) and magnitude (regression) from one head.

bissl finetune --plugin examples/parity_task.py downstream.task=example_parity downstream.data.image_size=8
"""

from torch import Tensor, nn
from torch.nn import functional as F

from bissl.downstream import DOWNSTREAM_TASKS, ClassificationTask, Metric


@DOWNSTREAM_TASKS.register("example_parity")
class ParityMagnitude(ClassificationTask):
    """Head ``[parity logit 0, parity logit 1, magnitude]``, loss CE + MSE. The primary (first) metric, the magnitude's
    MAE, is lower-is-better: model selection and the HPO direction follow it. ``from_config``, ``prepare`` (labels =
    digits) and ``predict`` (head outputs, digits) are classification's; a task written from scratch implements them
    on :class:`bissl.downstream.DownstreamTask` the same way."""

    metrics = (
        Metric("magnitude_mae", higher_is_better=False, label="magnitude MAE"),
        Metric("parity_acc", label="parity accuracy", unit="%", scale=100.0),
    )
    class_label_probe = False  # not the 10 digit classes: frozen scores train this head, as for any task

    def build_head(self, feature_dim: int) -> nn.Module:
        return nn.Linear(feature_dim, 3)

    def loss(self, backbone: nn.Module, head: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, digits = batch
        out = head(backbone(images))
        return F.cross_entropy(out[:, :2], digits % 2) + F.mse_loss(out[:, 2], digits.float())

    def score(self, predictions: tuple[Tensor, Tensor]) -> dict[str, float]:
        out, digits = predictions
        parity_ok = (out[:, :2].argmax(dim=1) == digits % 2).float()
        return {"magnitude_mae": (out[:, 2] - digits).abs().mean().item(), "parity_acc": parity_ok.mean().item()}
