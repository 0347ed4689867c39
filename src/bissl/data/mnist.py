"""``mnist`` and ``fashion_mnist``: 28x28 grey images in 10 classes, read from the original IDX files.

Where the files are looked for, in order (nothing is ever downloaded unless ``download=True``):

1. ``root``, 2. ``$BISSL_DATA_ROOT``, 3. the download cache ``$XDG_CACHE_HOME/bissl/data`` (``~/.cache/...``),
   each both in torchvision's layout ``<dir>/MNIST/raw/`` (``FashionMNIST/raw/``) and flat in ``<dir>/``;
4. for Fashion-MNIST, Debian's ``dataset-fashion-mnist`` package: ``/usr/share/datasets/fashion-mnist``.

A folder counts when it holds all four files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each either
plain or gzipped (``.gz``). The IDX files are parsed here (magic number, dimensions and length checked), in
memory and without unpacking anything to disk, so the read-only, gzipped Debian copy works as it is.
``download=True`` fetches missing files with torchvision's ``MNIST``/``FashionMNIST`` into the first of
``root``, ``$BISSL_DATA_ROOT`` or the cache folder (torchvision's layout).

Splits: ``test`` is the official 10,000-image test set; ``train``/``val`` are a seeded, stratified 11/12 : 1/12
split of the official 60,000 training images (55,000 / 5,000). ``mean``/``std`` are measured on the first
10,000 images of the train split at ``image_size`` (resizing changes the std: Fashion-MNIST's is 0.353 at 28 px,
0.338 at 32 px, 0.322 at 16 px), identically for every split.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from bissl.data.base import DATASETS, DatasetInfo, Split, TensorImageDataset, missing_data_error
from bissl.data.locate import ROOT_ENV_VAR, data_root
from bissl.data.resize import channel_stats, resize_uint8
from bissl.data.splits import fraction_sizes, stratified_split
from bissl.utils.errors import DataError

TRAIN_VAL_FRACTIONS: tuple[float, float] = (11 / 12, 1 / 12)  # 60,000 -> 55,000 train / 5,000 val
STATS_IMAGES = 10_000  # mean/std are measured on this many train-split images
_IDX_IMAGES_MAGIC = 0x0803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x0801  # unsigned bytes, 1 dimension


@dataclass(frozen=True)
class IdxSource:
    """One MNIST-format dataset: its registry name, torchvision class and folders a system package installs."""

    name: str
    torchvision_class: str  # also the folder name of torchvision's layout: <root>/<class>/raw/
    classes: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()
    install_hint: str = ""
    mirror_invariant: bool = True  # DatasetInfo.mirror_invariant


MNIST = IdxSource("mnist", "MNIST", tuple(str(d) for d in range(10)), mirror_invariant=False)  # mirrored digits
FASHION_MNIST = IdxSource(
    "fashion_mnist",
    "FashionMNIST",
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    install_hint="apt-get install dataset-fashion-mnist",
)  # mirror invariant: a mirrored shirt, trouser, bag or shoe is one of the same class


def default_data_root() -> Path:
    """The folder ``download=True`` writes to when neither ``root`` nor ``$BISSL_DATA_ROOT`` is given."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "bissl" / "data"


def _file_names(prefix: str) -> tuple[str, str]:
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def candidate_dirs(source: IdxSource, root: str | os.PathLike[str] | None) -> list[Path]:
    """Every folder searched for ``source``'s files, in search order."""
    bases = [Path(p).expanduser() for p in (root, os.environ.get(ROOT_ENV_VAR)) if p]
    bases.append(default_data_root())
    dirs = [d for base in bases for d in (base / source.torchvision_class / "raw", base)]
    return dirs + [Path(d) for d in source.system_dirs]


def find_idx_dir(source: IdxSource, root: str | os.PathLike[str] | None) -> Path | None:
    """The first candidate folder holding all four IDX files of ``source`` (plain or gzipped), or None."""
    names = [*_file_names("train"), *_file_names("t10k")]
    for directory in candidate_dirs(source, root):
        if all(_find_file(directory, name) for name in names):
            return directory
    return None


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """Parse an IDX file (gzipped or not) of unsigned bytes: big-endian ``magic`` = 0x08 << 8 | ndim, then ndim
    big-endian uint32 sizes, then the data in C order. Returns a uint8 tensor of those sizes."""
    raw = path.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a corrupted gzip file ({exc}); delete it and fetch it again") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        found = raw[:4].hex() if len(raw) >= 4 else "nothing"
        raise DataError(f"{path} is not an IDX file with magic number {magic:#010x} (found {found}); fetch it again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + prod(dims):
        raise DataError(f"{path} is truncated: header says {dims}, file has {len(raw) - header} data bytes")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(*dims)


def read_idx_pair(directory: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, H, W]`` and labels ``[N]`` (uint8) of the ``train`` or ``t10k`` files in ``directory``."""
    image_name, label_name = _file_names(prefix)
    image_path, label_path = _find_file(directory, image_name), _find_file(directory, label_name)
    if image_path is None or label_path is None:
        raise DataError(f"{directory} lacks {image_name} or {label_name} (plain or .gz)")
    images, labels = read_idx(image_path, _IDX_IMAGES_MAGIC), read_idx(label_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    return images, labels


def _download(source: IdxSource, root: str | None) -> Path:
    """Fetch ``source`` with torchvision into ``root`` / ``$BISSL_DATA_ROOT`` / the cache; return its raw folder."""
    import torchvision.datasets

    target = data_root(root) or default_data_root()
    dataset_class = getattr(torchvision.datasets, source.torchvision_class)
    try:
        dataset_class(str(target), train=True, download=True)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ... on a failed download
        raise DataError(
            f"download of dataset {source.name!r} into {target} failed ({type(exc).__name__}: {exc}); "
            "place the IDX files there by hand or pass --data-root DIR"
        ) from exc
    return target / source.torchvision_class / "raw"


def load_idx_dataset(
    source: IdxSource, split: Split, *, root: str | None, image_size: int, download: bool, seed: int
) -> TensorImageDataset:
    """The ``split`` part of ``source`` resized to ``image_size``, found (or with ``download``, fetched) on disk."""
    directory = find_idx_dir(source, root)
    if directory is None and download:
        directory = _download(source, root)
    if directory is None:
        fixes = [source.install_hint] if source.install_hint else []
        fixes += [f"pass --data-root DIR (files flat or in DIR/{source.torchvision_class}/raw)", "pass --download"]
        how = "to get it: " + ", or ".join(fixes)
        raise missing_data_error(source.name, [str(d) for d in candidate_dirs(source, root)], how)
    train_images, train_labels = read_idx_pair(directory, "train")
    parts = stratified_split(train_labels, fraction_sizes(len(train_labels), TRAIN_VAL_FRACTIONS), seed)
    mean, std = channel_stats(resize_uint8(train_images[parts[0][:STATS_IMAGES]].unsqueeze(1), image_size))
    if split == "test":
        images, labels = read_idx_pair(directory, "t10k")
    else:
        index = torch.tensor(parts[0 if split == "train" else 1], dtype=torch.long)
        images, labels = train_images[index], train_labels[index]
    if len(labels) and int(labels.max()) >= len(source.classes):
        raise DataError(f"labels in {directory} exceed the {len(source.classes)} classes of {source.name!r}")
    info = DatasetInfo(
        name=source.name, num_classes=len(source.classes), channels=1, classes=list(source.classes), mean=mean, std=std,
        mirror_invariant=source.mirror_invariant,
    )  # fmt: skip
    return TensorImageDataset(resize_uint8(images.unsqueeze(1), image_size), labels.long(), info)


@DATASETS.register("mnist")
def build_mnist(
    split: Split, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> TensorImageDataset:
    """MNIST handwritten digits (see the module docstring for where the files are looked for)."""
    return load_idx_dataset(MNIST, split, root=root, image_size=image_size, download=download, seed=seed)


@DATASETS.register("fashion_mnist")
def build_fashion_mnist(
    split: Split, *, root: str | None = None, image_size: int, download: bool = False, seed: int = 0
) -> TensorImageDataset:
    """Fashion-MNIST clothing images (see the module docstring for where the files are looked for)."""
    return load_idx_dataset(FASHION_MNIST, split, root=root, image_size=image_size, download=download, seed=seed)
