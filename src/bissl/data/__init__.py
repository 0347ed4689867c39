"""Datasets, splits, task subsets and batched view augmentations.

Every dataset is built by name through one registry: ``build_dataset(name, split, image_size=...)`` looks up
``DATASETS``; importing this package registers the built-in datasets (``digits`` and its positive controls
``digits_rot90`` / ``digits_mirror``, ``mnist``, ``fashion_mnist``, the paper's datasets and image folders, and the
detection sets ``synthetic_detection``, ``voc_detection``, ``coco_detection``). Users add their own with
``@DATASETS.register("name")`` and the same keyword arguments.
"""

from bissl.data import (  # noqa: F401 - importing registers the datasets
    detection_sets,
    detection_synthetic,
    digits,
    folders,
    mnist,
    paper_sets,
)
from bissl.data.augment import AUGMENTATIONS, ViewConfig, ViewPipeline, build_view_augmentation, normalize
from bissl.data.base import DATASETS, SPLITS, DatasetInfo, ImageDataset, TensorImageDataset
from bissl.data.build import build_dataset
from bissl.data.detection import collate_detection, hflip_detection
from bissl.data.splits import stratified_split
from bissl.data.subsets import class_subset, few_shot

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "SPLITS",
    "DatasetInfo",
    "ImageDataset",
    "TensorImageDataset",
    "ViewConfig",
    "ViewPipeline",
    "build_dataset",
    "build_view_augmentation",
    "class_subset",
    "collate_detection",
    "few_shot",
    "hflip_detection",
    "normalize",
    "stratified_split",
]
