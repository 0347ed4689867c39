"""A stand-in for the shared synthetic detection data (branch det-data), with the same interface: seeded coloured
rectangles on noise. Importing it registers ``synthetic_detection`` unless the real dataset is already registered."""

from __future__ import annotations

import torch

from bissl.data.base import DATASETS, DatasetInfo, ImageDataset
from bissl.utils.seed import make_generator

COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.2, 1.0]])
SIZES = {"train": 256, "val": 64, "test": 64}


class FakeDetection(ImageDataset):
    """``K = 3`` classes (the rectangle's colour), 1-3 objects per image, side 8-24 px at 64 px."""

    def __init__(
        self, split: str, *, image_size: int = 64, seed: int = 0, size: int | None = None, channels: int = 3
    ) -> None:
        n = size or SIZES[split]
        g = make_generator(seed, "fake_detection", split)
        self.images = torch.rand(n, 3, image_size, image_size, generator=g) * 0.3
        self.boxes: list[dict[str, torch.Tensor]] = []
        scale = image_size / 64
        for i in range(n):
            count = int(torch.randint(1, 4, (1,), generator=g))
            side = (torch.randint(8, 25, (count, 2), generator=g) * scale).round()
            x0 = (torch.rand(count, generator=g) * (image_size - side[:, 0])).floor()
            y0 = (torch.rand(count, generator=g) * (image_size - side[:, 1])).floor()
            labels = torch.randint(0, 3, (count,), generator=g)
            boxes = torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], 1)
            for (a, b, c, d), label in zip(boxes.long().tolist(), labels.tolist(), strict=True):
                self.images[i, :, b:d, a:c] = COLOURS[label][:, None, None]
            self.boxes.append(
                {"boxes": boxes.float(), "labels": labels, "difficult": torch.zeros(count, dtype=torch.bool)}
            )
        if channels == 1:
            self.images = self.images.mean(dim=1, keepdim=True)
        self.targets = [int(t["labels"][0]) for t in self.boxes]
        self.info = DatasetInfo("synthetic_detection", num_classes=3, channels=channels, mean=(0.3,) * channels,
                                std=(0.3,) * channels, kind="detection")  # fmt: skip

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        return self.images[index], self.boxes[index]

    @staticmethod
    def collate(batch):  # type: ignore[no-untyped-def]
        images, targets = zip(*batch, strict=True)
        return torch.stack(images), list(targets)


if "synthetic_detection" not in DATASETS:

    @DATASETS.register("synthetic_detection")
    def synthetic_detection(split: str, *, seed: int = 0, image_size: int = 64, **_: object) -> FakeDetection:
        return FakeDetection(split, image_size=image_size, seed=seed)


if "fake_detection_gray" not in DATASETS:

    @DATASETS.register("fake_detection_gray")
    def fake_detection_gray(split: str, *, seed: int = 0, image_size: int = 32, **_: object) -> FakeDetection:
        """One channel, small: a detection task beside the embedded digits in one study (tests only)."""
        return FakeDetection(split, image_size=image_size, seed=seed, size=SIZES[split] // 8, channels=1)
