"""Datasets decoded lazily, one image per item: the loaders of large on-disk datasets all build one of these.

An *image source* yields PIL images by index (files on disk, rows of an in-memory array, or rows of a binary
file read through a memory map); :class:`LazyImageDataset` pairs a source with labels, resizes each image
(shorter side to ``image_size``, then a centre crop) and returns float tensors in [0, 1]. Nothing is decoded
up front and no whole-dataset tensor is ever built.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

from bissl.data.base import DatasetInfo, ImageDataset
from bissl.utils.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

SourceT = TypeVar("SourceT", bound="ImageSource")
DatasetT = TypeVar("DatasetT", bound="LazyImageDataset")


class ImageSource(Protocol):
    """A sequence of images, decoded on access."""

    def __len__(self) -> int: ...

    def load(self, index: int, size: int) -> Image.Image:
        """The RGB image at ``index``; ``size`` is the side it will be resized to (a decoding hint only)."""
        ...

    def subset(self: SourceT, indices: Sequence[int]) -> SourceT: ...


def natural_image_info(name: str, classes: Sequence[str], *, multi_label: bool = False) -> DatasetInfo:
    """A :class:`DatasetInfo` for an RGB dataset of natural images (ImageNet normalisation statistics)."""
    return DatasetInfo(
        name=name,
        num_classes=len(classes),
        channels=3,
        classes=list(classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        multi_label=multi_label,
    )


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize (bilinear) so that the shorter side is ``size``, then crop the central ``size x size`` square."""
    width, height = image.size
    if width == height == size:
        return image
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor ``[3, H, W]`` in [0, 1]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div_(255.0)


class FileImages:
    """Image files decoded with PIL on access.

    JPEGs much larger than the target size are decoded at a reduced DCT scale (PIL's ``draft``; the shorter side
    stays >= ``size``), which makes decoding full-resolution photographs for small training images several times
    faster.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.paths = [str(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, size: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image.draft("RGB", (size, size))
                return image.convert("RGB")
        except (OSError, ValueError) as exc:  # missing, truncated or not an image
            raise DataError(f"cannot read image {path} ({exc}); restore or delete the file") from exc

    def subset(self, indices: Sequence[int]) -> FileImages:
        return FileImages([self.paths[i] for i in indices])


class _RowImages:
    """Images stored as rows of a uint8 array; ``to_hwc`` permutes one row into height x width x channels."""

    def __init__(self, to_hwc: tuple[int, int, int], rows: np.ndarray) -> None:
        self.to_hwc = to_hwc
        self.rows = rows

    def _array(self) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, size: int) -> Image.Image:
        row = self._array()[self.rows[index]]
        return Image.fromarray(np.ascontiguousarray(row.transpose(self.to_hwc))).convert("RGB")

    def subset(self: SourceT, indices: Sequence[int]) -> SourceT:
        new = copy.copy(self)
        new.rows = self.rows[np.asarray(indices, dtype=np.int64)]
        return new


class ArrayImages(_RowImages):
    """Images held in memory as a uint8 array ``[N, ...]`` (e.g. CIFAR's pickled batches, which store it so)."""

    def __init__(self, array: np.ndarray, to_hwc: tuple[int, int, int]) -> None:
        super().__init__(to_hwc, np.arange(len(array)))
        self.array = array

    def _array(self) -> np.ndarray:
        return self.array


class BinaryFileImages(_RowImages):
    """Images stored back to back as raw uint8 in a binary file (e.g. STL-10), read through a memory map.

    The map is opened on first access and not pickled, so DataLoader workers each open their own.
    """

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, int, int], to_hwc: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.shape = shape
        row_bytes = int(np.prod(shape))
        count, remainder = divmod(self.path.stat().st_size, row_bytes)
        if remainder:
            raise DataError(f"{self.path} is truncated or not {shape} uint8 images; re-download the dataset")
        super().__init__(to_hwc, np.arange(count))
        self._map: np.ndarray | None = None

    def _array(self) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r").reshape(-1, *self.shape)
        return self._map

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_map": None}


class LazyImageDataset(ImageDataset):
    """``dataset[i] -> (image [3, image_size, image_size] float in [0, 1], label)``, decoded on access."""

    def __init__(self, images: ImageSource, targets: Sequence[int], info: DatasetInfo, image_size: int) -> None:
        if len(images) != len(targets):
            raise DataError(
                f"dataset {info.name!r}: {len(images)} images but {len(targets)} labels; the index is corrupt"
            )
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.info = info
        self.image_size = image_size

    @classmethod
    def from_files(
        cls, paths: Sequence[str | os.PathLike[str]], targets: Sequence[int], info: DatasetInfo, image_size: int
    ) -> LazyImageDataset:
        """The dataset of image files ``paths`` with labels ``targets``."""
        return cls(FileImages(paths), targets, info, image_size)

    def image(self, index: int) -> torch.Tensor:
        """The resized image tensor at ``index``, without its label."""
        return image_to_tensor(resize_center_crop(self.images.load(index, self.image_size), self.image_size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        return self.image(index), self.targets[index]

    def subset(self: DatasetT, indices: Sequence[int]) -> DatasetT:
        """The items at ``indices`` (still lazy, same info)."""
        new = copy.copy(self)
        new.images = self.images.subset(indices)
        new.targets = [self.targets[i] for i in indices]
        return new


class MultiLabelImageDataset(LazyImageDataset):
    """Multi-label data (VOC07): the label is a multi-hot float tensor ``[num_classes]``.

    ``difficult[i, c]`` marks objects flagged difficult (already counted positive in the label), so that an
    evaluator can ignore them as the VOC protocol does; ``targets[i]`` is the image's first positive class, kept
    for samplers and stratified splits that need one integer per image.
    """

    def __init__(
        self, images: ImageSource, multi_hot: torch.Tensor, difficult: torch.Tensor, info: DatasetInfo, image_size: int
    ) -> None:
        super().__init__(images, multi_hot.argmax(dim=1).tolist(), info, image_size)
        self.multi_hot = multi_hot.float()
        self.difficult = difficult.bool()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(index), self.multi_hot[index].clone()

    def subset(self, indices: Sequence[int]) -> MultiLabelImageDataset:
        new = super().subset(indices)
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        new.multi_hot, new.difficult = self.multi_hot[rows], self.difficult[rows]
        return new
