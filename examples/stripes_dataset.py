"""A dataset plug-in: noisy stripes whose class is their direction (horizontal, vertical, diagonal).

bissl pretrain --plugin examples/stripes_dataset.py data.name=example_stripes data.image_size=16
"""

from __future__ import annotations

import torch

from bissl.data import DATASETS, DatasetInfo, TensorImageDataset

SIZES = {"train": 600, "val": 150, "test": 150}


@DATASETS.register("example_stripes")
def example_stripes(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> TensorImageDataset:
    """``split`` of a generated set, the same for the same ``seed`` (``root``, ``download``: nothing to read)."""
    gen = torch.Generator().manual_seed(10 * seed + list(SIZES).index(split))
    n = SIZES[split]
    labels = torch.randint(0, 3, (n, 1, 1), generator=gen)
    period = torch.randint(3, 7, (n, 1, 1), generator=gen).float()
    rows, cols = torch.meshgrid(torch.arange(image_size).float(), torch.arange(image_size).float(), indexing="ij")
    along = torch.where(labels == 0, rows, torch.where(labels == 1, cols, rows + cols))
    wave = 0.5 + 0.5 * torch.sin(2 * torch.pi * (along / period + torch.rand(n, 1, 1, generator=gen)))
    noisy = (wave + 0.1 * torch.randn(n, image_size, image_size, generator=gen)).clamp(0, 1)
    info = DatasetInfo(
        "example_stripes", num_classes=3, channels=1, classes=["horizontal", "vertical", "diagonal"],
        mean=(0.5,), std=(0.36,), mirror_invariant=False,  # a mirror turns one diagonal into the other
    )  # fmt: skip
    return TensorImageDataset((noisy * 255).round().to(torch.uint8).unsqueeze(1), labels.flatten(), info)
