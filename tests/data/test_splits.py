from __future__ import annotations

from collections import Counter

import pytest
import torch

from bissl.data.splits import fraction_sizes, stratified_split


def test_fraction_sizes_give_the_rest_to_the_first_part() -> None:
    assert fraction_sizes(1797, (0.6, 0.2, 0.2)) == [1079, 359, 359]
    assert fraction_sizes(60_000, (11 / 12, 1 / 12)) == [55_000, 5_000]
    assert fraction_sizes(7, (1.0,)) == [7]
    with pytest.raises(ValueError, match="sum to 1"):
        fraction_sizes(10, (0.5, 0.6))


def _labels(n: int = 1000, classes: int = 7) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(3))


def test_parts_have_exact_sizes_and_partition_the_indices() -> None:
    labels = _labels()
    parts = stratified_split(labels, [700, 200, 100], seed=0)
    assert [len(p) for p in parts] == [700, 200, 100]
    assert sorted(i for part in parts for i in part) == list(range(1000))
    assert all(part == sorted(part) for part in parts)


def test_every_class_is_spread_in_proportion() -> None:
    labels = _labels()
    counts = Counter(labels.tolist())
    parts = stratified_split(labels, [700, 200, 100], seed=0)
    for part, fraction in zip(parts, (0.7, 0.2, 0.1), strict=True):
        in_part = Counter(labels[part].tolist())
        for cls, total in counts.items():
            assert abs(in_part[cls] - fraction * total) <= 1.5


def test_same_seed_same_split_other_seed_other_split() -> None:
    labels = _labels().tolist()  # a plain list works as well as a tensor
    first = stratified_split(labels, [800, 200], seed=5)
    assert stratified_split(labels, [800, 200], seed=5) == first
    assert stratified_split(torch.tensor(labels), [800, 200], seed=5) == first
    assert stratified_split(labels, [800, 200], seed=6) != first


def test_sizes_must_add_up() -> None:
    with pytest.raises(ValueError, match="sum to the dataset size"):
        stratified_split([0, 1, 0], [1, 1], seed=0)


def test_a_class_too_small_for_every_part_is_said(caplog):
    """A one-image class cannot reach val and test: the split says so instead of dropping it silently."""
    parts = stratified_split([0] * 8 + [1], [5, 2, 2], seed=0)
    assert sorted(i for part in parts for i in part) == list(range(9))
    assert "holds no image of class(es) [1] (images in all: {1: 1})" in caplog.text
    caplog.clear()
    stratified_split([0, 1] * 5, [6, 2, 2], seed=0)
    assert "holds no image" not in caplog.text
