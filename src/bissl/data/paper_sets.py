"""Loaders of the paper's downstream datasets, each reading the dataset's own on-disk format.

The index files (split lists, label files, ``.mat`` annotations, CIFAR's pickles, STL-10's binaries) are read here
and the images decoded lazily by :class:`~bissl.data.lazy.LazyImageDataset`. torchvision is used only to download
(``download=True``): its dataset classes verify the real archives' checksums on every load (CIFAR, STL-10,
Flowers) or keep the file lists in private attributes, so reading the same files with a few lines of our own gives
one code path that also accepts the folder layouts of manual downloads.

Splits: official train/val/test where the dataset has them (Flowers-102, DTD partition 1, FGVC-Aircraft, VOC07);
official train/test plus a val carved from train (seeded, ``VAL_FRACTION`` per class) for CIFAR, STL-10, Pets
(trainval), Cars, Food-101, SUN397 (partition 1) and CUB; Caltech-101 has no official split: 30 images per class
(a fixed draw) form train+val, the rest is test. :mod:`bissl.data.locate` has the carving rules.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bissl.data.base import DATASETS, ImageDataset
from bissl.data.lazy import (
    ArrayImages,
    BinaryFileImages,
    FileImages,
    ImageSource,
    LazyImageDataset,
    MultiLabelImageDataset,
    natural_image_info,
)
from bissl.data.locate import Fetch, OnDisk, carve, check_split, lookup, read_lines, require
from bissl.utils.errors import BisslError, DataError
from bissl.utils.seed import make_generator

CALTECH_TRAIN_PER_CLASS = 30
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


@dataclass
class _Index:
    """One split of a dataset as read from its index files."""

    images: ImageSource
    targets: list[int]
    classes: list[str]


Reader = Callable[[Path, str], _Index]  # (dataset folder, the dataset's own split name) -> that split


def _torchvision_fetch(class_name: str) -> Fetch:
    """Download by constructing ``torchvision.datasets.<class_name>(root, download=True)``."""

    def fetch(base: Path, split: str) -> None:
        import torchvision.datasets

        getattr(torchvision.datasets, class_name)(str(base), download=True)

    return fetch


def _dataset(disk: OnDisk, index: _Index, image_size: int) -> LazyImageDataset:
    return LazyImageDataset(index.images, index.targets, natural_image_info(disk.name, index.classes), image_size)


def _load(
    disk: OnDisk,
    read: Reader,
    split: str,
    root: str | None,
    image_size: int,
    download: bool,
    seed: int,
    *,
    official_val: bool = False,
    train_part: str = "train",
) -> LazyImageDataset:
    """Find the dataset and read ``split``: the official one, or train/val carved from ``train_part``."""
    check_split(split)
    folder = disk.find(root, download=download, split=split)
    if official_val or split == "test":
        return _dataset(disk, read(folder, split), image_size)
    return carve(_dataset(disk, read(folder, train_part), image_size), split, seed, test=False)


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise BisslError(f"reading {path.name} needs scipy: pip install scipy") from None
    return loadmat(require(path), squeeze_me=True)


def _paths(folder: Path, names: list[str], suffix: str = "") -> FileImages:
    return FileImages([folder / f"{name}{suffix}" for name in names])


# --- CIFAR-10/100: python pickles of uint8 rows [N, 3 * 32 * 32] ---------------------------------------------------


def _unpickle(path: Path) -> dict[str, Any]:
    """One of CIFAR's python pickles (files of the dataset archive, read as torchvision reads them)."""
    with require(path).open("rb") as handle:
        return pickle.load(handle, encoding="latin1")


def _cifar_reader(files: dict[str, tuple[str, ...]], label_key: str, meta: tuple[str, str]) -> Reader:
    def read(folder: Path, part: str) -> _Index:
        batches = [_unpickle(folder / name) for name in files[part]]
        array = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        targets = [int(t) for b in batches for t in b[label_key]]
        return _Index(ArrayImages(array, to_hwc=(1, 2, 0)), targets, list(_unpickle(folder / meta[0])[meta[1]]))

    return read


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR10 = OnDisk("cifar10", ("cifar-10-batches-py",), "batches.meta", _CIFAR_URL, _torchvision_fetch("CIFAR10"))
_CIFAR100 = OnDisk("cifar100", ("cifar-100-python",), "meta", _CIFAR_URL, _torchvision_fetch("CIFAR100"))
_read_cifar10 = _cifar_reader(
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "labels",
    ("batches.meta", "label_names"),
)
_read_cifar100 = _cifar_reader({"train": ("train",), "test": ("test",)}, "fine_labels", ("meta", "fine_label_names"))


@DATASETS.register("cifar10")
def cifar10(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """CIFAR-10 (50k train / 10k test, 10 classes) from its python pickles; val carved from train."""
    return _load(_CIFAR10, _read_cifar10, split, root, image_size, download, seed)


@DATASETS.register("cifar100")
def cifar100(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """CIFAR-100 (50k / 10k, 100 fine classes) from its python pickles; val carved from train."""
    return _load(_CIFAR100, _read_cifar100, split, root, image_size, download, seed)


# --- STL-10: raw uint8 binaries, each image stored channel by channel in column-major order -----------------------


def _read_stl10(folder: Path, part: str) -> _Index:
    labels = np.fromfile(require(folder / f"{part}_y.bin"), dtype=np.uint8).astype(np.int64) - 1
    images = BinaryFileImages(require(folder / f"{part}_X.bin"), shape=(3, 96, 96), to_hwc=(2, 1, 0))
    return _Index(images, labels.tolist(), read_lines(folder / "class_names.txt"))


_STL10 = OnDisk(
    "stl10", ("stl10_binary",), "train_y.bin", "https://cs.stanford.edu/~acoates/stl10/", _torchvision_fetch("STL10")
)


@DATASETS.register("stl10")
def stl10(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """STL-10's labelled images (5k train / 8k test, 10 classes, 96 px) read from its binaries through a memory
    map; val carved from train."""
    return _load(_STL10, _read_stl10, split, root, image_size, download, seed)


# --- Oxford Flowers-102: jpg/ + imagelabels.mat + setid.mat --------------------------------------------------------


def _read_flowers(folder: Path, part: str) -> _Index:
    from torchvision.datasets import Flowers102

    labels = np.atleast_1d(_loadmat(folder / "imagelabels.mat")["labels"]).astype(np.int64) - 1
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[part]
    ids = np.atleast_1d(_loadmat(folder / "setid.mat")[key]).astype(np.int64).tolist()
    images = _paths(folder / "jpg", [f"image_{i:05d}" for i in ids], ".jpg")
    return _Index(images, [int(labels[i - 1]) for i in ids], list(Flowers102.classes))


_FLOWERS = OnDisk(
    "flowers102", ("flowers-102", "flowers102"), "imagelabels.mat",
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/", _torchvision_fetch("Flowers102"),
)  # fmt: skip


@DATASETS.register("flowers102")
def flowers102(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """Oxford Flowers-102 with its official train/val/test (1020 / 1020 / 6149); needs scipy for the .mat files."""
    return _load(_FLOWERS, _read_flowers, split, root, image_size, download, seed, official_val=True)


# --- Oxford-IIIT Pet: images/ + annotations/{trainval,test}.txt ----------------------------------------------------


def _read_pets(folder: Path, part: str) -> _Index:
    rows = {p: [line.split() for line in read_lines(folder / "annotations" / f"{p}.txt")] for p in ("trainval", "test")}
    breeds = {int(row[1]) - 1: row[0].rsplit("_", 1)[0] for part_rows in rows.values() for row in part_rows}
    classes = [breeds.get(i, str(i)) for i in range(max(breeds) + 1)]
    chosen = rows[part]
    return _Index(_paths(folder / "images", [r[0] for r in chosen], ".jpg"), [int(r[1]) - 1 for r in chosen], classes)


_PETS = OnDisk(
    "pets", ("oxford-iiit-pet",), "annotations/trainval.txt", "https://www.robots.ox.ac.uk/~vgg/data/pets/",
    _torchvision_fetch("OxfordIIITPet"),
)  # fmt: skip


@DATASETS.register("pets")
def pets(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """Oxford-IIIT Pet (37 breeds; 3680 trainval / 3669 test); train and val carved from trainval."""
    return _load(_PETS, _read_pets, split, root, image_size, download, seed, train_part="trainval")


# --- DTD: images/<class>/*.jpg + labels/{train,val,test}1.txt ------------------------------------------------------


def _read_dtd(folder: Path, part: str) -> _Index:
    classes = sorted(d.name for d in (folder / "images").iterdir() if d.is_dir())
    index_file = folder / "labels" / f"{part}1.txt"
    names = read_lines(index_file)
    class_index = {name: i for i, name in enumerate(classes)}
    targets = [lookup(class_index, name.split("/")[0], index_file) for name in names]
    return _Index(_paths(folder / "images", names), targets, classes)


_DTD = OnDisk(
    "dtd", ("dtd/dtd", "dtd"), "labels/train1.txt", "https://www.robots.ox.ac.uk/~vgg/data/dtd/",
    _torchvision_fetch("DTD"),
)  # fmt: skip


@DATASETS.register("dtd")
def dtd(split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0) -> ImageDataset:
    """Describable Textures (47 classes), official partition 1: 1880 train / 1880 val / 1880 test."""
    return _load(_DTD, _read_dtd, split, root, image_size, download, seed, official_val=True)


# --- FGVC-Aircraft: data/images/*.jpg + data/images_variant_<split>.txt + data/variants.txt -----------------------


def _read_aircraft(folder: Path, part: str) -> _Index:
    classes = read_lines(folder / "variants.txt")
    index_file = folder / f"images_variant_{part}.txt"
    rows = [line.split(" ", 1) for line in read_lines(index_file)]
    class_index = {name: i for i, name in enumerate(classes)}
    targets = [lookup(class_index, row[1], index_file) for row in rows]
    return _Index(_paths(folder / "images", [row[0] for row in rows], ".jpg"), targets, classes)


_AIRCRAFT = OnDisk(
    "aircraft", ("fgvc-aircraft-2013b/data", "data"), "images_variant_train.txt",
    "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/", _torchvision_fetch("FGVCAircraft"),
)  # fmt: skip


@DATASETS.register("aircraft")
def aircraft(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """FGVC-Aircraft at the "variant" level (100 classes), official train/val/test (3334 / 3333 / 3333)."""
    return _load(_AIRCRAFT, _read_aircraft, split, root, image_size, download, seed, official_val=True)


# --- Stanford Cars (torchvision's layout): devkit/*.mat, cars_train/, cars_test/, cars_test_annos_withlabels.mat ---


def _read_cars(folder: Path, part: str) -> _Index:
    classes = [str(name) for name in np.atleast_1d(_loadmat(folder / "devkit" / "cars_meta.mat")["class_names"])]
    annotations, images = {
        "train": (folder / "devkit" / "cars_train_annos.mat", folder / "cars_train"),
        "test": (folder / "cars_test_annos_withlabels.mat", folder / "cars_test"),
    }[part]
    rows = np.atleast_1d(_loadmat(annotations)["annotations"])
    return _Index(_paths(images, [str(r["fname"]) for r in rows]), [int(r["class"]) - 1 for r in rows], classes)


_CARS = OnDisk(
    "cars", ("stanford_cars", "stanford-cars", "cars"), "devkit/cars_meta.mat",
    "a mirror of https://ai.stanford.edu/~jkrause/cars/car_dataset.html (the original is offline; torchvision cannot "
    "download it) arranged in torchvision's StanfordCars layout (devkit/, cars_train/, cars_test/, "
    "cars_test_annos_withlabels.mat)",
)  # fmt: skip


@DATASETS.register("cars")
def cars(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """Stanford Cars (196 classes; 8144 train / 8041 test); val carved from train; needs scipy for the .mat files."""
    return _load(_CARS, _read_cars, split, root, image_size, download, seed)


# --- Food-101: images/<class>/<id>.jpg + meta/{train,test}.json ----------------------------------------------------


def _read_food(folder: Path, part: str) -> _Index:
    meta: dict[str, list[str]] = json.loads(require(folder / "meta" / f"{part}.json").read_text())
    classes = sorted(meta)
    names = [name for c in classes for name in meta[c]]
    targets = [i for i, c in enumerate(classes) for _ in meta[c]]
    return _Index(_paths(folder / "images", names, ".jpg"), targets, classes)


_FOOD = OnDisk(
    "food101", ("food-101", "food101"), "meta/train.json",
    "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", _torchvision_fetch("Food101"),
)  # fmt: skip


@DATASETS.register("food101")
def food101(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """Food-101 (101 classes; 75750 train / 25250 test); val carved from train."""
    return _load(_FOOD, _read_food, split, root, image_size, download, seed)


# --- SUN397: <letter>/<class>/sun_*.jpg + ClassName.txt (+ Partitions/{Training,Testing}_01.txt) --------------------


def _sun_index(folder: Path, names: list[str], source: Path) -> _Index:
    """Images named relative to the dataset folder, e.g. ``/a/abbey/sun_x.jpg`` (class ``abbey``)."""
    classes = [line.strip("/").split("/", 1)[1] for line in read_lines(folder / "ClassName.txt")]
    class_index = {name: i for i, name in enumerate(classes)}
    parts = [name.strip("/").split("/") for name in names]
    targets = [lookup(class_index, "/".join(p[1:-1]), source) for p in parts]
    return _Index(_paths(folder, [name.strip("/") for name in names]), targets, classes)


def _sun_partition(folder: Path) -> Path | None:
    """The folder holding the official partition files (Partitions.zip), if present."""
    return next((d for d in (folder / "Partitions", folder) if (d / "Training_01.txt").is_file()), None)


_SUN397 = OnDisk(
    "sun397", ("SUN397", "sun397"), "ClassName.txt",
    "https://vision.princeton.edu/projects/2010/SUN/ (with Partitions.zip for the official split)",
    _torchvision_fetch("SUN397"),
)  # fmt: skip


@DATASETS.register("sun397")
def sun397(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """SUN397 (397 classes), official partition 1 (50 train / 50 test images per class); val carved from train.

    Without the partition files (``Partitions/Training_01.txt``, ``Testing_01.txt``) it warns and carves a fixed
    test and a seeded val split from all images instead.
    """
    check_split(split)
    folder = _SUN397.find(root, download=download, split=split)
    partition = _sun_partition(folder)
    if partition is None:
        warnings.warn(
            f"sun397: no Partitions/Training_01.txt under {folder}; carving test/val from all images (results will not "
            "be comparable with the official split)",
            stacklevel=2,
        )
        names = [str(p.relative_to(folder)) for p in sorted(folder.rglob("sun_*.jpg"))]
        return carve(_dataset(_SUN397, _sun_index(folder, names, folder), image_size), split, seed, test=True)
    part_file = partition / ("Testing_01.txt" if split == "test" else "Training_01.txt")
    full = _dataset(_SUN397, _sun_index(folder, read_lines(part_file), part_file), image_size)
    return full if split == "test" else carve(full, split, seed, test=False)


# --- Caltech-101: 101_ObjectCategories/<class>/*.jpg ---------------------------------------------------------------


_CALTECH = OnDisk(
    "caltech101", ("caltech101",), "101_ObjectCategories", "https://data.caltech.edu/records/mzrjq-6wc02",
    _torchvision_fetch("Caltech101"),
)  # fmt: skip


@DATASETS.register("caltech101")
def caltech101(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """Caltech-101 (101 classes; BACKGROUND_Google excluded). No official split: a fixed draw of 30 images per class
    (all but one in smaller classes) is train+val, val being a seeded 10% of it; the rest is test."""
    check_split(split)
    categories = _CALTECH.find(root, download=download, split=split) / "101_ObjectCategories"
    classes = sorted(d.name for d in categories.iterdir() if d.is_dir() and d.name != "BACKGROUND_Google")
    groups = [sorted((categories / c).glob("*.jpg")) for c in classes]
    generator = make_generator("caltech101", "trainval")  # fixed: every run is tested on the same images
    trainval: list[int] = []
    start = 0
    for group in groups:
        order = (start + torch.randperm(len(group), generator=generator)).tolist()
        trainval += order[: min(CALTECH_TRAIN_PER_CLASS, len(group) - 1)]
        start += len(group)
    targets = [label for label, group in enumerate(groups) for _ in group]
    full = _dataset(_CALTECH, _Index(FileImages([f for g in groups for f in g]), targets, classes), image_size)
    if split == "test":
        chosen = set(trainval)
        return full.subset([i for i in range(len(full)) if i not in chosen])
    return carve(full.subset(sorted(trainval)), split, seed, test=False)


# --- CUB-200-2011: images/ + images.txt, image_class_labels.txt, train_test_split.txt, classes.txt -----------------


def _read_cub(folder: Path, part: str) -> _Index:
    def table(name: str) -> dict[str, str]:
        return dict(line.split(" ", 1) for line in read_lines(folder / name))

    paths, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    classes = [name.split(".", 1)[-1] for name in table("classes.txt").values()]  # "001.Black_footed_Albatross"
    wanted = "1" if part == "train" else "0"
    ids = [i for i in paths if is_train.get(i, "").strip() == wanted]
    return _Index(_paths(folder / "images", [paths[i] for i in ids]), [int(labels[i]) - 1 for i in ids], classes)


_CUB = OnDisk(
    "cub200", ("CUB_200_2011", "cub200"), "images.txt", "https://www.vision.caltech.edu/datasets/cub_200_2011/"
)


@DATASETS.register("cub200")
def cub200(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """CUB-200-2011 (200 bird species; 5994 train / 5794 test) from its own index files; val carved from train.
    Not downloadable automatically."""
    return _load(_CUB, _read_cub, split, root, image_size, download, seed)


# --- Pascal VOC 2007 classification: JPEGImages/ + ImageSets/Main/{<split>,<class>_<split>}.txt --------------------


def _fetch_voc(base: Path, split: str) -> None:
    from torchvision.datasets import VOCDetection

    VOCDetection(str(base), year="2007", image_set="test" if split == "test" else "trainval", download=True)


_VOC = OnDisk(
    "voc2007", ("VOCdevkit/VOC2007", "VOC2007"), "ImageSets/Main/train.txt",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ (VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar)",
    _fetch_voc,
)  # fmt: skip


@DATASETS.register("voc2007")
def voc2007(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """Pascal VOC 2007 classification, official train / val / test (2501 / 2510 / 4952), 20 classes, multi-label.

    The label is a multi-hot float tensor [20]. Objects flagged difficult (``0`` in the class files) count as
    positive in the label and are marked in ``dataset.difficult`` so that VOC's 11-point mAP can ignore them.
    """
    check_split(split)
    folder = _VOC.find(root, download=download, split=split, marker=f"ImageSets/Main/{split}.txt")
    main = folder / "ImageSets" / "Main"
    ids = read_lines(main / f"{split}.txt")
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    flags = torch.full((len(ids), len(VOC_CLASSES)), -1, dtype=torch.int8)
    for column, name in enumerate(VOC_CLASSES):
        class_file = main / f"{name}_{split}.txt"
        for line in read_lines(class_file):
            image_id, flag = line.split()
            if image_id not in row_of:
                raise DataError(f"{class_file} lists image {image_id} missing from {split}.txt; re-extract VOC2007")
            flags[row_of[image_id], column] = int(flag)
    info = natural_image_info("voc2007", VOC_CLASSES, multi_label=True)
    images = _paths(folder / "JPEGImages", ids, ".jpg")
    return MultiLabelImageDataset(images, (flags >= 0).float(), flags == 0, info, image_size)
