"""The one contract every downstream task implements; the built-in classification task uses it like any user's.

A task owns no backbone. It declares its :attr:`~DownstreamTask.metrics` (the first is the primary one: model
selection, the HPO direction, the study's headline), is built from its config by :meth:`~DownstreamTask.from_config`,
builds its head (:meth:`~DownstreamTask.build_head_for`, on the backbone), turns a loader batch into a device batch
(with the task's seeded training augmentation), computes
``L_D(backbone, head; batch)``, predicts a split and scores predictions. The BiSSL upper level calls :meth:`loss`
twice on the same prepared batch, once with the lower backbone theta and once with the upper backbone phi.

Evaluation is split in two so that it runs data parallel through the contract alone: every rank runs
:meth:`predict` on its shard of a split, the shards' predictions are put back together in dataset order
(:func:`bissl.distributed.gather_rows`) and :meth:`score` computes the metrics once
(:func:`bissl.eval.task.evaluate_split`). Predictions are per-sample rows: a
tensor (or a tuple / dict of tensors) whose first dimension is the sample, or a list with one entry per sample.

Register a task with ``@DOWNSTREAM_TASKS.register("name")``; ``bissl ... downstream.task=name`` then builds it with
``from_config``. Task-specific settings go in ``downstream.params`` and are validated by the task's ``Config``.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from bissl.config import DownstreamConfig
from bissl.data import build_dataset
from bissl.data.base import ImageDataset
from bissl.data.subsets import class_subset, few_shot
from bissl.eval.task import evaluate_split
from bissl.models.backbones import feature_dim_of
from bissl.utils.errors import ConfigError
from bissl.utils.registry import Registry

Splits = dict[str, ImageDataset]


@dataclass(frozen=True)
class Metric:
    """One number a task reports: its key in :meth:`DownstreamTask.score`'s result, which way is better, and how
    to show it (``value * scale`` followed by ``unit``, e.g. accuracy 0.9412 as ``94.12 %``)."""

    key: str
    higher_is_better: bool = True
    label: str = ""
    unit: str = ""
    scale: float = 1.0

    @property
    def name(self) -> str:
        """What a report calls it (``label``, else ``key``)."""
        return self.label or self.key

    @property
    def direction(self) -> str:
        """``maximize`` or ``minimize`` (Optuna's words)."""
        return "maximize" if self.higher_is_better else "minimize"

    @property
    def worst(self) -> float:
        """A value every real value beats."""
        return -math.inf if self.higher_is_better else math.inf

    def better(self, value: float, than: float) -> bool:
        """Whether ``value`` is strictly better than ``than``."""
        return value > than if self.higher_is_better else value < than

    def show(self, value: float, digits: int = 2) -> str:
        """``value`` in display units, without the unit."""
        return f"{value * self.scale:.{digits}f}"

    def header(self) -> str:
        """Column header: label, unit and direction, e.g. ``top-1 (%) ↑``."""
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.name}{unit} {'↑' if self.higher_is_better else '↓'}"


class TaskConfig(BaseModel):
    """Task-specific settings (``downstream.params``); subclasses add fields. Unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class DownstreamTask(abc.ABC):
    """Head + loss + metrics of one downstream problem (module docstring)."""

    #: the metrics :meth:`score` returns; the first is the primary one (model selection, HPO, headline)
    metrics: ClassVar[tuple[Metric, ...]] = ()
    #: the type of ``downstream.params``
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    #: whether a frozen kNN / linear probe on the dataset's single class labels measures this task (its targets are
    #: those labels): ``bissl evaluate`` and a study's "before fine-tuning" table then report them; otherwise (the
    #: default) they train the task's own head on the frozen backbone and report its declared metrics. A subclass
    #: of classification that predicts something else from the labels sets it back to False
    class_label_probe: ClassVar[bool] = False

    @classmethod
    def primary(cls) -> Metric:
        """The metric model selection optimises (the first declared)."""
        if not cls.metrics:
            raise ConfigError(f"downstream task {cls.__name__} declares no metrics; set `metrics = (Metric(...), ...)`")
        return cls.metrics[0]

    @classmethod
    def check_contract(cls) -> None:
        """Raise :class:`ConfigError` for a task class that breaks the contract where it can be seen without data
        (no metrics, a metric that is not a :class:`Metric`): called before a run folder is made, so a fixed
        plug-in re-runs in the same folder."""
        cls.primary()
        wrong = [m for m in cls.metrics if not isinstance(m, Metric)]
        if wrong:
            raise ConfigError(
                f"downstream task {cls.__name__} declares {wrong[0]!r} in `metrics`; declare Metric(...)s there"
            )

    def checked_scores(self, scores: dict[str, float]) -> dict[str, float]:
        """``scores`` (what :meth:`score` returned), or one :class:`ConfigError` naming the task, the first declared
        metric key it misses and the declared ones (a misspelt key would otherwise surface as a bare KeyError)."""
        missing = [m.key for m in self.metrics if m.key not in scores]
        if missing:
            name = next((n for n in DOWNSTREAM_TASKS if DOWNSTREAM_TASKS.get(n) is type(self)), type(self).__name__)
            declared = ", ".join(m.key for m in self.metrics)
            raise ConfigError(
                f"downstream task {name!r}: score() returned no {missing[0]!r} (it returned: {', '.join(scores)}; "
                f"declared metrics: {declared}); make score() return every declared key, or fix `metrics`"
            )
        return scores

    @classmethod
    def splits(cls, cfg: DownstreamConfig) -> Splits:
        """train/val/test of ``cfg.data``, with ``cfg.classes`` kept and ``cfg.few_shot`` applied to train."""
        kwargs = {"root": cfg.data.root, "image_size": cfg.data.image_size, "download": cfg.data.download}
        out = {s: build_dataset(cfg.data.name, s, seed=cfg.data.seed, **kwargs) for s in ("train", "val", "test")}
        if cfg.classes is not None:
            out = {s: class_subset(d, cfg.classes) for s, d in out.items()}
        if cfg.few_shot is not None:
            draw = cfg.data.seed if cfg.few_shot_seed is None else cfg.few_shot_seed
            out["train"] = few_shot(out["train"], cfg.few_shot, seed=draw)
        return out

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: DownstreamConfig, splits: Splits) -> DownstreamTask:
        """The task for ``cfg`` (its ``params`` validated by :attr:`Config`) on these splits."""

    @classmethod
    def parse_params(cls, cfg: DownstreamConfig) -> TaskConfig:
        """``cfg.params`` validated by the task's :attr:`Config` (pydantic errors name the key)."""
        return cls.Config(**cfg.params)

    @abc.abstractmethod
    def build_head(self, feature_dim: int) -> nn.Module:
        """A freshly initialised head on top of ``feature_dim``-dimensional backbone features."""

    def build_head_for(self, backbone: nn.Module) -> nn.Module:
        """The head for this ``backbone``: what every stage calls. By default :meth:`build_head` on its
        ``feature_dim``; a dense task (detection) overrides it to read the backbone's feature maps."""
        return self.build_head(feature_dim_of(backbone))

    @abc.abstractmethod
    def prepare(self, batch: Any, device: torch.device, generator: torch.Generator | None) -> Any:
        """Move a loader batch to ``device``; apply the training augmentation when ``generator`` is given."""

    @abc.abstractmethod
    def loss(self, backbone: nn.Module, head: nn.Module, batch: Any) -> Tensor:
        """Scalar downstream loss on a prepared batch."""

    @abc.abstractmethod
    def predict(self, backbone: nn.Module, head: nn.Module, dataset: ImageDataset, device: torch.device) -> Any:
        """Per-sample predictions (and whatever :meth:`score` needs of the targets) on ``dataset``, eval mode."""

    @abc.abstractmethod
    def score(self, predictions: Any) -> dict[str, float]:
        """Every declared metric (and possibly more) of the predictions of a whole split."""

    def evaluate(
        self, backbone: nn.Module, head: nn.Module, dataset: ImageDataset, device: torch.device, precision: str = "fp32"
    ) -> dict[str, float]:
        """Metrics on a whole split, checked against the declared ones: :func:`bissl.eval.task.evaluate_split`."""
        return evaluate_split(self, backbone, head, dataset, device, precision)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode for the duration (each submodule's own mode restored afterwards)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


DOWNSTREAM_TASKS: Registry[type[DownstreamTask]] = Registry("downstream task")


def build_task(cfg: DownstreamConfig, splits: Splits | None = None) -> tuple[DownstreamTask, Splits]:
    """The configured task and its splits (built here unless given), exactly as for a user's task."""
    task_cls = DOWNSTREAM_TASKS.get(cfg.task)
    splits = task_cls.splits(cfg) if splits is None else splits
    return task_cls.from_config(cfg, splits), splits
