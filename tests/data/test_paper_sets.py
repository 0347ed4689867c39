"""The paper's dataset loaders, on tiny trees written in each dataset's real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from fake_trees import NEEDS_SCIPY, PAPER_TREES, VOC_FLAGS, VOC_SPLITS, FakeTree, cifar10, image_array, stl10, sun397

import bissl.data.paper_sets  # noqa: F401  (registers the loaders)
from bissl.data.base import DATASETS, SPLITS
from bissl.data.lazy import IMAGENET_MEAN, IMAGENET_STD, LazyImageDataset
from bissl.utils.errors import DataError

SIZE = 10


def write_tree(name: str, root: Path) -> FakeTree:
    if name in NEEDS_SCIPY:
        pytest.importorskip("scipy")
    return PAPER_TREES[name](root)


def load(name: str, split: str, root: Path | str | None, **kwargs: object) -> LazyImageDataset:
    return DATASETS.get(name)(split, root=root, image_size=SIZE, **kwargs)


def item_ids(dataset: LazyImageDataset) -> list[bytes]:
    """Each item's decoded pixels (the fake images are random, so these identify them)."""
    return [dataset.image(i).numpy().tobytes() for i in range(len(dataset))]


@pytest.mark.parametrize("name", sorted(PAPER_TREES))
def test_loads_every_split(name: str, tmp_path: Path) -> None:
    tree = write_tree(name, tmp_path)
    for split in SPLITS:
        dataset = load(name, split, tmp_path)
        assert len(dataset) == len(dataset.targets) == tree.sizes[split], split
        info = dataset.info
        assert (info.name, info.channels, info.num_classes) == (name, 3, tree.num_classes)
        assert len(info.classes) == info.num_classes
        assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert info.multi_label == (name == "voc2007")
        assert all(0 <= t < info.num_classes for t in dataset.targets)
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
            assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0
            if info.multi_label:
                assert label.shape == (20,) and set(label.tolist()) <= {0.0, 1.0} and label.sum() >= 1
            else:
                assert label == dataset.targets[index]


@pytest.mark.parametrize("name", ["cifar10", "stl10", "pets", "caltech101", "sun397", "cub200"])
def test_carved_val_is_seeded_and_disjoint(name: str, tmp_path: Path) -> None:
    write_tree(name, tmp_path)
    test_ids = item_ids(load(name, "test", tmp_path))
    val_sets = set()
    for seed in range(6):
        train, val = (item_ids(load(name, split, tmp_path, seed=seed)) for split in ("train", "val"))
        assert item_ids(load(name, "val", tmp_path, seed=seed)) == val  # deterministic in the seed
        assert not set(train) & set(val) and not (set(train) | set(val)) & set(test_ids)
        assert item_ids(load(name, "test", tmp_path, seed=seed)) == test_ids  # test never moves with the seed
        val_sets.add(tuple(val))
    assert len(val_sets) > 1


@pytest.mark.parametrize("name", sorted(PAPER_TREES))
def test_root_may_be_the_dataset_folder_or_come_from_the_environment(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = write_tree(name, tmp_path)
    assert len(load(name, "test", tree.folder)) == tree.sizes["test"]
    monkeypatch.setenv("BISSL_DATA_ROOT", str(tmp_path))
    assert len(load(name, "test", None)) == tree.sizes["test"]


@pytest.mark.parametrize("name", sorted(PAPER_TREES))
def test_missing_data_names_dataset_paths_and_fix(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load(name, "train", tmp_path / "data")
    message = str(caught.value)
    assert "\n" not in message
    assert repr(name) in message and str(tmp_path / "data") in message and "--data-root" in message
    downloadable = name not in {"cars", "cub200"}
    assert ("--download" in message) == downloadable and "http" in message


def test_missing_root_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BISSL_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=r"'dtd' not found \(looked in: \(no root given\)\).*--data-root"):
        load("dtd", "train", None)


def test_download_is_passed_to_torchvision_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls = []

    def fake_cifar10(root: str, *, download: bool) -> None:
        calls.append((root, download))
        cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    with pytest.raises(DataError):
        load("cifar10", "train", tmp_path)
    assert calls == []
    assert len(load("cifar10", "train", tmp_path, download=True)) == 9
    assert calls == [(str(tmp_path), True)]
    load("cifar10", "test", tmp_path, download=True)  # already there: no second download
    assert len(calls) == 1


def test_cifar_and_stl10_pixels_are_decoded_in_the_right_layout(tmp_path: Path) -> None:
    cifar10(tmp_path)
    stl10(tmp_path)
    cifar_image, _ = DATASETS.get("cifar10")("test", root=tmp_path, image_size=32)[0]
    expected = torch.from_numpy(image_array(100, (32, 32))).permute(2, 0, 1).float() / 255
    assert torch.equal(cifar_image, expected)
    stl_image, label = DATASETS.get("stl10")("test", root=tmp_path, image_size=96)[3]
    expected = torch.from_numpy(image_array(4 + 3, (96, 96))).permute(2, 0, 1).float() / 255
    assert torch.equal(stl_image, expected) and label == 3


def test_stl10_pickles_without_its_memory_map(tmp_path: Path) -> None:
    stl10(tmp_path)
    dataset = load("stl10", "train", tmp_path)
    first = dataset[0][0]
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.images._map is None and torch.equal(copy[0][0], first)


def test_voc_labels_are_multi_hot_with_difficult_marked(tmp_path: Path) -> None:
    write_tree("voc2007", tmp_path)
    dataset = load("voc2007", "train", tmp_path)
    classes = dataset.info.classes
    for row, image_id in enumerate(VOC_SPLITS["train"]):
        flags = VOC_FLAGS[image_id]
        _, label = dataset[row]
        assert {classes[c] for c in label.nonzero().flatten().tolist()} == set(flags)  # difficult counts positive
        assert {classes[c] for c in dataset.difficult[row].nonzero().flatten().tolist()} == {
            name for name, flag in flags.items() if flag == 0
        }
        assert classes[dataset.targets[row]] == min(flags, key=classes.index)
    assert dataset.subset([2, 0]).difficult.tolist() == dataset.difficult[[2, 0]].tolist()


def test_voc_test_split_missing_points_at_the_test_archive(tmp_path: Path) -> None:
    write_tree("voc2007", tmp_path)
    (tmp_path / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").unlink()
    assert len(load("voc2007", "val", tmp_path)) == 2
    with pytest.raises(DataError, match=r"test\.txt.*VOCtest_06-Nov-2007\.tar"):
        load("voc2007", "test", tmp_path)


def test_sun397_without_partitions_warns_and_carves(tmp_path: Path) -> None:
    tree = sun397(tmp_path, partitions=False)
    with pytest.warns(UserWarning, match="Partitions"):
        datasets = {split: load("sun397", split, tmp_path) for split in SPLITS}
    assert {split: len(dataset) for split, dataset in datasets.items()} == tree.sizes
    assert datasets["train"].info.classes[1] == "apartment_building/outdoor"


def test_incomplete_tree_and_corrupt_image_give_one_line_errors(tmp_path: Path) -> None:
    tree = write_tree("cub200", tmp_path)
    (tree.folder / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match=r"train_test_split.txt is missing.*re-download"):
        load("cub200", "train", tmp_path)
    tree = write_tree("food101", tmp_path / "food")
    dataset = load("food101", "test", tmp_path / "food")
    Path(dataset.images.paths[0]).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*test0.jpg"):
        dataset[0]


def test_batches_collate_through_a_dataloader(tmp_path: Path) -> None:
    write_tree("voc2007", tmp_path)
    write_tree("dtd", tmp_path)
    for name, label_shape in (("voc2007", (2, 20)), ("dtd", (2,))):
        images, labels = next(iter(torch.utils.data.DataLoader(load(name, "val", tmp_path), batch_size=2)))
        assert images.shape == (2, 3, SIZE, SIZE) and tuple(labels.shape) == label_shape
