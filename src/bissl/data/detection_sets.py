"""Detection datasets read from disk: ``voc_detection`` (Pascal VOC) and ``coco_detection`` (any COCO-format JSON).

Annotations are read when the dataset is built, images decoded lazily, one per item, and resized to the square
``image_size`` without cropping (boxes scaled by ``image_size / width`` and ``image_size / height`` of the file's
own size; :mod:`bissl.data.detection` has the item format). Nothing is downloaded unless ``download`` is true.

``voc_detection``: torchvision's layout ``VOCdevkit/VOC2007`` and ``VOCdevkit/VOC2012`` (``Annotations/*.xml``,
``ImageSets/Main/{trainval,test}.txt``, ``JPEGImages/*.jpg``) under the data root (or the root may be the
``VOCdevkit`` folder). The standard protocol: VOC07 trainval + VOC12 trainval is the training pool (train, with
val carved from it: a seeded, class-stratified ``VAL_FRACTION``), VOC07 test is test; 20 classes. VOC's 1-based
inclusive pixel boxes become continuous ones (``x1 = xmin - 1, x2 = xmax``). Objects flagged ``difficult`` stay in
the data with ``difficult = True``. Without VOC2012 the pool is VOC07 trainval alone, with a warning.

``coco_detection``: ``root/annotations/instances_{train,val,test}.json`` (val and test optional: carved from train
when missing, as :func:`bissl.data.locate.carve` does) and the images they name, looked for under
``root/images/<split>/``, ``root/images/``, ``root/<split>/``, ``root/<split>2017/`` and ``root/``. The categories of
the train file, sorted by id, become labels ``0..K-1``; ``bbox`` ``[x, y, w, h]`` becomes ``(x, y, x + w, y + h)``;
``iscrowd`` becomes ``difficult``; boxes without area are dropped (a detector cannot train on them).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from bissl.data.base import DATASETS, missing_data_error
from bissl.data.detection import DETECTION_KIND, Target, collate_detection, first_labels, make_target, scale_boxes
from bissl.data.lazy import LazyImageDataset, image_to_tensor, natural_image_info
from bissl.data.locate import ROOT_ENV_VAR, OnDisk, carve, check_split, data_root, read_lines, require
from bissl.utils.errors import DataError

VOC_DETECTION_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class DetectionImages:
    """Image files decoded on access and resized to ``size x size`` (bilinear, no crop), with the scale factors."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.paths = [str(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load_resized(self, index: int, size: int) -> tuple[Image.Image, float, float]:
        """The RGB image resized to ``size x size`` and ``(size / width, size / height)`` of the original file."""
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                width, height = image.size  # the file's own size, before any reduced-scale JPEG decoding
                image.draft("RGB", (size, size))
                resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, ValueError) as exc:  # missing, truncated or not an image
            raise DataError(f"cannot read image {path} ({exc}); restore or delete the file") from exc
        return resized, size / width, size / height

    def load(self, index: int, size: int) -> Image.Image:
        return self.load_resized(index, size)[0]

    def subset(self, indices: Sequence[int]) -> DetectionImages:
        return DetectionImages([self.paths[i] for i in indices])


class FileDetectionDataset(LazyImageDataset):
    """Detection images on disk with their annotations (``boxes`` in pixels of the original files)."""

    images: DetectionImages
    collate = staticmethod(collate_detection)

    def __init__(
        self, images: DetectionImages, annotations: Sequence[Target], info_name: str, classes: Sequence[str],
        image_size: int,
    ) -> None:  # fmt: skip
        if len(images) != len(annotations):
            raise DataError(f"dataset {info_name!r}: {len(images)} images but {len(annotations)} annotations")
        info = natural_image_info(info_name, classes)
        info.kind = DETECTION_KIND
        self.annotations = list(annotations)
        super().__init__(images, first_labels([a["labels"] for a in self.annotations]), info, image_size)

    def image(self, index: int) -> torch.Tensor:
        """The image at ``index`` resized to the square (no crop), without its target."""
        return image_to_tensor(self.images.load_resized(index, self.image_size)[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image, sx, sy = self.images.load_resized(index, self.image_size)
        annotation = self.annotations[index]
        boxes = scale_boxes(annotation["boxes"], sx, sy, self.image_size)
        return image_to_tensor(image), make_target(boxes, annotation["labels"].clone(), annotation["difficult"].clone())

    def subset(self, indices: Sequence[int]) -> FileDetectionDataset:
        new = super().subset(indices)
        new.annotations = [self.annotations[i] for i in indices]
        return new


def _concat(parts: Sequence[FileDetectionDataset]) -> FileDetectionDataset:
    first = copy.copy(parts[0])
    first.images = DetectionImages([path for part in parts for path in part.images.paths])
    first.annotations = [a for part in parts for a in part.annotations]
    first.targets = [t for part in parts for t in part.targets]
    return first


# --- Pascal VOC ----------------------------------------------------------------------------------------------------


def _fetch_voc_detection(base: Path, split: str) -> None:
    from torchvision.datasets import VOCDetection

    VOCDetection(str(base), year="2007", image_set="trainval", download=True)
    VOCDetection(str(base), year="2007", image_set="test", download=True)
    VOCDetection(str(base), year="2012", image_set="trainval", download=True)


_VOC_DET = OnDisk(
    "voc_detection", ("VOCdevkit",), "VOC2007/ImageSets/Main/trainval.txt",
    "http://host.robots.ox.ac.uk/pascal/VOC/ (VOC2007 trainval + test, VOC2012 trainval)", _fetch_voc_detection,
)  # fmt: skip


def voc_annotation(path: Path) -> Target:
    """The objects of one VOC XML file: boxes in continuous pixel coordinates, labels, difficult flags."""
    try:
        root = ET.parse(require(path)).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path} is not valid XML ({exc}); re-extract the VOC archive") from exc
    class_index = {name: i for i, name in enumerate(VOC_DETECTION_CLASSES)}
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise DataError(f"{path} names the unknown VOC class {name!r}")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: an object {name!r} has no bndbox")
        xmin, ymin, xmax, ymax = (float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        labels.append(class_index[name])
        difficult.append(int(float(obj.findtext("difficult") or 0)) == 1)
    return make_target(boxes, labels, difficult)


def _voc_part(folder: Path, image_set: str, image_size: int) -> FileDetectionDataset:
    ids = read_lines(folder / "ImageSets" / "Main" / f"{image_set}.txt")
    annotations = [voc_annotation(folder / "Annotations" / f"{i}.xml") for i in ids]
    images = DetectionImages([folder / "JPEGImages" / f"{i}.jpg" for i in ids])
    return FileDetectionDataset(images, annotations, "voc_detection", VOC_DETECTION_CLASSES, image_size)


@DATASETS.register("voc_detection")
def voc_detection(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> FileDetectionDataset:
    """Pascal VOC detection, 07+12 trainval -> train (val carved, seeded), 07 test -> test; 20 classes."""
    check_split(split)
    if split == "test":
        devkit = _VOC_DET.find(root, download=download, split=split, marker="VOC2007/ImageSets/Main/test.txt")
        return _voc_part(devkit / "VOC2007", "test", image_size)
    devkit = _VOC_DET.find(root, download=download, split=split)
    parts = [_voc_part(devkit / "VOC2007", "trainval", image_size)]
    if (devkit / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").exists():
        parts.append(_voc_part(devkit / "VOC2012", "trainval", image_size))
    else:
        warnings.warn(
            f"voc_detection: {devkit / 'VOC2012'} not found; training on VOC2007 trainval alone, not the standard "
            "07+12 protocol",
            stacklevel=2,
        )
    return carve(_concat(parts), split, seed, test=False)


# --- COCO-format JSON ----------------------------------------------------------------------------------------------

_COCO_LAYOUT = (
    "DIR/annotations/instances_train.json (val and test optional) with the images it names under DIR/images/ "
    "or DIR/train/"
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(require(path).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from exc


def _image_folder(base: Path, split: str, file_name: str) -> Path:
    candidates = [base / "images" / split, base / "images", base / split, base / f"{split}2017", base]
    for folder in candidates:
        if (folder / file_name).exists():
            return folder
    looked = ", ".join(str(folder / file_name) for folder in candidates)
    raise DataError(f"coco_detection: image {file_name!r} of instances_{split}.json not found (looked in: {looked})")


def coco_categories(data: dict) -> tuple[dict[int, int], list[str]]:
    """Category id -> label ``0..K-1`` (ids in sorted order) and the class names."""
    categories = sorted(data.get("categories", []), key=lambda c: int(c["id"]))
    if not categories:
        raise DataError("coco_detection: the train annotation file lists no categories")
    return {int(c["id"]): i for i, c in enumerate(categories)}, [str(c.get("name", c["id"])) for c in categories]


def _coco_part(base: Path, split: str, label_of: dict[int, int], classes: list[str], image_size: int):
    path = base / "annotations" / f"instances_{split}.json"
    data = _read_json(path)
    images = sorted(data.get("images", []), key=lambda im: int(im["id"]))
    if not images:
        raise DataError(f"{path} lists no images")
    objects: dict[int, list[dict]] = {int(im["id"]): [] for im in images}
    dropped = 0
    for ann in data.get("annotations", []):
        if int(ann["image_id"]) not in objects:
            raise DataError(f"{path}: an annotation names the unknown image id {ann['image_id']}")
        if int(ann["category_id"]) not in label_of:
            raise DataError(f"{path}: category id {ann['category_id']} is not among the train file's categories")
        if float(ann["bbox"][2]) <= 0 or float(ann["bbox"][3]) <= 0:
            dropped += 1
            continue
        objects[int(ann["image_id"])].append(ann)
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} boxes without area", stacklevel=3)
    annotations = []
    for im in images:
        anns = objects[int(im["id"])]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        labels = [label_of[int(a["category_id"])] for a in anns]
        annotations.append(make_target(boxes, labels, [bool(a.get("iscrowd", 0)) for a in anns]))
    folder = _image_folder(base, split, images[0]["file_name"])
    files = DetectionImages([folder / im["file_name"] for im in images])
    return FileDetectionDataset(files, annotations, "coco_detection", classes, image_size)


@DATASETS.register("coco_detection")
def coco_detection(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> FileDetectionDataset:
    """A COCO-format detection dataset in a folder (``download`` is ignored: there is nothing to download)."""
    check_split(split)
    base = data_root(root)
    train_file = Path("annotations") / "instances_train.json"
    if base is None or not (base / train_file).exists():
        how = f"pass --data-root DIR (or set {ROOT_ENV_VAR}) with {_COCO_LAYOUT}"
        raise missing_data_error("coco_detection", [str(base / train_file)] if base else [], how)
    label_of, classes = coco_categories(_read_json(base / train_file))
    has = {s: (base / "annotations" / f"instances_{s}.json").exists() for s in ("val", "test")}
    if split != "train" and has[split]:
        return _coco_part(base, split, label_of, classes, image_size)
    pool = _coco_part(base, "train", label_of, classes, image_size)
    if has["val"] and has["test"]:
        return pool
    return carve(pool, split, seed, test=not has["test"], val=not has["val"])
