"""Datasets from plain folders of images: ``image_folder`` (labelled by sub-folder) and ``unlabelled_folder``.

Both accept either split folders, ``root/{train,val,test}/...`` (also ``training``, ``valid``, ``validation``,
``testing``), or one folder holding everything. Splits without a folder are carved (see
:mod:`bissl.data.locate`): test is a fixed 10%, val a seeded 10% of the rest (both stratified by class), train
what remains, so the three never overlap. Exception: ``unlabelled_folder`` without a train folder keeps every
image in train (pretext training should see all of them; without labels nothing can leak into val/test).
Images are found recursively by extension; hidden files are skipped.
``download`` is accepted for a uniform signature and ignored: there is nothing to download.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from bissl.data.base import DATASETS, UNLABELLED, ImageDataset, missing_data_error
from bissl.data.lazy import IMAGE_EXTENSIONS, LazyImageDataset, natural_image_info
from bissl.data.locate import ROOT_ENV_VAR, carve, check_split, data_root
from bissl.utils.errors import DataError

SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder`` (recursively, following links), sorted; hidden files and folders skipped."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(parent, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _split_folders(name: str, root: str | None, layout: str) -> tuple[Path, dict[str, Path]]:
    """The folder and its split sub-folders (``{}`` when it has no train folder: one folder holds everything)."""
    folder = data_root(root)
    if folder is None or not folder.is_dir():
        how = f"pass --data-root DIR (or set {ROOT_ENV_VAR}) with DIR a folder laid out as {layout}"
        raise missing_data_error(name, [str(folder)] if folder else [], how)
    found = {
        split: next((folder / n for n in names if (folder / n).is_dir()), None)
        for split, names in SPLIT_FOLDERS.items()
    }
    return folder, ({s: p for s, p in found.items() if p is not None} if found["train"] else {})


def _take(
    read: Callable[[Path], LazyImageDataset],
    folder: Path,
    splits: dict[str, Path],
    split: str,
    seed: int,
    *,
    carve_train: bool = True,
) -> LazyImageDataset:
    """``split`` from its own folder if it has one, else carved from the train folder (or the only folder);
    with ``carve_train=False`` train is the whole pool, val and test are still carved from it."""
    if split != "train" and split in splits:
        return read(splits[split])
    pool = read(splits.get("train", folder))
    if split == "train" and not carve_train:
        return pool
    return carve(pool, split, seed, test="test" not in splits, val="val" not in splits)


@DATASETS.register("image_folder")
def image_folder(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """Images labelled by class folder: ``root/<split>/<class>/**/*.jpg`` or ``root/<class>/**/*.jpg``.

    Classes are the train folder's sub-folders, sorted; val/test folders must use the same class names.
    """
    check_split(split)
    layout = "DIR/<class>/*.jpg or DIR/{train,val,test}/<class>/*.jpg"
    folder, splits = _split_folders("image_folder", root, layout)
    train_folder = splits.get("train", folder)
    classes = _class_folders(train_folder)
    info = natural_image_info("image_folder", classes)

    # Carving a split out of the pool puts each class in every part only if it has one image per part.
    parts = 1 + ("test" not in splits) + ("val" not in splits)

    def read(split_folder: Path) -> LazyImageDataset:
        unknown = sorted(set(_class_folders(split_folder)) - set(classes))
        if unknown:
            raise DataError(f"image_folder: {split_folder} has class folders {unknown} that {train_folder} lacks")
        files = [image_files(split_folder / c) for c in classes]
        if not any(files):
            raise DataError(f"image_folder: no images in class folders of {split_folder} (expected {layout})")
        for c, group in zip(classes, files, strict=True):
            if not group and (split_folder / c).is_dir():
                raise DataError(f"image_folder: no images in class folder {split_folder / c}; add images or remove it")
        if split_folder == train_folder and parts > 1:
            few = [f"{c} ({len(g)})" for c, g in zip(classes, files, strict=True) if len(g) < parts]
            if few:
                warnings.warn(
                    f"image_folder: classes {', '.join(few)} of {split_folder} have fewer than {parts} images, so "
                    "the carved val/test splits cannot hold every class; add images, or give val/test folders",
                    stacklevel=2,
                )
        paths = [path for group in files for path in group]
        return LazyImageDataset.from_files(paths, [i for i, group in enumerate(files) for _ in group], info, image_size)

    return _take(read, folder, splits, split, seed)


@DATASETS.register("unlabelled_folder")
def unlabelled_folder(
    split: str, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> ImageDataset:
    """Every image under ``root`` (recursively, any common extension), label -1 and ``num_classes = 0``.

    With ``root/{train,val,test}`` folders each split reads its own. With one folder, train is every image in it
    and val / test are carved subsets of them (10% each; with no labels, they serve loss monitoring only).
    """
    check_split(split)
    layout = "DIR/**/*.jpg (any common image extension)"
    folder, splits = _split_folders("unlabelled_folder", root, layout)
    info = natural_image_info("unlabelled_folder", [])

    def read(split_folder: Path) -> LazyImageDataset:
        paths = image_files(split_folder)
        if not paths:
            raise DataError(f"unlabelled_folder: no images under {split_folder} ({', '.join(IMAGE_EXTENSIONS)})")
        return LazyImageDataset.from_files(paths, [UNLABELLED] * len(paths), info, image_size)

    return _take(read, folder, splits, split, seed, carve_train=bool(splits))
