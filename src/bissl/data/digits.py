"""``digits``: scikit-learn's bundled 8x8 handwritten digits, the default dataset that works offline everywhere.

1,797 grey images with values 0..16 in 10 classes (about 180 each). They are scaled to [0, 1], resized once to
``image_size`` (antialiased bilinear) and kept in memory as uint8. Split: seeded and stratified, 60 / 20 / 20
per cent, i.e. 1,079 train / 359 val / 359 test images for every seed; the same seed gives the same split in
every run. ``mean``/``std`` are measured on the train split at the requested size.
"""

from __future__ import annotations

import torch

from bissl.data.base import DATASETS, DatasetInfo, Split, TensorImageDataset
from bissl.data.resize import channel_stats, resize_uint8
from bissl.data.splits import fraction_sizes, stratified_split

DIGITS_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test
_PART = {"train": 0, "val": 1, "test": 2}


@DATASETS.register("digits")
def build_digits(
    split: Split, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> TensorImageDataset:
    """The ``split`` part of scikit-learn's digits at ``image_size`` px (``root``/``download`` are not needed)."""
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import and needed only here

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    images = resize_uint8(pixels, image_size)
    targets = torch.from_numpy(bunch.target).long()
    parts = stratified_split(targets, fraction_sizes(len(targets), DIGITS_FRACTIONS), seed)
    mean, std = channel_stats(images[parts[0]])
    info = DatasetInfo(
        name="digits", num_classes=10, channels=1, classes=[str(d) for d in range(10)], mean=mean, std=std,
        mirror_invariant=False,  # a mirrored 2, 3, 7 or 9 is no digit (or another one)
    )  # fmt: skip
    index = torch.tensor(parts[_PART[split]], dtype=torch.long)
    return TensorImageDataset(images[index], targets[index], info)
