"""Labelled subsets that define downstream tasks: ``few_shot`` (k images per class) and ``class_subset``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from bissl.data.base import DatasetInfo, ImageDataset
from bissl.utils.errors import ConfigError
from bissl.utils.seed import derive_seed


class SubsetDataset(ImageDataset):
    """The items ``indices`` of ``dataset``, labels mapped through ``label_map`` (old label -> new label)."""

    def __init__(
        self,
        dataset: ImageDataset,
        indices: Sequence[int],
        label_map: dict[int, int] | None = None,
        info: DatasetInfo | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.label_map = label_map
        self.info = info if info is not None else dataset.info
        self.targets = [self._map(dataset.targets[i]) for i in self.indices]

    def _map(self, label: int) -> int:
        return label if self.label_map is None else self.label_map[label]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[self.indices[index]]
        return image, self._map(int(label))


def _require_single_label(dataset: ImageDataset, what: str) -> None:
    if dataset.info.multi_label or dataset.info.num_classes < 1:
        raise ConfigError(f"{what} needs a single-label classification dataset; {dataset.info.name!r} is not one")


def few_shot(dataset: ImageDataset, k: int, seed: int) -> SubsetDataset:
    """``k`` images of every class of ``dataset``, drawn without replacement with a generator seeded by ``seed``.

    The result has ``k * num_classes`` items in the original order; unlabelled items (label -1) are never drawn.
    """
    _require_single_label(dataset, "few_shot")
    if k < 1:
        raise ConfigError(f"few_shot needs k >= 1 images per class, got k={k}")
    targets = torch.tensor(dataset.targets, dtype=torch.long)
    generator = torch.Generator().manual_seed(derive_seed("few_shot", seed))
    chosen: list[torch.Tensor] = []
    for cls in range(dataset.info.num_classes):
        members = (targets == cls).nonzero().squeeze(1)
        if members.numel() < k:
            name = dataset.info.classes[cls] if cls < len(dataset.info.classes) else str(cls)
            raise ConfigError(
                f"few_shot: class {cls} ({name!r}) of dataset {dataset.info.name!r} has only {members.numel()} "
                f"images, fewer than k={k}; lower k"
            )
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:k]])
    return SubsetDataset(dataset, torch.cat(chosen).sort().values.tolist())


def class_subset(dataset: ImageDataset, classes: Sequence[int]) -> SubsetDataset:
    """The items of ``dataset`` whose label is in ``classes``, relabelled ``classes[i] -> i``.

    ``info`` gets ``num_classes = len(classes)`` and the matching class names; mean/std are kept.
    """
    _require_single_label(dataset, "class_subset")
    wanted = [int(c) for c in classes]
    if not wanted or len(set(wanted)) != len(wanted):
        raise ConfigError(f"class_subset needs distinct classes, got {list(classes)}")
    bad = [c for c in wanted if not 0 <= c < dataset.info.num_classes]
    if bad:
        raise ConfigError(
            f"class_subset: classes {bad} do not exist in {dataset.info.name!r} "
            f"(labels 0..{dataset.info.num_classes - 1})"
        )
    label_map = {old: new for new, old in enumerate(wanted)}
    names = [dataset.info.classes[c] for c in wanted] if dataset.info.classes else []
    info = dataclasses.replace(dataset.info, num_classes=len(wanted), classes=names)
    indices = [i for i, label in enumerate(dataset.targets) if label in label_map]
    return SubsetDataset(dataset, indices, label_map, info)
