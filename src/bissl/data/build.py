"""``build_dataset``: the one entry point from a dataset name in a config to an :class:`ImageDataset`."""

from __future__ import annotations

from bissl.data.base import DATASETS, SPLITS, ImageDataset
from bissl.utils.errors import ConfigError


def build_dataset(
    name: str, split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """The ``split`` ("train", "val" or "test") of the dataset registered as ``name`` in ``DATASETS``.

    Items are ``(float image [C, image_size, image_size] in [0, 1], label)``; ``seed`` fixes the dataset's
    train/val(/test) partition; nothing is downloaded unless ``download`` is true.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    builder = DATASETS.get(name)
    return builder(split=split, root=root, image_size=image_size, download=download, seed=seed)
