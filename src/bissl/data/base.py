"""What every dataset in bissl is: images as float tensors in [0, 1] with integer labels.

Loaders resize images to one square ``image_size`` at load time so that batches stack and view
augmentations run batched, per sample, on any device (``bissl.data.augment``). Normalisation with the
dataset's ``mean``/``std`` happens in the augmentation / eval transform, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import Dataset

from bissl.utils.errors import DataError
from bissl.utils.registry import Registry

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
UNLABELLED = -1


@dataclass
class DatasetInfo:
    """Static facts about a dataset that models and tasks need, and how its fine-tuning augmentation may move it.

    Fine-tuning (classification) trains on a random resized crop with area fraction ``~ U(finetune_crop_scale)``,
    mirrored with probability 0.5 when ``mirror_invariant`` (:func:`bissl.data.augment.finetune_view_settings`).
    A dataset whose mirror images can change the label (digits, letters, text) declares ``mirror_invariant=False``;
    ``finetune_crop_scale=None`` takes a range sized to the image (:func:`bissl.data.augment.finetune_crop_scale`).
    A user's dataset declares both the same way, e.g.
    ``DatasetInfo("glyphs", num_classes=26, channels=1, mirror_invariant=False, finetune_crop_scale=(0.9, 1.0))``.
    """

    name: str
    num_classes: int  # 0 for unlabelled data
    channels: int
    classes: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    multi_label: bool = False  # VOC07: targets are multi-hot vectors
    mirror_invariant: bool = True  # a horizontal mirror keeps every label: fine-tuning flips with p = 0.5
    finetune_crop_scale: tuple[float, float] | None = None  # crop area fraction; None: sized to the image
    # what an item's target is: "classification" (an int label, or a multi-hot tensor when multi_label) or
    # "detection" (a dict of boxes, labels, difficult: bissl.data.detection); code that needs class labels per image
    # (kNN, linear probes, few-shot subsets) may skip a dataset that is not "classification"
    kind: str = "classification"


class ImageDataset(Dataset[tuple[torch.Tensor, int | torch.Tensor]]):
    """Base class: ``dataset[i] -> (image[C, S, S] float in [0, 1], label)``; ``label = -1`` if unlabelled.

    ``targets`` lists every label (used by samplers, few-shot splits and class subsets).
    """

    info: DatasetInfo
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)


class TensorImageDataset(ImageDataset):
    """A dataset held in memory as uint8 ``images[N, C, S, S]``; fast enough for MNIST-sized data."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | torch.Tensor, info: DatasetInfo) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape [N, C, H, W]")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.info = info
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} targets")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), self.targets[index]


DatasetBuilder = Callable[..., ImageDataset]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def missing_data_error(name: str, looked_in: Sequence[str], how: str) -> DataError:
    """The one-line error for data that is not on disk: which dataset, where we looked, how to get it."""
    places = ", ".join(str(p) for p in looked_in) or "(no root given)"
    return DataError(f"dataset {name!r} not found (looked in: {places}); {how}")


def collate_of(dataset: Dataset) -> Callable[[list], object] | None:  # type: ignore[type-arg]
    """The ``collate`` a dataset declares for items that do not stack (detection targets: a list of dicts), looked
    up through wrappers (``Subset``-like ``.dataset``); ``None``: the default collate."""
    while dataset is not None:
        collate = getattr(type(dataset), "collate", None)
        if collate is not None:
            return getattr(dataset, "collate")  # noqa: B009 - bound or static, as the dataset declares it
        dataset = getattr(dataset, "dataset", None)
    return None
