"""Tiny dataset trees in each dataset's real on-disk format, written into a test's ``tmp_path``.

Each writer puts the dataset where torchvision would (``root/<usual folder>``) and returns a :class:`FakeTree`
saying how many items each split must have. Datasets without an official val split get 10 train items, so the
carved val split (10%) has 1 item and train 9.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = (12, 9)  # width, height: non-square, so loaders must resize and crop


@dataclass
class FakeTree:
    name: str  # registered dataset name
    folder: Path  # the dataset's own folder (what a user may pass as root directly)
    sizes: dict[str, int]  # expected number of items per split
    num_classes: int


def image_array(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """A random uint8 RGB image ``[height, width, 3]``."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """A small random image, in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_array(seed, size)).save(path)
    return path


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def _savemat(path: Path, data: dict[str, object]) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, data)


def cifar_rows(count: int, seed: int) -> np.ndarray:
    """``count`` CIFAR rows: channel planes of a 32x32 image, flattened (``[N, 3072]``)."""
    return np.stack([image_array(seed + i, (32, 32)).transpose(2, 0, 1).reshape(-1) for i in range(count)])


def cifar10(root: Path) -> FakeTree:
    folder = root / "cifar-10-batches-py"
    for batch in range(1, 6):
        _pickle(folder / f"data_batch_{batch}", {"data": cifar_rows(2, 10 * batch), "labels": [batch % 3, 2]})
    _pickle(folder / "test_batch", {"data": cifar_rows(4, 100), "labels": [0, 1, 2, 9]})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return FakeTree("cifar10", folder, {"train": 9, "val": 1, "test": 4}, 10)


def cifar100(root: Path) -> FakeTree:
    folder = root / "cifar-100-python"
    _pickle(folder / "train", {"data": cifar_rows(10, 0), "fine_labels": [i % 4 for i in range(10)]})
    _pickle(folder / "test", {"data": cifar_rows(4, 50), "fine_labels": [0, 1, 2, 99]})
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)]})
    return FakeTree("cifar100", folder, {"train": 9, "val": 1, "test": 4}, 100)


def stl10_images(count: int, seed: int) -> np.ndarray:
    """STL-10's layout: every image as channel planes stored column-major (``[N, 3, width, height]``)."""
    return np.stack([image_array(seed + i, (96, 96)).transpose(2, 1, 0) for i in range(count)])


def stl10(root: Path) -> FakeTree:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for part, count in (("train", 10), ("test", 4)):
        stl10_images(count, seed=count).tofile(folder / f"{part}_X.bin")
        (np.arange(count, dtype=np.uint8) % 10 + 1).tofile(folder / f"{part}_y.bin")  # labels 1..10 on disk
    write_lines(folder / "class_names.txt", [f"class{i}" for i in range(10)])
    return FakeTree("stl10", folder, {"train": 9, "val": 1, "test": 4}, 10)


def flowers102(root: Path) -> FakeTree:
    folder = root / "flowers-102"
    for i in range(1, 13):
        write_image(folder / "jpg" / f"image_{i:05d}.jpg", i)
    _savemat(folder / "imagelabels.mat", {"labels": np.array([[1, 2, 3, 102] * 3])})
    ids = {"trnid": [1, 2, 3, 4], "valid": [5, 6, 7, 8], "tstid": [9, 10, 11, 12]}
    _savemat(folder / "setid.mat", {key: np.array([value]) for key, value in ids.items()})
    return FakeTree("flowers102", folder, {"train": 4, "val": 4, "test": 4}, 102)


def pets(root: Path) -> FakeTree:
    folder = root / "oxford-iiit-pet"
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]
    rows = {"trainval": [], "test": []}
    for i in range(14):
        image_id = f"{breeds[i % 3]}_{i}"
        write_image(folder / "images" / f"{image_id}.jpg", i)
        rows["trainval" if i < 10 else "test"].append(f"{image_id} {i % 3 + 1} {1 + (i % 3 == 1)} 1")
    for part, lines in rows.items():
        write_lines(folder / "annotations" / f"{part}.txt", lines)
    return FakeTree("pets", folder, {"train": 9, "val": 1, "test": 4}, 3)


def dtd(root: Path) -> FakeTree:
    folder = root / "dtd" / "dtd"  # torchvision's download nests the archive's dtd/ in root/dtd/
    classes = ["banded", "dotted", "striped"]
    for p, part in enumerate(("train", "val", "test")):
        names = [f"{c}/{c}_{p}{i}.jpg" for i, c in enumerate(classes)]
        for i, name in enumerate(names):
            write_image(folder / "images" / name, 10 * p + i)
        write_lines(folder / "labels" / f"{part}1.txt", names)
        write_lines(folder / "labels" / f"{part}2.txt", names[:1])  # other partitions exist but are not used
    return FakeTree("dtd", folder, {"train": 3, "val": 3, "test": 3}, 3)


def aircraft(root: Path) -> FakeTree:
    folder = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "Cessna 172", "A320"]
    write_lines(folder / "variants.txt", variants)
    for p, part in enumerate(("train", "val", "test")):
        ids = [f"{1000000 + 10 * p + i}" for i in range(3)]
        for i, image_id in enumerate(ids):
            write_image(folder / "images" / f"{image_id}.jpg", 10 * p + i)
        lines = [f"{image_id} {variant}" for image_id, variant in zip(ids, variants, strict=True)]
        write_lines(folder / f"images_variant_{part}.txt", lines)
    return FakeTree("aircraft", folder, {"train": 3, "val": 3, "test": 3}, 3)


def _cars_annotations(names: list[str], classes: list[int]) -> np.ndarray:
    records = np.zeros(len(names), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("class", "O"), ("fname", "O")])
    for i, (name, label) in enumerate(zip(names, classes, strict=True)):
        records[i] = (np.uint8(0), np.uint8(0), np.uint8(label), name)
    return records


def cars(root: Path) -> FakeTree:
    folder = root / "stanford_cars"
    class_names = np.array(["AM General Hummer", "Audi R8", "BMW M3"], dtype=object)
    _savemat(folder / "devkit" / "cars_meta.mat", {"class_names": class_names})
    for part, count, index_file in (
        ("train", 10, folder / "devkit" / "cars_train_annos.mat"),
        ("test", 4, folder / "cars_test_annos_withlabels.mat"),
    ):
        names = [f"{i:05d}.jpg" for i in range(1, count + 1)]
        for i, name in enumerate(names):
            write_image(folder / f"cars_{part}" / name, i)
        _savemat(index_file, {"annotations": _cars_annotations(names, [i % 3 + 1 for i in range(count)])})
    return FakeTree("cars", folder, {"train": 9, "val": 1, "test": 4}, 3)


def food101(root: Path) -> FakeTree:
    folder = root / "food-101"
    classes = ["apple_pie", "bibimbap", "churros"]
    for part, count in (("train", 10), ("test", 4)):
        meta: dict[str, list[str]] = {c: [] for c in classes}
        for i in range(count):
            name = f"{classes[i % 3]}/{part}{i}"
            write_image(folder / "images" / f"{name}.jpg", i)
            meta[classes[i % 3]].append(name)
        (folder / "meta").mkdir(parents=True, exist_ok=True)
        (folder / "meta" / f"{part}.json").write_text(json.dumps(meta))
    return FakeTree("food101", folder, {"train": 9, "val": 1, "test": 4}, 3)


SUN_CLASSES = ["/a/abbey", "/a/apartment_building/outdoor", "/b/beach"]


def sun397(root: Path, *, partitions: bool = True) -> FakeTree:
    folder = root / "SUN397"
    write_lines(folder / "ClassName.txt", SUN_CLASSES)
    names = [f"{SUN_CLASSES[i % 3]}/sun_{i:04d}.jpg" for i in range(14)]
    for i, name in enumerate(names):
        write_image(folder / name.lstrip("/"), i)
    if partitions:
        write_lines(folder / "Partitions" / "Training_01.txt", names[:10])
        write_lines(folder / "Partitions" / "Testing_01.txt", names[10:])
        return FakeTree("sun397", folder, {"train": 9, "val": 1, "test": 4}, 3)
    return FakeTree("sun397", folder, {"train": 12, "val": 1, "test": 1}, 3)  # carved from all 14 images


def caltech101(root: Path) -> FakeTree:
    folder = root / "caltech101"
    for c, name in enumerate(["BACKGROUND_Google", "Faces", "airplanes", "ant"]):
        for i in range(1, 5):
            write_image(folder / "101_ObjectCategories" / name / f"image_{i:04d}.jpg", 10 * c + i)
    # 3 classes x 4 images: 3 per class (all but one) are train+val -> 9, val 1, train 8; test 3
    return FakeTree("caltech101", folder, {"train": 8, "val": 1, "test": 3}, 3)


def cub200(root: Path) -> FakeTree:
    folder = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    write_lines(folder / "classes.txt", [f"{i + 1} {c}" for i, c in enumerate(classes)])
    images, labels, split = [], [], []
    for i in range(1, 15):
        name = f"{classes[i % 3]}/{classes[i % 3][4:]}_{i:04d}_{i}.jpg"
        write_image(folder / "images" / name, i)
        images.append(f"{i} {name}")
        labels.append(f"{i} {i % 3 + 1}")
        split.append(f"{i} {int(i <= 10)}")
    write_lines(folder / "images.txt", images)
    write_lines(folder / "image_class_labels.txt", labels)
    write_lines(folder / "train_test_split.txt", split)
    return FakeTree("cub200", folder, {"train": 9, "val": 1, "test": 4}, 3)


VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
VOC_FLAGS = {  # image id -> {class: flag}; 1 positive, 0 difficult, every other class -1
    "000005": {"chair": 1, "person": 0},
    "000007": {"car": 1},
    "000009": {"horse": 1, "person": 1},
    "000012": {"car": 1},
    "000016": {"bicycle": 0, "dog": 1},
    "000001": {"dog": 1, "person": 1},
    "000002": {"train": 1},
}
VOC_SPLITS = {"train": ["000005", "000007", "000009"], "val": ["000012", "000016"], "test": ["000001", "000002"]}


def voc2007(root: Path) -> FakeTree:
    folder = root / "VOCdevkit" / "VOC2007"
    main = folder / "ImageSets" / "Main"
    for part, ids in VOC_SPLITS.items():
        write_lines(main / f"{part}.txt", ids)
        for name in VOC_CLASSES:
            write_lines(main / f"{name}_{part}.txt", [f"{i} {VOC_FLAGS[i].get(name, -1):2d}" for i in ids])
        for n, image_id in enumerate(ids):
            write_image(folder / "JPEGImages" / f"{image_id}.jpg", n)
    return FakeTree("voc2007", folder, {part: len(ids) for part, ids in VOC_SPLITS.items()}, 20)


PAPER_TREES: dict[str, Callable[[Path], FakeTree]] = {
    writer.__name__: writer
    for writer in (
        cifar10, cifar100, stl10, flowers102, pets, dtd, aircraft, cars, food101, sun397, caltech101, cub200, voc2007
    )
}  # fmt: skip
NEEDS_SCIPY = {"flowers102", "cars"}


def class_folders(root: Path, classes: list[str], per_class: int, suffix: str = ".jpg") -> list[Path]:
    """``root/<class>/img<i><suffix>`` for every class."""
    return [
        write_image(root / c / f"img{i}{suffix}", 100 * k + i) for k, c in enumerate(classes) for i in range(per_class)
    ]
