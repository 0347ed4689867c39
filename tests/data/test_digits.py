"""The embedded default dataset and ``build_dataset``."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from bissl.data import DATASETS, build_dataset
from bissl.data.resize import channel_stats, resize_uint8
from bissl.utils.errors import ConfigError

SIZES = {"train": 1079, "val": 359, "test": 359}


@pytest.fixture(scope="module")
def splits() -> dict[str, torch.utils.data.Dataset]:
    return {split: build_dataset("digits", split, image_size=16) for split in SIZES}


def test_split_sizes_items_and_info(splits) -> None:
    for split, size in SIZES.items():
        dataset = splits[split]
        assert len(dataset) == size == len(dataset.targets)
        image, label = dataset[0]
        assert image.shape == (1, 16, 16) and image.dtype == torch.float32
        assert isinstance(label, int) and label == dataset.targets[0]
        assert dataset.images.min() >= 0 and dataset.images.max() <= 255
        assert dataset.info.num_classes == 10 and dataset.info.channels == 1
        assert dataset.info.classes == [str(d) for d in range(10)]
        assert sorted(set(dataset.targets)) == list(range(10))  # stratified: every class in every split
    values = torch.stack([splits["val"][i][0] for i in range(len(splits["val"]))])
    assert values.min() >= 0.0 and values.max() <= 1.0


def _rows(images: torch.Tensor, targets: list[int]) -> list[tuple[bytes, int]]:
    return [(image.numpy().tobytes(), label) for image, label in zip(images, targets, strict=True)]


def test_splits_partition_the_whole_dataset(splits) -> None:
    bunch = load_digits()
    full = resize_uint8(torch.from_numpy(bunch.images).float().div(16).unsqueeze(1), 16)
    together = [row for d in splits.values() for row in _rows(d.images, d.targets)]
    assert sorted(together) == sorted(_rows(full, bunch.target.tolist()))


def test_split_is_deterministic_per_seed(splits) -> None:
    again = build_dataset("digits", "train", image_size=16)
    assert torch.equal(again.images, splits["train"].images) and again.targets == splits["train"].targets
    other = build_dataset("digits", "train", image_size=16, seed=1)
    assert len(other) == SIZES["train"] and not torch.equal(other.images, splits["train"].images)


def test_mean_std_are_those_of_the_train_split(splits) -> None:
    train = splits["train"].images.double() / 255
    for dataset in splits.values():
        assert dataset.info.mean == pytest.approx((train.mean().item(),))
        assert dataset.info.std == pytest.approx((train.std().item(),))


def test_native_size_is_the_exact_rescaled_data_and_resizing_keeps_the_mean() -> None:
    native = build_dataset("digits", "test", image_size=8)
    bunch = load_digits()
    expected = torch.from_numpy(bunch.images).div(16).mul(255).round().to(torch.uint8)
    rows = {row for row in _rows(expected.unsqueeze(1), bunch.target.tolist())}
    assert all(row in rows for row in _rows(native.images, native.targets))
    for size in (4, 32):
        resized = build_dataset("digits", "test", image_size=size)
        assert resized.images.shape == (359, 1, size, size)
        assert resized.images.float().mean() == pytest.approx(native.images.float().mean().item(), rel=0.03)


def test_resize_and_stats_helpers() -> None:
    images = torch.randint(0, 256, (5, 3, 9, 9), dtype=torch.uint8)
    assert torch.equal(resize_uint8(images, 9), images)
    assert resize_uint8(images.float() / 255, 9).sub(images.int()).abs().max() == 0
    assert resize_uint8(images, 4, chunk=2).shape == (5, 3, 4, 4)
    mean, std = channel_stats(images)
    flat = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(flat.mean(1).tolist()) and std == pytest.approx(flat.std(1).tolist())


def test_build_dataset_rejects_bad_arguments() -> None:
    assert {"digits", "mnist", "fashion_mnist"} <= set(DATASETS.names())
    with pytest.raises(ConfigError, match="unknown split 'training'"):
        build_dataset("digits", "training", image_size=8)
    with pytest.raises(ConfigError, match=r"unknown dataset 'digitz'.*digits"):
        build_dataset("digitz", "train", image_size=8)
    with pytest.raises(ConfigError, match="image_size"):
        build_dataset("digits", "train", image_size=0)


def _all_rows(name: str, seed: int, undo=None) -> list[tuple[bytes, int]]:
    """Every image of every split (undone by its label with ``undo``), as sorted byte rows."""
    rows = []
    for split in SIZES:
        data = build_dataset(name, split, image_size=8, seed=seed)
        pairs = zip(data.images, data.targets, strict=True)
        images = data.images if undo is None else torch.stack([undo(x, k) for x, k in pairs])
        rows += _rows(images, [0] * len(data))
    return sorted(rows)


@pytest.mark.parametrize(
    ("name", "undo"),
    [("digits_rot90", lambda image, k: torch.rot90(image, -k, dims=(1, 2))),
     ("digits_mirror", lambda image, k: image.flip(-1) if k else image)],
)  # fmt: skip
def test_positive_controls_label_the_transform_of_each_digit(name, undo) -> None:
    """Undoing each image's label-transform gives back exactly the digits; labels are balanced in every split."""
    assert _all_rows(name, 1, undo) == _all_rows("digits", 0)
    for split in SIZES:
        counts = torch.bincount(torch.tensor(build_dataset(name, split, image_size=8).targets))
        assert counts.max() - counts.min() <= 1
