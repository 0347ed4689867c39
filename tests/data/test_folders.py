"""``image_folder`` and ``unlabelled_folder``: split folders or one folder with carved splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fake_trees import class_folders, write_image

import bissl.data.folders  # noqa: F401  (registers the loaders)
from bissl.data.base import DATASETS, SPLITS, UNLABELLED
from bissl.data.lazy import LazyImageDataset
from bissl.utils.errors import DataError

SIZE = 8
CLASSES = ["cat", "dog", "fox"]


def load(name: str, split: str, root: Path | None, seed: int = 0) -> LazyImageDataset:
    return DATASETS.get(name)(split, root=root, image_size=SIZE, seed=seed)


def check_items(dataset: LazyImageDataset, *, labelled: bool) -> None:
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert label == dataset.targets[index]
        assert (0 <= label < dataset.info.num_classes) if labelled else label == UNLABELLED


def test_image_folder_reads_each_split_folder(tmp_path: Path) -> None:
    for folder, count in (("train", 3), ("valid", 2), ("testing", 1)):
        class_folders(tmp_path / folder, CLASSES, count, ".png")
    write_image(tmp_path / "train" / "README.jpg")  # a file beside the class folders is not an image of a class
    for split, count in zip(SPLITS, (9, 6, 3), strict=True):
        dataset = load("image_folder", split, tmp_path)
        assert len(dataset) == count and dataset.info.classes == CLASSES and dataset.info.num_classes == 3
        assert dataset.targets == sorted(dataset.targets) and set(dataset.targets) == {0, 1, 2}
        check_items(dataset, labelled=True)
    class_folders(tmp_path / "testing", ["wolf"], 1)
    with pytest.raises(DataError, match=r"class folders \['wolf'\] that .*train lacks"):
        load("image_folder", "test", tmp_path)


def test_image_folder_carves_a_missing_val_from_train(tmp_path: Path) -> None:
    class_folders(tmp_path / "train", CLASSES, 10)
    class_folders(tmp_path / "test", CLASSES, 2)
    train, val, test = (load("image_folder", split, tmp_path, seed=3) for split in SPLITS)
    assert (len(train), len(val), len(test)) == (27, 3, 6)
    assert sorted(val.targets) == [0, 1, 2]  # stratified
    assert not set(train.images.paths) & set(val.images.paths)
    assert set(train.images.paths) | set(val.images.paths) == {str(p) for p in (tmp_path / "train").rglob("*.jpg")}
    assert load("image_folder", "val", tmp_path, seed=3).images.paths == val.images.paths
    assert load("image_folder", "val", tmp_path, seed=4).images.paths != val.images.paths


def test_image_folder_without_split_folders_carves_all_three(tmp_path: Path) -> None:
    class_folders(tmp_path, CLASSES, 10)
    (tmp_path / "dog" / "nested").mkdir()
    write_image(tmp_path / "dog" / "nested" / "deep.JPEG")  # class folders are read recursively, any case
    by_seed = {seed: {split: load("image_folder", split, tmp_path, seed=seed) for split in SPLITS} for seed in (0, 1)}
    for splits in by_seed.values():
        assert [len(splits[s]) for s in SPLITS] == [25, 3, 3]
        parts = [set(splits[s].images.paths) for s in SPLITS]
        assert sum(map(len, parts)) == len(set().union(*parts)) == 31
        check_items(splits["train"], labelled=True)
    assert by_seed[0]["test"].images.paths == by_seed[1]["test"].images.paths  # test does not depend on the seed
    assert by_seed[0]["val"].images.paths != by_seed[1]["val"].images.paths


def test_unlabelled_folder_finds_images_recursively(tmp_path: Path) -> None:
    names = ["a.jpg", "b.PNG", "sub/c.jpeg", "sub/deeper/d.bmp", "e.webp", "f.tif"]
    for i in range(3):
        for name in names:
            write_image(tmp_path / f"copy{i}" / name, i)
    (tmp_path / "notes.txt").write_text("not an image")
    write_image(tmp_path / ".hidden.jpg")
    write_image(tmp_path / ".cache" / "x.jpg")
    splits = {split: load("unlabelled_folder", split, tmp_path) for split in SPLITS}
    assert [len(splits[s]) for s in SPLITS] == [18, 2, 2]  # one folder: pretext training sees every image
    assert set(splits["val"].images.paths) | set(splits["test"].images.paths) < set(splits["train"].images.paths)
    assert not set(splits["val"].images.paths) & set(splits["test"].images.paths)
    info = splits["train"].info
    assert (info.num_classes, info.classes, info.channels) == (0, [], 3)
    for dataset in splits.values():
        check_items(dataset, labelled=False)


def test_unlabelled_folder_uses_split_folders_when_present(tmp_path: Path) -> None:
    for split, count in (("train", 6), ("val", 2)):
        for i in range(count):
            write_image(tmp_path / split / "any" / f"{i}.jpg", i)
    assert len(load("unlabelled_folder", "val", tmp_path)) == 2
    train, test = load("unlabelled_folder", "train", tmp_path), load("unlabelled_folder", "test", tmp_path)
    assert (len(train), len(test)) == (5, 1)  # no test folder: test carved from train
    assert not set(train.images.paths) & set(test.images.paths)


def test_folder_root_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class_folders(tmp_path, CLASSES, 10)
    monkeypatch.setenv("BISSL_DATA_ROOT", str(tmp_path))
    assert len(load("image_folder", "train", None)) == 24


@pytest.mark.parametrize("name", ["image_folder", "unlabelled_folder"])
def test_missing_or_empty_folder_errors_name_the_path_and_fix(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DataError) as caught:
        load(name, "train", tmp_path / "nowhere")
    message = str(caught.value)
    assert "\n" not in message and repr(name) in message and str(tmp_path / "nowhere") in message
    assert "--data-root" in message
    monkeypatch.delenv("BISSL_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=r"no root given.*--data-root"):
        load(name, "train", None)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images .*empty"):
        load(name, "train", tmp_path / "empty")


def test_too_few_images_for_a_carved_split(tmp_path: Path) -> None:
    write_image(tmp_path / "only.jpg")
    assert len(load("unlabelled_folder", "train", tmp_path)) == 1
    with pytest.raises(DataError, match="val split is empty"):
        load("unlabelled_folder", "val", tmp_path)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    class_folders(tmp_path, CLASSES, 10)
    (tmp_path / "owl").mkdir()
    with pytest.raises(DataError, match=r"no images in class folder .*owl; add images or remove it") as caught:
        load("image_folder", "train", tmp_path)
    assert "\n" not in str(caught.value)


def test_classes_too_small_to_carve_warn(tmp_path: Path) -> None:
    class_folders(tmp_path, CLASSES, 10)
    write_image(tmp_path / "owl" / "0.png")
    with pytest.warns(UserWarning, match=r"classes owl \(1\) of .* have fewer than 3 images"):
        load("image_folder", "train", tmp_path)


@pytest.mark.e2e
def test_corrupt_image_in_a_dataloader_worker_is_one_line_data_error(tmp_path: Path) -> None:
    class_folders(tmp_path / "train", CLASSES, 2)
    class_folders(tmp_path / "val", CLASSES, 1)
    class_folders(tmp_path / "test", CLASSES, 1)
    broken = tmp_path / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    dataset = load("image_folder", "train", tmp_path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot read image {broken}")
