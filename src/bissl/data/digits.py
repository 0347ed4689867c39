"""``digits``: scikit-learn's bundled 8x8 handwritten digits, the default dataset that works offline everywhere.

1,797 grey images with values 0..16 in 10 classes (about 180 each). They are scaled to [0, 1], resized once to
``image_size`` (antialiased bilinear) and kept in memory as uint8. Split: seeded and stratified, 60 / 20 / 20
per cent, i.e. 1,079 train / 359 val / 359 test images for every seed; the same seed gives the same split in
every run. ``mean``/``std`` are measured on the train split at the requested size.

Positive controls (``digits_mirror``, ``digits_rot90``): the same images, each transformed by its label (mirrored
left-right or not; turned by ``k * 90`` degrees), for a study whose pretext augmentation removes exactly that
factor (SimCLR's own ``flip_p: 0.5``; ``rot90_p: 0.75``), so that the label needs what the pretext is trained to
ignore. Premise, measured: small_cnn width 32, 8 px, SimCLR 40 epochs on the control's own images; frozen test
kNN (k=20) / linear probe, %, few-shot means over 3 draws.

===========================================  ===========  ===========  ================
backbone on ``digits_mirror`` (chance 50)    5-shot       10-shot      all 1,079 labels
===========================================  ===========  ===========  ================
SimCLR, mirrored views (``flip_p: 0.5``)     50.2 / 52.0  51.6 / 51.9  90.0 / 88.3
SimCLR, unmirrored views (``flip_p: 0``)     61.3 / 57.8  61.8 / 60.5  95.3 / 91.4
random init                                  55.4 / 53.3  55.1 / 57.5  94.2 / 83.0
===========================================  ===========  ===========  ================

``digits_mirror`` is the control the shipped study uses (``pipeline_positive_control``): with few labels the
flip-invariant backbone is at chance and one pretrained without flips is 10 points above it. With all labels
the factor is still decodable: the invariance mostly lives in SimCLR's projector, not the backbone. The study
uses 25 shots, where the flip-invariant backbone probes at 62.0 / 69.3 (3 draws): with 10, fine-tuning on the
20 images does not learn the factor either (test top-1 56 %), so no method could gain it before fine-tuning.
``digits_rot90`` (chance 25) failed that premise: turned views (55.7 / 53.3 at 5 shots, 87.5 / 83.8 with all
labels), upright views (55.7 / 55.6; 89.4 / 85.0) and random init (54.2 / 53.9; 87.2 / 76.6) probe alike, also
at temperature 0.1 and with a linear projector: turning the views does not reach these backbone features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bissl.data.base import DATASETS, DatasetInfo, Split, TensorImageDataset
from bissl.data.resize import channel_stats, resize_uint8
from bissl.data.splits import fraction_sizes, stratified_split

DIGITS_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test
_PART = {"train": 0, "val": 1, "test": 2}


def _digits_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float images ``[1797, 1, 8, 8]`` in [0, 1] and their digit labels."""
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import and needed only here

    bunch = load_digits()
    return torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1), torch.from_numpy(bunch.target).long()


def _split_dataset(
    images: torch.Tensor, targets: torch.Tensor, split: Split, seed: int, info: DatasetInfo
) -> TensorImageDataset:
    """The ``split`` part of a seeded 60 / 20 / 20 split stratified by ``targets``; mean/std from its train part."""
    parts = stratified_split(targets, fraction_sizes(len(targets), DIGITS_FRACTIONS), seed)
    info.mean, info.std = channel_stats(images[parts[0]])
    index = torch.tensor(parts[_PART[split]], dtype=torch.long)
    return TensorImageDataset(images[index], targets[index], info)


@DATASETS.register("digits")
def build_digits(
    split: Split, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> TensorImageDataset:
    """The ``split`` part of scikit-learn's digits at ``image_size`` px (``root``/``download`` are not needed)."""
    pixels, targets = _digits_pixels()
    info = DatasetInfo(
        name="digits", num_classes=10, channels=1, classes=[str(d) for d in range(10)],
        mirror_invariant=False,  # a mirrored 2, 3, 7 or 9 is no digit (or another one)
    )  # fmt: skip
    return _split_dataset(resize_uint8(pixels, image_size), targets, split, seed, info)


TURN_SEED = 0  # which image gets which transform is part of the dataset: the same for every split seed


def _transformed_digits(
    name: str,
    classes: list[str],
    transform: Callable[[torch.Tensor, int], torch.Tensor],
    image_size: int,
    split: Split,
    seed: int,
) -> TensorImageDataset:
    """Every digit image transformed by ``transform(images, k)`` for a balanced label ``k`` (a fixed seeded
    permutation of the 1,797 images, ``k = rank mod len(classes)``), split like the digits, stratified by ``k``."""
    pixels, _ = _digits_pixels()
    labels = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(TURN_SEED)) % len(classes)
    images = pixels.clone()
    for k in range(1, len(classes)):
        images[labels == k] = transform(pixels[labels == k], k)
    info = DatasetInfo(name=name, num_classes=len(classes), channels=1, classes=classes, mirror_invariant=False)
    return _split_dataset(resize_uint8(images, image_size), labels, split, seed, info)


@DATASETS.register("digits_rot90")
def build_digits_rot90(
    split: Split, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> TensorImageDataset:
    """The digits, each turned by ``k * 90`` degrees; the label is ``k`` (4 classes, balanced; measured in the
    module docstring)."""
    turn = lambda images, k: torch.rot90(images, k, dims=(2, 3))  # noqa: E731
    return _transformed_digits("digits_rot90", ["0", "90", "180", "270"], turn, image_size, split, seed)


@DATASETS.register("digits_mirror")
def build_digits_mirror(
    split: Split, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> TensorImageDataset:
    """The digits, half of them mirrored left-right; the label is whether the image is mirrored (2 classes; premise
    measured in the module docstring)."""
    mirror = lambda images, k: torch.flip(images, dims=(3,))  # noqa: E731
    return _transformed_digits("digits_mirror", ["as written", "mirrored"], mirror, image_size, split, seed)
