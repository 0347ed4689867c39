"""The lazy image dataset every on-disk loader builds: decoding, resizing, subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_trees import write_image
from PIL import Image

from bissl.data.base import DatasetInfo
from bissl.data.lazy import ArrayImages, FileImages, LazyImageDataset, natural_image_info, resize_center_crop
from bissl.data.locate import carve
from bissl.utils.errors import ConfigError, DataError


def test_resize_scales_the_shorter_side_and_crops_the_centre() -> None:
    array = np.zeros((10, 40, 3), dtype=np.uint8)  # height 10, width 40, black left and right edges
    array[:, 5:35] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(array), 5))  # 20 x 5, centre 5 x 5 kept
    assert out.shape == (5, 5, 3) and out.min() == 255
    same = Image.fromarray(array[:, :10])
    assert resize_center_crop(same, 10) is same


def test_any_image_mode_and_large_jpegs_come_out_rgb_at_the_requested_size(tmp_path: Path) -> None:
    Image.new("L", (9, 7), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (7, 9), (255, 0, 0, 0)).save(tmp_path / "alpha.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "palette.gif")
    write_image(tmp_path / "big.jpg", size=(400, 250))  # decoded at reduced scale, shorter side still >= 20
    paths = sorted(tmp_path.iterdir())
    dataset = LazyImageDataset.from_files(paths, [0] * len(paths), natural_image_info("t", ["a"]), image_size=20)
    assert FileImages([tmp_path / "big.jpg"]).load(0, 20).size[1] >= 20
    for index in range(len(paths)):
        image, _ = dataset[index]
        assert image.shape == (3, 20, 20) and image.min() >= 0 and image.max() <= 1
    assert torch.allclose(dataset[paths.index(tmp_path / "gray.png")][0], torch.full((3, 20, 20), 128 / 255))


def test_subset_stays_lazy_and_keeps_labels_aligned() -> None:
    array = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1).repeat(3, axis=1)  # image i is constant i
    dataset = LazyImageDataset(ArrayImages(array, to_hwc=(1, 2, 0)), [0, 1, 0, 1, 0, 1], DatasetInfo("t", 2, 3), 2)
    part = dataset.subset([5, 2]).subset([1])
    image, label = part[0]
    assert len(part) == 1 and label == 0 and torch.allclose(image, torch.full((3, 2, 2), 2 / 255))
    assert len(dataset) == 6 and isinstance(part.images, ArrayImages)


def test_mismatched_labels_and_bad_splits_are_rejected(tmp_path: Path) -> None:
    info = natural_image_info("t", ["a"])
    with pytest.raises(DataError, match="2 images but 1 labels"):
        LazyImageDataset.from_files([tmp_path / "a.jpg", tmp_path / "b.jpg"], [0], info, 4)
    dataset = LazyImageDataset.from_files([tmp_path / f"{i}.jpg" for i in range(20)], [0] * 20, info, 4)
    with pytest.raises(ValueError, match="does not carve a test split"):
        carve(dataset, "test", 0, test=False)
    assert [len(carve(dataset, s, 0, test=True)) for s in ("train", "val", "test")] == [16, 2, 2]
    from bissl.data.paper_sets import dtd

    with pytest.raises(ConfigError, match="unknown split 'trainval'"):
        dtd("trainval", root=tmp_path, image_size=4)
