"""The one interface every pretext (self-supervised) method implements.

A pretext method owns its heads (projector, predictor, EMA target, ...) and computes
``L_P(backbone, heads; views)``. The backbone is passed in, never owned, so the same method object
serves pretraining, the lower level of BiSSL (where ``L_P`` is differentiated twice w.r.t. the
backbone) and any user backbone.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class PretextConfig(BaseModel):
    """Hyper-parameters of a pretext method; subclasses add fields. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class PretextMethod(nn.Module, abc.ABC):
    """Heads + loss of one self-supervised method.

    Subclasses set ``Config`` (their hyper-parameters) and ``augmentation`` (the name of the default
    view augmentation in ``bissl.data.augment``), implement :meth:`loss`, and may override
    :meth:`setup` and :meth:`on_step_end`.
    """

    Config: ClassVar[type[PretextConfig]] = PretextConfig
    augmentation: ClassVar[str] = "simclr"
    n_views: ClassVar[int] = 2

    def __init__(self, feature_dim: int, config: PretextConfig | None = None) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.config = config if config is not None else self.Config()

    def setup(self, backbone: nn.Module) -> None:
        """Called once with the backbone before training (e.g. BYOL copies it into its EMA target)."""

    @abc.abstractmethod
    def loss(self, backbone: nn.Module, views: Sequence[Tensor]) -> Tensor:
        """Scalar pretext loss of ``backbone`` (plus this method's heads) on a list of augmented views."""

    def on_step_end(self, backbone: nn.Module, step: int, total_steps: int) -> None:
        """Called after every optimizer step of the backbone (e.g. BYOL's EMA target update).

        ``step`` counts finished steps (1-based), ``total_steps`` is the length of the run.
        """

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable head parameters (EMA targets and other frozen state excluded)."""
        return (p for p in self.parameters() if p.requires_grad)
