"""``build_dataset``: the one entry point from a dataset name in a config to an :class:`ImageDataset`.

A dataset (built-in or a plug-in's) is a builder registered in ``DATASETS`` with the signature
``build(split, *, root, image_size, download, seed) -> ImageDataset`` (example: ``examples/stripes_dataset.py``).
"""

from __future__ import annotations

import inspect

from bissl.data.base import DATASETS, SPLITS, DatasetBuilder, ImageDataset
from bissl.utils.errors import ConfigError

BUILDER_SIGNATURE = "build(split, *, root, image_size, download, seed)"


def dataset_builder(name: str, key: str = "data.name") -> DatasetBuilder:
    """The builder registered as ``name``, checked to accept the arguments :func:`build_dataset` passes, so that a
    plug-in's wrong signature is one line naming the config ``key`` before any run folder exists."""
    builder = DATASETS.get(name)
    try:
        inspect.signature(builder).bind(split="train", root=None, image_size=1, download=False, seed=0)
    except TypeError as exc:
        raise ConfigError(
            f"bad config value for {key!r}: the builder of dataset {name!r} cannot be called as {BUILDER_SIGNATURE} "
            f"({exc}); give it that signature"
        ) from None
    return builder


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
    builder = dataset_builder(name)
    return builder(split=split, root=root, image_size=image_size, download=download, seed=seed)
