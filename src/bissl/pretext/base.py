"""The one interface every pretext (self-supervised) method implements.

A pretext method owns its heads (projector, predictor, EMA target, ...) and computes
``L_P(backbone, heads; views)``. The backbone is passed in, never owned, so the same method object
serves pretraining, the lower level of BiSSL (where ``L_P`` is differentiated twice w.r.t. the
backbone) and any user backbone.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from bissl.utils.errors import ConfigError
from bissl.utils.registry import Registry


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

    def check_views(self, views: Sequence[Tensor]) -> None:
        """Raise ``ValueError`` unless ``views`` holds ``n_views`` batches."""
        if len(views) != self.n_views:
            raise ValueError(f"{type(self).__name__} takes {self.n_views} views per batch, got {len(views)}")


PRETEXT_METHODS: Registry[type[PretextMethod]] = Registry("pretext method")


def build_pretext(name: str, feature_dim: int, params: Mapping[str, Any] | None = None) -> PretextMethod:
    """The registered method ``name`` on ``feature_dim``-dim features, its ``params`` validated by its ``Config``."""
    method_cls = PRETEXT_METHODS.get(name)
    try:
        config = method_cls.Config.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise ConfigError(f"pretext {name!r}: {_describe(exc, method_cls.Config)}") from None
    return method_cls(feature_dim, config)


def _describe(exc: ValidationError, config_cls: type[PretextConfig]) -> str:
    """One line for the first validation error, naming the offending key."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}; allowed keys: {', '.join(config_cls.model_fields)}"
    return f"invalid {key!r}: {message} (got {error.get('input')!r})" if key else message
