from __future__ import annotations

from collections import Counter

import pytest
import torch

from bissl.data import DatasetInfo, TensorImageDataset, class_subset, few_shot
from bissl.utils.errors import ConfigError


def toy(counts: tuple[int, ...] = (6, 5, 8, 4)) -> TensorImageDataset:
    """``counts[c]`` images of class c; image i is filled with the value i, so items can be traced back."""
    targets = [c for c, n in enumerate(counts) for _ in range(n)]
    images = torch.arange(len(targets), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    info = DatasetInfo(name="toy", num_classes=len(counts), channels=1, classes=["a", "b", "c", "d"][: len(counts)])
    return TensorImageDataset(images, targets, info)


def origin(item: tuple[torch.Tensor, int]) -> int:
    return round(item[0][0, 0, 0].item() * 255)


def test_few_shot_takes_k_per_class_seeded() -> None:
    dataset = toy()
    subset = few_shot(dataset, k=3, seed=0)
    assert len(subset) == 12 and Counter(subset.targets) == dict.fromkeys(range(4), 3)
    for index in range(len(subset)):
        assert dataset.targets[origin(subset[index])] == subset[index][1] == subset.targets[index]
    assert subset.info is dataset.info
    assert few_shot(dataset, k=3, seed=0).indices == subset.indices
    assert any(few_shot(dataset, k=3, seed=s).indices != subset.indices for s in range(1, 4))


def test_few_shot_fails_clearly_for_small_classes() -> None:
    with pytest.raises(ConfigError, match=r"class 3 \('d'\) of dataset 'toy' has only 4 images, fewer than k=5"):
        few_shot(toy(), k=5, seed=0)
    with pytest.raises(ConfigError, match="k >= 1"):
        few_shot(toy(), k=0, seed=0)


def test_class_subset_keeps_and_relabels_in_the_given_order() -> None:
    dataset = toy()
    subset = class_subset(dataset, [2, 0])
    assert len(subset) == 8 + 6 and Counter(subset.targets) == {0: 8, 1: 6}
    assert subset.info.num_classes == 2 and subset.info.classes == ["c", "a"]
    assert subset.info.mean == dataset.info.mean and dataset.info.num_classes == 4  # original untouched
    for index in range(len(subset)):
        old_label = dataset.targets[origin(subset[index])]
        assert subset[index][1] == {2: 0, 0: 1}[old_label] == subset.targets[index]


def test_class_subset_then_few_shot() -> None:
    subset = few_shot(class_subset(toy(), [1, 3]), k=4, seed=1)
    assert Counter(subset.targets) == {0: 4, 1: 4} and subset.info.classes == ["b", "d"]


def test_class_subset_rejects_bad_classes() -> None:
    with pytest.raises(ConfigError, match=r"classes \[4\] do not exist"):
        class_subset(toy(), [0, 4])
    with pytest.raises(ConfigError, match="distinct"):
        class_subset(toy(), [1, 1])
    with pytest.raises(ConfigError, match="distinct"):
        class_subset(toy(), [])
