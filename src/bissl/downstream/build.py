"""Config -> downstream task and its labelled train/val/test splits."""

from __future__ import annotations

from bissl.config import DownstreamConfig
from bissl.data import build_dataset
from bissl.data.augment import build_view_augmentation
from bissl.data.base import ImageDataset
from bissl.data.subsets import class_subset, few_shot
from bissl.downstream.base import DOWNSTREAM_TASKS, DownstreamTask
from bissl.downstream.classification import ClassificationTask
from bissl.utils.errors import ConfigError


def build_splits(cfg: DownstreamConfig) -> dict[str, ImageDataset]:
    """train/val/test of the task's dataset, with ``classes`` kept and ``few_shot`` applied to train."""
    kwargs = {"root": cfg.data.root, "image_size": cfg.data.image_size, "download": cfg.data.download}
    splits = {s: build_dataset(cfg.data.name, s, seed=cfg.data.seed, **kwargs) for s in ("train", "val", "test")}
    if splits["train"].info.num_classes == 0:
        raise ConfigError(f"downstream.data.name={cfg.data.name!r} has no labels; choose a labelled dataset")
    if cfg.classes is not None:
        splits = {s: class_subset(d, cfg.classes) for s, d in splits.items()}
    if cfg.few_shot is not None:
        splits["train"] = few_shot(splits["train"], cfg.few_shot, seed=cfg.data.seed)
    return splits


def build_task(cfg: DownstreamConfig, train_set: ImageDataset) -> DownstreamTask:
    """The configured task for ``train_set``'s classes; user tasks registered in DOWNSTREAM_TASKS
    are built with ``cls.from_config(cfg, train_set)``."""
    task_cls = DOWNSTREAM_TASKS.get(cfg.task)
    if task_cls is not ClassificationTask:
        return task_cls.from_config(cfg, train_set)  # type: ignore[attr-defined]
    info = train_set.info
    augment = None
    if cfg.augment:
        views = build_view_augmentation(
            "supervised", image_size=cfg.data.image_size, channels=info.channels, mean=info.mean, std=info.std
        )
        augment = lambda images, generator: views(images, generator)[0]  # noqa: E731 - one supervised view
    return ClassificationTask(
        info.num_classes, mean=info.mean, std=info.std, train_augment=augment, label_smoothing=cfg.label_smoothing
    )
